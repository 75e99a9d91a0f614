import torch
import torch.nn.functional as F

from clframe.augment import prepare, random_resized_crop_theta


def test_test_mode_is_resize_and_normalise():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = prepare(images, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)
    expected = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False,
                             antialias=True)
    assert torch.allclose(out, (expected - 0.5) / 0.25, atol=1e-6)


def test_train_mode_is_seeded_and_varies_per_image():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = prepare(images, 24, None, None, train=True, generator=torch.Generator().manual_seed(1))
    b = prepare(images, 24, None, None, train=True, generator=torch.Generator().manual_seed(1))
    c = prepare(images, 24, None, None, train=True, generator=torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_crop_stays_inside_the_image_and_flips_half():
    theta = random_resized_crop_theta(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (theta[:, 0, 2].abs() <= 1 - width + 1e-6).all() and (theta[:, 1, 2].abs() <= 1 - height + 1e-6).all()
    assert (width <= 1).all() and (height <= 1).all()
    area = width * height
    assert area.min() >= 0.08 * 0.5 and area.max() <= 1.0
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.45 < flipped < 0.55


def test_full_crop_without_flip_is_identity():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(2, 1, 1)
    grid = F.affine_grid(theta, [2, 3, 16, 16], align_corners=False)
    out = F.grid_sample(images.float() / 255, grid, align_corners=False)
    assert torch.allclose(out, images.float() / 255, atol=1e-5)


def test_test_crop_is_resize_then_centre_crop():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = prepare(images, 14, None, None, train=False, test_crop=0.875)  # resize to 16, keep centre 14
    resized = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False,
                            antialias=True)
    assert torch.allclose(out, resized[..., 1:15, 1:15], atol=1e-6)


def test_crop_scale_min_bounds_the_area():
    theta = random_resized_crop_theta(2000, torch.Generator().manual_seed(0), torch.device("cpu"), scale=(0.5, 1.0))
    area = theta[:, 0, 0].abs() * theta[:, 1, 1]
    assert area.min() >= 0.5 * 0.99 * 0.75  # sides clamped to the image can only shrink the ratio's area


def test_test_mode_antialiases_a_downscale():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = prepare(images, 16, None, None, train=False)
    smooth = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    aliased = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out, smooth, atol=1e-6) and not torch.allclose(out, aliased, atol=1e-3)


def test_affine_grid_equals_torchs():
    from clframe.augment import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))  # shear and rotation terms too
    expected = F.affine_grid(theta, [5, 3, 12, 12], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 12), expected, rtol=0, atol=2e-6)
