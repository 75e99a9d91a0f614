"""Learned text prompts for CLIP, shared by coop, cocoop and dapl.

A prompt is a list of segments: an int ``n`` (n context slots that take learned vectors) or text
(tokenized with CLIP's BPE). :class:`PromptSlots` tokenizes a set of prompts once, keeps their
frozen token embeddings, and splices context vectors into the slots with one ``scatter``, for one
context shared by all prompts, one per prompt (class-specific), or one per image (CoCoOp), then
runs the text encoder on the result. :class:`EvalCache` keeps text features for a whole evaluation.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clframe.clip_backbone import ClipBackbone
from clframe.errors import ClframeError

Segment = int | str


def class_prompt(name: str, n_ctx: int, position: str) -> list[Segment]:
    """CoOp's layouts: context then class name (end), name then context (front), or the name
    between the two halves of the context (middle); each ends with a full stop."""
    if position == "end":
        return [n_ctx, f"{name}."]
    if position == "front":
        return [name, n_ctx, "."]
    if position == "middle":
        return [n_ctx // 2, name, n_ctx - n_ctx // 2, "."]
    raise ValueError(f"position must be end, front or middle, not {position!r}")


def init_context(clip: ClipBackbone, n_ctx: int, phrase: str = "", copies: int | None = None) -> torch.Tensor:
    """Initial context [n_ctx, width] ([copies, n_ctx, width] for class-specific contexts):
    N(0, 0.02) as CoOp does, or the token embeddings of ``phrase`` (then n_ctx is its token count)."""
    if phrase:
        ids = clip.tokenizer.encode(phrase)
        vectors = clip.token_embeddings(torch.tensor(ids)).clone()
        return vectors if copies is None else vectors.expand(copies, -1, -1).clone()
    shape = (n_ctx, clip.width) if copies is None else (copies, n_ctx, clip.width)
    return nn.init.normal_(torch.empty(shape), std=0.02)


class PromptSlots(nn.Module):
    """Token embeddings of ``prompts`` with the positions of their context slots.

    Buffers (not saved in checkpoints; rebuilt from the class names): ``tokens`` [N, L, width],
    ``slots`` [N, M] (positions of the M context slots), ``eot`` [N] (end-of-text positions).
    ``L`` stops after the longest prompt's end-of-text token (see ``encode_embeddings``).
    """

    def __init__(self, clip: ClipBackbone, prompts: list[list[Segment]]) -> None:
        super().__init__()
        clip.check_prompt_learning()
        tokenizer = clip.tokenizer
        placeholder = tokenizer.encode("X")[0]  # any id below end-of-text; its embedding is replaced
        rows, slots = [], []
        for segments in prompts:
            ids, positions = [tokenizer.sot_token_id], []
            for segment in segments:
                if isinstance(segment, int):
                    positions.extend(range(len(ids), len(ids) + segment))
                    ids.extend([placeholder] * segment)
                else:
                    ids.extend(tokenizer.encode(segment))
            rows.append(ids + [tokenizer.eot_token_id])
            slots.append(positions)
        length, limit = max(map(len, rows)), clip.text_tower.positional_embedding.shape[0]
        if length > limit:
            longest = max(prompts, key=lambda p: len(str(p)))
            raise ClframeError(f"a text prompt has {length} tokens, the text encoder takes {limit} ({longest}); "
                               f"use fewer context vectors or shorter class names")
        if len({len(s) for s in slots}) != 1:
            raise ValueError("every prompt needs the same number of context slots")
        ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
        self.register_buffer("tokens", clip.token_embeddings(ids), persistent=False)
        self.register_buffer("slots", torch.tensor(slots, dtype=torch.long).view(len(rows), -1), persistent=False)
        self.register_buffer("eot", torch.tensor([len(row) - 1 for row in rows]), persistent=False)

    def splice(self, ctx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings with ``ctx`` in the slots: ctx [..., n or 1, M, width] -> [..., n, L, width],
        n = number of ``rows`` (prompt indices; all prompts when None)."""
        tokens = self.tokens if rows is None else self.tokens[rows]
        slots = self.slots if rows is None else self.slots[rows]
        lead, (n, length, width) = ctx.shape[:-3], tokens.shape
        index = slots[..., None].expand(*lead, n, slots.shape[1], width)
        source = ctx.expand(*lead, n, slots.shape[1], width)
        return tokens.to(ctx.dtype).expand(*lead, n, length, width).scatter(-2, index, source)

    def encode(self, clip: ClipBackbone, ctx: torch.Tensor, rows: torch.Tensor | None = None,
               chunk: int | None = None, recompute: bool = False) -> torch.Tensor:
        """Normalised text features [..., n, embed_dim] of the spliced prompts.

        Leading dims of ``ctx`` (CoCoOp: one context per image) are encoded ``chunk`` prompt
        sequences per text-encoder pass; with ``recompute`` a chunk's activations are not kept for
        backward but recomputed there (torch.utils.checkpoint), so memory holds one chunk at a time.
        """
        eot = self.eot if rows is None else self.eot[rows]
        ctx = ctx[None] if ctx.dim() == 2 else ctx  # one shared context: [1, M, width]
        lead, n = ctx.shape[:-3], len(eot)
        flat = ctx.reshape(math.prod(lead), *ctx.shape[-3:]) if lead else ctx[None]

        def run(part: torch.Tensor) -> torch.Tensor:
            prompts = self.splice(part, rows).flatten(0, 1)
            return clip.encode_embeddings(prompts, eot.repeat(len(part))).view(len(part), n, -1)

        per_pass = max(1, (chunk or len(flat) * n) // n)
        parts = []
        for part in flat.split(per_pass):
            if recompute and torch.is_grad_enabled() and part.requires_grad:
                parts.append(checkpoint(run, part, use_reentrant=False))
            else:
                parts.append(run(part))
        features = torch.cat(parts)
        return features.view(*lead, n, -1) if lead else features[0]


class EvalCache(nn.Module):
    """One tensor computed at the first evaluation batch and reused until the key changes or
    training resumes (``train()`` clears it): text features once per evaluation, not per batch.
    With ``fixed`` (text that never learns, e.g. zero-shot prompts) it is computed once and kept."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.fixed = fixed
        self.key: Hashable = None
        self.value: torch.Tensor | None = None

    def train(self, mode: bool = True) -> EvalCache:
        if mode and not self.fixed:
            self.value = None
        return super().train(mode)

    def get(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.training and not self.fixed:
            return compute()
        if self.value is None or self.key != key:
            with torch.no_grad():
                self.key, self.value = key, compute()
        return self.value
