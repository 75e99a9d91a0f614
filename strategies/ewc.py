"""Online EWC (Schwarz et al. 2018; mammoth ``models/ewc_on.py``): a diagonal Fisher at each task's
end and a quadratic penalty that holds the trainable weights near their values then.

After task t, for every training image x with label y (engine-prepared with the training
augmentation, as the reference's train loader; dropout off), with p = softmax over the logits
training uses::

    F_t = mean over images of  p(y|x) * (d log p(y|x) / d theta)^2      (one backward per image)
    F   = gamma * F + F_t,   theta* = theta
    loss = CE + lambda * sum F * (theta - theta*)^2

The reference divides by (number of batches x batch size), which overcounts a short last batch;
this divides by the number of images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clframe.config import option
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.baseline import NetworkConfig, NetworkStrategy


@dataclass
class EWCConfig(NetworkConfig):
    e_lambda: float = option(10.0, "weight of the quadratic penalty", min=0.0)
    gamma: float = option(1.0, "decay of the previous Fisher at each task (1: sum over tasks)", min=0.0)


@register_strategy("ewc")
class EWC(NetworkStrategy):
    """Online EWC: cross-entropy plus lambda * sum F (theta - theta*)^2 over the trainable weights."""

    config_cls = EWCConfig

    def __init__(self, config: EWCConfig, run, info) -> None:
        super().__init__(config, run, info)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor:
        params = self.trainable_named()
        total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
        for name, fisher in self.fisher.items():
            total = total + (fisher * (params[name].float() - self.anchor[name]) ** 2).sum()
        return self.config.e_lambda * total

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        loss = super().loss(out, batch, class_mask)
        return loss + self.penalty() if self.fisher else loss

    def fisher_diagonal(self, batches) -> dict[str, torch.Tensor]:
        """The reference's per-image estimate over ``batches`` (see the module docstring)."""
        params = self.trainable_named()
        fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        mask = self.train_class_mask()
        count = 0
        for batch in batches:
            for i in range(len(batch.labels)):
                one = Batch(batch.images[i:i + 1], batch.labels[i:i + 1], batch.task_id, True)
                with self.autocast():
                    logits = self(one).logits.float()
                if mask is not None:
                    logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
                log_p = F.log_softmax(logits, dim=1)[0, one.labels[0]]
                grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
                weight = log_p.detach().exp()
                for (name, _), grad in zip(params.items(), grads):
                    if grad is not None:
                        fisher[name] += weight * grad.float() ** 2
                count += 1
        return {name: value / max(count, 1) for name, value in fisher.items()}

    def after_task(self, experience: Experience) -> None:
        super().after_task(experience)
        was_training = self.training
        self.eval()
        new = self.fisher_diagonal(self.task_batches(experience, augment=True))
        self.train(was_training)
        for name, value in new.items():
            self.fisher[name] = self.config.gamma * self.fisher[name] + value if name in self.fisher else value
        self.anchor = {name: p.detach().float().clone() for name, p in self.trainable_named().items()}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        device = self.device()
        self.fisher = {k: v.to(device) for k, v in state["fisher"].items()}
        self.anchor = {k: v.to(device) for k, v in state["anchor"].items()}
