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


BLOCK_OPTIONS = [{}, dict(init_values=0.5), dict(qk_norm=True), dict(qkv_bias=False), dict(scale_attn_norm=True)]


@pytest.mark.parametrize("options", BLOCK_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("keep", [slice(0, 1), slice(1, 6), slice(0, 17)])
def test_kept_tokens_block_equals_the_full_block_and_its_gradient(keep, options):
    model = tiny_vit(**options)
    block = model.blocks[-1]
    assert vit._is_plain_block(block)  # the shortcut is taken, not the slice-of-the-full-block fallback
    if options:  # the option is live: LayerScale / qk-norm parameters that differ from identity
        for parameter in block.parameters():
            parameter.data.add_(0.1 * torch.randn_like(parameter))
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


MODEL_OPTIONS = [({}, True), (dict(reg_tokens=2), True), (dict(reg_tokens=2, no_embed_class=True), True),
                 (dict(fc_norm=True), True), (dict(init_values=0.5, qk_norm=True), True),
                 (dict(global_pool="avg"), False), (dict(global_pool="avg", class_token=False), False),
                 (dict(global_pool="map"), False)]


@pytest.mark.parametrize("options,reads_class_token", MODEL_OPTIONS, ids=lambda o: str(o))
def test_frozen_features_equal_timms_forward(options, reads_class_token):
    model = tiny_vit(**options)
    for parameter in model.parameters():  # LayerScale, norms and pools away from their identity init
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    images = torch.randn(4, 3, 32, 32)
    expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert vit._plain_patchify(model.patch_embed, model.patch_embed.proj, images)
    assert (vit.class_token_tokens(model) == slice(0, 1)) is reads_class_token
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-5, atol=1e-5)


def test_hybrid_vits_keep_their_cnn_stem():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", depth=2, embed_dim=32, num_heads=2, img_size=32,
                              num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vit.embed(model, images)[:, 1:], model.patch_embed(images) + model.pos_embed[:, 1:],
                               rtol=1e-5, atol=1e-5)


def test_distilled_deit_pools_both_tokens_in_prompted_features():
    from clframe import prefix_prompts

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              img_size=32, num_classes=0).eval()
    images, prompt = torch.randn(2, 3, 32, 32), torch.randn(2, 2, 3, 32)
    assert vit.class_token_tokens(model) is None
    first = model.blocks[0]
    x = vit.block(first, vit.embed(model, images), prefix_prompts.split_heads(first.attn, prompt[:, 0]),
                  prefix_prompts.split_heads(first.attn, prompt[:, 1]))
    expected = vit.pooled(model, model.blocks[1](x))  # [CLS] and distillation token averaged, as timm does
    torch.testing.assert_close(prefix_prompts.prompted_features(model, images, {0: prompt}), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled blocks are timed and checked on CUDA")
def test_compiled_blocks_and_kept_tokens_match_eager_on_cuda():
    from clframe.fastpath import compile_blocks

    model = tiny_vit().cuda()
    images = torch.randn(8, 3, 32, 32, device="cuda")
    expected = frozen_features(model, images)
    assert compile_blocks(model) == 2
    torch.testing.assert_close(frozen_features(model, images), expected, rtol=1e-4, atol=1e-4)
