"""LwF (Learning without Forgetting; Li & Hoiem 2017; mammoth ``models/lwf.py``, PyCIL ``models/lwf.py``):
distillation from the previous task's model on the current task's images.

    loss = CE + alpha * KD,   KD = -mean_x sum_c softmax(z_old / T)_c * log softmax(z / T)_c

over the classes seen before this task (class-IL: the old classes; domain-IL: every class). The
teacher is the trainable weights at the previous task's end, run on the same augmented batch as
PyCIL does; mammoth precomputes its logits on the unaugmented images once per task (so teacher
and student see different crops) and first warms up the new classes' head rows, neither of which
is done here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clframe.config import option
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.baseline import NetworkConfig, NetworkStrategy


def distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's softened distributions (batch mean)."""
    target = F.softmax(teacher.float() / temperature, dim=1)
    return -(target * F.log_softmax(logits.float() / temperature, dim=1)).sum(dim=1).mean()


@dataclass
class LwFConfig(NetworkConfig):
    alpha: float = option(3.0, "weight of the distillation term", min=0.0)
    temperature: float = option(2.0, "softmax temperature of the distillation", min=1e-6)


@register_strategy("lwf")
class LwF(NetworkStrategy):
    """LwF: cross-entropy plus distillation of the old classes' outputs from the previous model."""

    config_cls = LwFConfig

    def before_task(self, experience: Experience) -> None:
        # before this task's join; on the device once, not copied there at every step
        self.old_classes = torch.tensor(self.seen_classes, dtype=torch.long, device=self.device())
        super().before_task(experience)

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        loss = super().loss(out, batch, class_mask)
        if not self.has_teacher or not len(self.old_classes):
            return loss
        old = self.old_classes
        teacher = self.teacher_logits(batch)
        return loss + self.config.alpha * distillation(out.logits[:, old], teacher[:, old], self.config.temperature)

    def after_task(self, experience: Experience) -> None:
        super().after_task(experience)
        self.keep_teacher()
