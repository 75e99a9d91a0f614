"""GPU fast-path switches that keep the algorithm unchanged.

- ``frozen_bf16``: under bf16 autocast every Linear/Conv casts its fp32 weight to bf16 on every
  call. For modules whose parameters are all frozen, holding the weights in bf16 once gives the
  very same products without the per-step casts (norm layers stay fp32, as autocast runs them).
- ``compile``: ``torch.compile`` each transformer block of the backbone (the hot loop), keeping
  the strategy's own Python (prompt selection, masks) eager. The short last training batch of an
  epoch runs the blocks uncompiled (:func:`uncompiled`): a second batch size would make dynamo
  compile the block twice more (the step and the no-grad query pass, with a dynamic batch
  dimension), seconds of compilation for one batch in hundreds.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

CASTABLE = (nn.Linear, nn.Conv2d)


def hold_frozen_in_bf16(module: nn.Module) -> int:
    """Cast fully frozen Linear/Conv2d modules to bf16; returns how many were cast."""
    cast = 0
    for child in module.modules():
        params = list(child.parameters(recurse=False))
        if isinstance(child, CASTABLE) and params and not any(p.requires_grad for p in params):
            child.to(torch.bfloat16)
            cast += 1
    return cast


def compile_blocks(backbone: nn.Module, backend: str | Callable = "inductor") -> int:
    """Compile every block of ``backbone.blocks`` in place; returns how many. (Tests pass another
    ``backend``: the same tracing and recompilation, without Inductor's code generation.)"""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return 0
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def uncompiled(active: bool) -> contextlib.AbstractContextManager:
    """While ``active``, compiled modules run their eager code (same operations, no compilation)."""
    if not active:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
