"""Prompts attached to chosen blocks of a frozen ViT, as attention prefixes or as inserted tokens.

Shared by DualPrompt (a G-prompt and a keyed E-prompt) and CODA-Prompt (a weighted sum of
components): each builds, per image, one prompt for each block it prompts, and hands them here.

- ``prefix`` (prefix-tuning, both references' default): a block's prompt ``[B, 2, P, D]`` holds a
  key half and a value half; each is split into heads and prepended to that block's projected
  keys or values (:func:`clframe.vit.block`, on the fused SDPA kernel). Queries come from the
  tokens only, so the sequence, its position embedding and the [CLS] slot do not change.
- ``tokens`` (prompt-tuning): a block's prompt ``[B, P, D]`` joins the sequence right after the
  class token before that block and stays for the blocks after it. dualprompt-pytorch prepends it
  instead; with no position term added mid-network, attention does not see where a token stands.

The head input is the model's own pooling of the final-normed output, inserted tokens dropped:
[CLS] for a ViT with a class token, as in both references.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from clframe import vit as vit_ops
from clframe.config import RunConfig
from clframe.errors import ClframeError
from clframe.models import create_backbone, freeze

PREFIX, TOKENS = "prefix", "tokens"
MODES = (PREFIX, TOKENS)


def prompt_shape(mode: str, blocks: int, length: int, width: int) -> tuple[int, ...]:
    """One prompt spanning ``blocks`` blocks: ``[blocks, 2 (key, value), length, width]`` as prefixes
    (dualprompt-pytorch's ``[layer, 2, length, heads, head_dim]``, heads flattened), or
    ``[blocks, length, width]`` as tokens."""
    return (blocks, 2, length, width) if mode == PREFIX else (blocks, length, width)


def frozen_vit(run: RunConfig, blocks: dict[str, Sequence[int]]) -> nn.Module:
    """The run's backbone, frozen; fails in one line when a config key of ``blocks`` (key -> block
    ids) names a block the model does not have, or one block twice."""
    vit = create_backbone(run)
    freeze(vit)
    depth = len(vit.blocks)
    for key, ids in blocks.items():
        if any(not 0 <= b < depth for b in ids) or len(set(ids)) != len(ids):
            fits = [b for b in dict.fromkeys(ids) if 0 <= b < depth]
            raise ClframeError(f"{key}={list(ids)}: model '{run.model}' has blocks 0-{depth - 1}, each may be named "
                               f"once; e.g. --set {key}={fits or [0]}")
    return vit


def split_heads(attn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, P, D]`` prefix tokens as the ``[B, heads, P, head_dim]`` keys or values of ``attn`` (head h
    holds features h·head_dim onwards, the layout of timm's qkv projection and of both references)."""
    batch, length, width = tokens.shape
    return tokens.reshape(batch, length, attn.num_heads, width // attn.num_heads).transpose(1, 2)


def by_block(*groups: tuple[Sequence[int], torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{block: prompt [B, ...]}`` from ``(blocks, prompts [B, len(blocks), ...])`` pairs; a block that
    two groups name gets both prompts, concatenated along the length (dim -2)."""
    prompts: dict[int, torch.Tensor] = {}
    for blocks, stacked in groups:
        for block, prompt in zip(blocks, stacked.unbind(1)):
            prompts[block] = torch.cat([prompts[block], prompt], dim=-2) if block in prompts else prompt
    return prompts


def prompted_features(vit: nn.Module, images: torch.Tensor, prompts: dict[int, torch.Tensor],
                      mode: str = PREFIX) -> torch.Tensor:
    """Head input of ``images`` through the frozen ``vit`` with ``prompts`` attached to their blocks."""
    x, inserted = vit_ops.embed(vit, images), 0
    last = len(vit.blocks) - 1
    read = vit_ops.class_token_tokens(vit)
    for index, blk in enumerate(vit.blocks):
        prompt = prompts.get(index)
        if prompt is None and index == last and read is not None:  # the head reads [CLS] alone
            return vit.forward_head(vit.norm(vit_ops.kept_tokens_block(blk, x, read)), pre_logits=True)
        if prompt is None:
            x = blk(x)
        elif mode == PREFIX:
            x = vit_ops.block(blk, x, split_heads(blk.attn, prompt[:, 0]), split_heads(blk.attn, prompt[:, 1]))
        else:
            x, inserted = blk(vit_ops.insert_tokens(vit, x, prompt)), inserted + prompt.shape[1]
    return vit_ops.pooled(vit, x, inserted)


def timm_head(width: int, n_classes: int) -> nn.Linear:
    """A linear classifier with timm's ViT head init (trunc-normal std 0.02, zero bias), which the
    L2P and DualPrompt references train."""
    head = nn.Linear(width, n_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head
