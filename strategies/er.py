"""ER (experience replay; Chaudhry et al. 2019, mammoth ``models/er.py``): a reservoir buffer of
past images is mixed into every training batch.

Each step appends ``replay_size`` buffer images (augmented by the engine as the current ones) and
minimises cross-entropy over current and replayed rows together; afterwards the step's current
images enter the buffer by reservoir sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clframe.config import option
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Replay
from clframe.strategies.baseline import RehearsalConfig, RehearsalStrategy


@dataclass
class ERConfig(RehearsalConfig):
    replay_size: int = option(0, "buffer images appended to each batch (0: the batch size, as mammoth's "
                              "minibatch_size default)", min=0)


@register_strategy("er")
class ER(RehearsalStrategy):
    """Experience replay: cross-entropy on the current batch plus a reservoir-buffer batch."""

    config_cls = ERConfig

    def replay_count(self) -> int:
        return self.config.replay_size or self.run_config.batch_size

    def replay(self, n_current: int) -> Replay | None:
        return self.buffer.sample(self.replay_count())

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        loss = super().loss(out, batch, class_mask)  # mean cross-entropy over current and replayed rows
        n = batch.n_current if batch.n_current is not None else len(batch.labels)
        self.buffer.add_reservoir(self.current_rows(batch), batch.labels[:n], self.task_id)
        return loss
