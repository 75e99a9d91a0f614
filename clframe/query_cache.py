"""Exact reuse of frozen-model features across evaluations.

After task i the engine re-tests every earlier task; test images are not augmented and the
query model is frozen, so a test image's query feature never changes. Caching it by
``(task_id, eval_slice)`` (host-side keys, no device sync) computes each once per run and
roughly halves the cost of every later evaluation for query-based strategies (L2P, DualPrompt,
CODA-Prompt).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # strategies import this module; a runtime import would be circular
    from clframe.strategies.base import Batch


class FrozenQueryCache:
    """Maps (task id, eval slice) -> the query tensor computed for that batch of test images."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._store: dict[tuple[int, int, int], torch.Tensor] = {}

    def __call__(self, batch: "Batch", compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if batch.training or batch.eval_slice is None or not self.enabled:
            return compute(batch.images)
        key = (batch.task_id, *batch.eval_slice)
        cached = self._store.get(key)
        if cached is None or cached.device != batch.images.device:
            cached = self._store[key] = compute(batch.images)
        return cached

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
