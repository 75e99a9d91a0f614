"""Shared ViT machinery for prompt-style strategies: token embedding, token insertion, and
attention with key/value prefixes on the fused SDPA path.

Strategies compose these instead of copying timm's forward: VPT and L2P insert tokens after the
class token, prefix-tuning / DualPrompt / CODA-Prompt pass per-block key/value prefixes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def embed(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + position embedding + pre-norm, as timm's forward does."""
    x = patch_tokens(vit.patch_embed, images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def patch_tokens(patch_embed: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm ``PatchEmbed``'s output [B, patches, D], computed as one matrix product.

    A convolution whose stride equals its kernel is exactly the product of the image's
    non-overlapping patches with the flattened filters. On Hopper cuDNN runs ViT-B/16's 3-channel
    16x16 convolution at batch 128 in ~0.7 ms plus a layout conversion; the product takes
    ~0.05 ms, and L2P-style strategies embed every image twice per step. Anything but the plain
    patchify (padding, dilation, a size the model does not take, NCHW output) goes to timm's own.
    """
    proj = getattr(patch_embed, "proj", None)
    if not _plain_patchify(patch_embed, proj, images):
        return patch_embed(images)
    batch, channels, height, width = images.shape
    ph, pw = proj.kernel_size
    patches = (images.reshape(batch, channels, height // ph, ph, width // pw, pw)
               .permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // ph) * (width // pw), channels * ph * pw))
    return patch_embed.norm(F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias))


def _plain_patchify(patch_embed: nn.Module, proj: nn.Module | None, images: torch.Tensor) -> bool:
    from timm.layers import PatchEmbed  # timm's own class only: a hybrid ViT's HybridEmbed runs a CNN first

    if type(patch_embed) is not PatchEmbed or not isinstance(proj, nn.Conv2d) or images.dim() != 4:
        return False
    if not patch_embed.flatten or proj.in_channels != images.shape[1]:
        return False
    if proj.stride != proj.kernel_size or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
        return False
    if getattr(patch_embed, "dynamic_img_pad", False):
        return False
    height, width = images.shape[-2:]
    if height % proj.kernel_size[0] or width % proj.kernel_size[1]:
        return False
    expected = getattr(patch_embed, "img_size", None)
    return not (getattr(patch_embed, "strict_img_size", False) and expected is not None
                and tuple(expected) != (height, width))


def num_prefix_tokens(vit: nn.Module) -> int:
    return int(getattr(vit, "num_prefix_tokens", 1))


def insert_tokens(vit: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Insert ``tokens`` ([B, P, D] or [P, D]) right after the class/register tokens."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    n = num_prefix_tokens(vit)
    return torch.cat([x[:, :n], tokens.to(x.dtype), x[:, n:]], dim=1)


def attention(attn: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
              prefix_v: torch.Tensor | None = None, queries: slice | None = None) -> torch.Tensor:
    """timm ``Attention.forward`` with optional key/value prefixes ([B, heads, P, head_dim]).

    Queries come from the tokens only, so the sequence length does not change; the prefixes are
    concatenated in front of the projected keys and values and the fused SDPA kernel does the rest.
    With ``queries`` only those tokens' outputs are computed (keys and values still come from
    every token): the result equals the full output's ``[:, queries]``.
    """
    B, N, _ = x.shape
    width = attn.qkv.out_features // 3  # sizes spelled out: an empty shard (B = 0) cannot infer a -1
    heads = attn.num_heads
    if queries is None:
        qkv = attn.qkv(x).reshape(B, N, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:  # timm's fused qkv weight holds the q, k and v rows in that order
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x[:, queries], weight[:width], None if bias is None else bias[:width])
        N = q.shape[1]
        q = q.reshape(B, N, heads, width // heads).transpose(1, 2)
        kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
        k, v = kv.reshape(B, x.shape[1], 2, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix_k is not None:
        k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    x = x.transpose(1, 2).reshape(B, N, width)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        x = norm(x)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        raise NotImplementedError("gated attention is not supported with prefixes")
    return attn.proj_drop(attn.proj(x))


def block(blk: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
          prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm transformer block with optional attention prefixes.

    The prefixed form runs eager even where blocks are compiled. Compiled, DualPrompt trained 8%
    faster at a steady batch size on an H200 (3444 against 3184 img/s), but its Split CIFAR-100
    protocol, compilation included, took 130.5 s instead of 102.7 s.
    """
    if prefix_k is None:
        return blk(x)
    x = x + blk.drop_path1(blk.ls1(attention(blk.attn, blk.norm1(x), prefix_k, prefix_v)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def kept_tokens_block(blk: nn.Module, x: torch.Tensor, keep: slice) -> torch.Tensor:
    """A pre-norm timm block's output for the tokens ``x[:, keep]`` only.

    A token's output depends on the other tokens only through their keys and values, so the last
    block of a model whose head reads a few tokens ([CLS], or L2P's prompt tokens) can skip the
    queries, the projection and the MLP of every other token: ~10/12 of that block's work, ~6% of
    a ViT-B pass. Equal to ``blk(x)[:, keep]`` up to float rounding.
    """
    if not _is_plain_block(blk):
        return blk(x)[:, keep]
    x_kept = x[:, keep]
    x_kept = x_kept + blk.drop_path1(blk.ls1(attention(blk.attn, blk.norm1(x), queries=keep)))
    return x_kept + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_kept))))


