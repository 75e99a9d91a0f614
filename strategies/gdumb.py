"""GDumb (Prabhu et al., ECCV 2020): a greedy class-balanced buffer, and a learner retrained from
its initial state on the buffer alone after every task.

At each task the task's images are offered to the buffer in order (``RehearsalBuffer.add_balanced``),
the trainable weights are put back to their values at construction, and the engine trains them on
the buffer's images for ``epochs`` x ``passes`` passes. mammoth's ``models/gdumb.py`` fills a
reservoir buffer and trains only after the last task; the paper's sampler is class-balanced and
its learner is retrained at every task (so that the accuracy matrix means something), which is what
this does. The reference's cutmix and SGDR schedule are not reproduced (the engine's constant lr).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clframe.config import RunConfig, option
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import StreamInfo
from clframe.strategies.baseline import RehearsalConfig, RehearsalStrategy


@dataclass
class GDumbConfig(RehearsalConfig):
    passes: int = option(10, "times the buffer is repeated in one epoch (GDumb fits its small buffer for many "
                         "epochs; this multiplies run.epochs without changing it for the other strategies)", min=1)


@register_strategy("gdumb")
class GDumb(RehearsalStrategy):
    """GDumb: greedy class-balanced buffer; the trainable part is retrained from scratch on it."""

    config_cls = GDumbConfig

    def __init__(self, config: GDumbConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        # The starting point of every task's fit (the seed-determined init, the same after a resume).
        self.initial = {name: p.detach().clone() for name, p in self.trainable_named().items()}

    def train_set(self, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        images = experience.train_images.to(self.device())
        self.buffer.add_balanced(images, experience.train_labels, experience.task_id)
        with torch.no_grad():
            for name, p in self.trainable_named().items():
                p.copy_(self.initial[name])
        buffered, labels = self.buffer.contents()
        return buffered.repeat(self.config.passes, 1, 1, 1), labels.repeat(self.config.passes)
