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
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def num_prefix_tokens(vit: nn.Module) -> int:
    return int(getattr(vit, "num_prefix_tokens", 1))


def insert_tokens(vit: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Insert ``tokens`` ([B, P, D] or [P, D]) right after the class/register tokens."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    n = num_prefix_tokens(vit)
    return torch.cat([x[:, :n], tokens.to(x.dtype), x[:, n:]], dim=1)


def attention(attn: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
              prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``Attention.forward`` with optional key/value prefixes ([B, heads, P, head_dim]).

    Queries come from the tokens only, so the sequence length does not change; the prefixes are
    concatenated in front of the projected keys and values and the fused SDPA kernel does the rest.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix_k is not None:
        k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    x = x.transpose(1, 2).reshape(B, N, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        x = norm(x)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        raise NotImplementedError("gated attention is not supported with prefixes")
    return attn.proj_drop(attn.proj(x))


def block(blk: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
          prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm transformer block with optional attention prefixes."""
    if prefix_k is None:
        return blk(x)
    x = x + blk.drop_path1(blk.ls1(attention(blk.attn, blk.norm1(x), prefix_k, prefix_v)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


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