def _is_plain_block(blk: nn.Module) -> bool:
    """timm's pre-norm ViT ``Block`` with its fused-qkv ``Attention`` (what ``kept_tokens_block``
    rewrites); BEiT's or SAM's classes of the same names carry position biases and do not qualify."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(blk, "attn", None)
    qkv = getattr(attn, "qkv", None)
    return (type(blk) is Block and type(attn) is Attention and isinstance(qkv, nn.Linear)
            and getattr(attn, "gate", None) is None and qkv.out_features % 3 == 0)


def run_blocks(vit: nn.Module, x: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
    """``vit.blocks(x)``; with ``keep``, only the tokens ``keep`` of the last block's output (see
    :func:`kept_tokens_block`). That block runs eager: it is a sixth of a block, mostly one cuBLAS
    product. Compiled (with the slice taken outside the graph: with it inside, Inductor 2.11 crashed
    compiling the backward for a new batch size) it trained 1.6% faster at a steady batch size on an
    H200, but the whole Split CIFAR-100 L2P protocol, compilation included, took 121.5 s instead of
    the 100.2 s measured a session earlier with the eager block."""
    if keep is None:
        return vit.blocks(x)
    *body, last = vit.blocks
    for blk in body:
        x = blk(x)
    return kept_tokens_block(last, x, keep)


def is_plain_vit(model: nn.Module) -> bool:
    """timm's own ``VisionTransformer`` (not a subclass such as distilled DeiT, which embeds and pools
    its own way): the model whose forward ``embed`` + blocks + ``norm`` + ``forward_head`` repeats."""
    from timm.models.vision_transformer import VisionTransformer

    return type(model) is VisionTransformer


def class_token_tokens(vit: nn.Module) -> slice | None:
    """The tokens the model's own pooling reads when that is [CLS] alone (``slice(0, 1)``), else None.

    Only timm's plain ``VisionTransformer`` is judged by its settings: subclasses pool their own way
    (distilled DeiT averages [CLS] and the distillation token)."""
    if not is_plain_vit(vit):
        return None
    if getattr(vit, "attn_pool", None) is not None or getattr(vit, "global_pool", None) != "token":
        return None
    return slice(0, 1) if getattr(vit, "cls_token", None) is not None else None


def drop_tokens(vit: nn.Module, x: torch.Tensor, count: int) -> torch.Tensor:
    """Remove the ``count`` tokens that follow the class/register tokens (undoes ``insert_tokens``)."""
    if count == 0:
        return x
    n = num_prefix_tokens(vit)
    return torch.cat([x[:, :n], x[:, n + count:]], dim=1)


def pooled(vit: nn.Module, x: torch.Tensor, n_inserted: int = 0) -> torch.Tensor:
    """Final norm and the model's own pooling (pre-logits) of the last block's output, after
    dropping ``n_inserted`` prompt tokens: a [CLS] model reads [CLS], an average-pooled one the
    patches only, whatever was inserted."""
    return vit.forward_head(vit.norm(drop_tokens(vit, x, n_inserted)), pre_logits=True)


def head_split(attn: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[P, D] key or value prefix tokens as the [B, heads, P, head_dim] that ``attention`` takes."""
    length, width = tokens.shape
    split = tokens.reshape(length, attn.num_heads, width // attn.num_heads).transpose(0, 1)
    return split.unsqueeze(0).expand(batch_size, -1, -1, -1)


def patch_prompt_bound(vit: nn.Module) -> float:
    """VPT's prompt initialisation bound: Xavier-uniform for a [3·patch_h·patch_w → D] layer,
    i.e. the patch embedding's fan-in and the width (KMnP/vpt, ``vit_prompt/vit.py``)."""
    proj = vit.patch_embed.proj
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    return math.sqrt(6.0 / float(fan_in + vit.embed_dim))


def attn_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention residual branch of a pre-norm timm block (block output = x + this + ...)."""
    return blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))


def mlp_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP residual branch of a pre-norm timm block."""
    return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
