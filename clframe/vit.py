"""Shared ViT machinery for prompt-style strategies: token embedding, token insertion, and
attention with key/value prefixes on the fused SDPA path.

Strategies compose these instead of copying timm's forward: VPT and L2P insert tokens after the
class token, prefix-tuning / DualPrompt / CODA-Prompt pass per-block key/value prefixes.
"""
from __future__ import annotations

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
