"""The ViT shortcuts that make the fast path faster compute what timm computes (fp32, CPU)."""
import pytest
import timm
import torch

from clframe import vit
from clframe.models import frozen_features


def tiny_vit(**overrides):
    torch.manual_seed(0)
    kwargs = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, img_size=32, num_classes=0, **overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


def test_patch_tokens_as_one_product_equal_timms_convolution():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(vit.patch_tokens(model.patch_embed, images), model.patch_embed(images),
                               rtol=1e-5, atol=1e-5)


def test_patch_tokens_leave_other_sizes_to_timm():
    model = tiny_vit()
    with pytest.raises(AssertionError, match="doesn't match model"):  # timm's own check still speaks
        vit.patch_tokens(model.patch_embed, torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("keep", [slice(0, 1), slice(1, 6), slice(0, 17)])
def test_kept_tokens_block_equals_the_full_block_and_its_gradient(keep):
    model = tiny_vit()
    block = model.blocks[-1]
    x = torch.randn(2, 17, model.embed_dim, requires_grad=True)
    full = block(x)[:, keep]
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    kept = vit.kept_tokens_block(block, x, keep)
    (grad_kept,) = torch.autograd.grad(kept.square().sum(), x)
    assert kept.shape == full.shape
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_kept, grad_full, rtol=1e-5, atol=1e-5)


def test_an_empty_shard_passes_through():  # a rank may hold none of a short last batch
    model = tiny_vit()
    assert frozen_features(model, torch.zeros(0, 3, 32, 32)).shape == (0, model.embed_dim)


def test_frozen_features_equal_timms_forward():
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32)
    expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert vit.class_token_tokens(model) == slice(0, 1)
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-5, atol=1e-5)


def test_average_pooled_models_keep_every_token():
    model = tiny_vit(global_pool="avg", class_token=False)
    images = torch.randn(2, 3, 32, 32)
    assert vit.class_token_tokens(model) is None
    expected = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled blocks are timed and checked on CUDA")
def test_compiled_blocks_and_kept_tokens_match_eager_on_cuda():
    from clframe.fastpath import compile_blocks

    model = tiny_vit().cuda()
    images = torch.randn(8, 3, 32, 32, device="cuda")
    expected = frozen_features(model, images)
    assert compile_blocks(model) == 2
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-4, atol=1e-4)
