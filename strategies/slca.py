"""SLCA (Zhang et al., ICCV 2023, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model").

Semantics of the authors' ``models/slca.py`` (github.com/GengDavid/SLCA, d5eecd8):

- slow learner: the whole backbone trains at ``backbone_lr_scale`` (1/100) times the head's lr;
  cross-entropy over the current task's logits; earlier classes' head rows are frozen (the
  reference freezes old per-task heads), here restored after every optimizer step;
- after the task: mean and covariance (float64, + 1e-4 I) of every class's features over its
  training images (evaluation preprocessing);
- classifier alignment (from the second task on): a copy of the head is trained for ``ca_epochs``
  on 256 samples per seen class drawn from N(mean * (0.9 + 0.1 (k + 1) / (t + 1)), cov), k the
  class's task and t the current one, shuffled into batches of 256, SGD (momentum 0.9, the head's
  lr and weight decay, cosine schedule), logits divided by the mean of their per-task norms and by
  ``logit_norm`` (0.1); the aligned copy classifies at test time, and the next task trains the
  unaligned head again (the reference's ``fc.backup()`` / ``fc.recall()``).
Samples come from a generator seeded by (run seed, task), so alignment is reproducible and resumable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clframe.class_stats import ClassStatistics
from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, frozen_features
from clframe.ptm import statistics_pass
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class SlcaConfig(StrategyConfig):
    backbone_lr_scale: float = option(0.01, "backbone lr = head lr x this (reference bcb_lrscale 1/100)", min=0.0)
    ca_epochs: int = option(5, "classifier-alignment epochs after each task from the second on", min=0)
    samples_per_class: int = option(256, "Gaussian samples per class and alignment epoch", min=1)
    logit_norm: float = option(0.1, "alignment logits / (mean per-task norm x this); 0 turns it off", min=0.0)
    covariance_ridge: float = option(1e-4, "added to every class covariance's diagonal", min=0.0)
    mean_decay: float = option(0.1, "class k's mean is scaled by 1 - d + d (k + 1) / (t + 1) at task t "
                               "(reference 0.1; 0 keeps the stored means)", min=0.0)


@register_strategy("slca")
class Slca(Strategy):
    """Slow-learning backbone + fast head; the head is realigned on class-Gaussian samples per task."""

    config_cls = SlcaConfig

    def __init__(self, config: SlcaConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)  # every parameter trains (slowly)
        dim = feature_dim(self.backbone)
        self.head = nn.Linear(dim, info.n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("aligned_weight", torch.zeros(info.n_classes, dim))
        self.register_buffer("aligned_bias", torch.zeros(info.n_classes))
        self.register_buffer("home", torch.full((info.n_classes,), -1, dtype=torch.long))
        self.stats = ClassStatistics(info.n_classes, dim, covariance=True)

    def before_task(self, experience: Experience) -> None:
        super().before_task(experience)
        classes = torch.tensor(self.current_classes, device=self.home.device)
        self.home[classes] = torch.where(self.home[classes] < 0, experience.task_id, self.home[classes])

    def configure_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        head = {id(p) for p in self.head.parameters()}
        groups = [{"params": [p for p in params if id(p) not in head], "lr": lr * self.config.backbone_lr_scale},
                  {"params": [p for p in params if id(p) in head], "lr": lr}]
        optimizer = super().configure_optimizer(groups, lr)
        old = sorted(set(self.seen_classes) - set(self.current_classes))
        if old:  # the reference trains a new head per task and freezes the old ones
            kept = self.head.weight.detach()[old].clone(), self.head.bias.detach()[old].clone()

            def restore(*_: Any) -> None:
                with torch.no_grad():
                    self.head.weight[old], self.head.bias[old] = kept
            optimizer.register_step_post_hook(restore)
        return optimizer

    def forward(self, batch: Batch) -> ForwardOutput:
        if batch.training:
            return ForwardOutput(self.head(self.backbone(batch.images)))
        return ForwardOutput(F.linear(frozen_features(self.backbone, batch.images).float(), self.aligned_weight,
                                      self.aligned_bias))

    def after_task(self, experience: Experience) -> None:
        self.stats.to(self.home.device)
        statistics_pass(self, experience, lambda images: frozen_features(self.backbone, images), self.stats)
        self.aligned_weight.copy_(self.head.weight.detach())
        self.aligned_bias.copy_(self.head.bias.detach())
        if self.task_id > 0 and self.config.ca_epochs > 0:
            self.align_classifier()

    def class_gaussians(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Means scaled as the reference scales them, and Cholesky factors of the covariances (float64)."""
        d = self.config.mean_decay
        scale = 1 - d + d * (self.home[classes].double() + 1) / (self.task_id + 1)
        means = self.stats.means()[classes] * scale.unsqueeze(1)
        eye = torch.eye(self.stats.dim, dtype=torch.float64, device=means.device)
        covariances = torch.stack([self.stats.covariance(c) + self.config.covariance_ridge * eye for c in classes])
        return means, torch.linalg.cholesky(covariances)

    def sample_features(self, classes: list[int], generator: torch.Generator,
                        gaussians: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples_per_class`` draws from each class's Gaussian, shuffled: (features, labels).
        ``gaussians`` is ``class_gaussians(classes)`` when the caller already has it (one Cholesky
        factorisation per alignment, not per epoch)."""
        n = self.config.samples_per_class
        means, factors = gaussians if gaussians is not None else self.class_gaussians(classes)
        noise = torch.randn(len(classes), n, self.stats.dim, dtype=torch.float64, generator=generator,
                            device=generator.device)
        samples = (means.unsqueeze(1) + noise @ factors.transpose(1, 2)).reshape(-1, self.stats.dim).float()
        labels = torch.tensor(classes, device=samples.device).repeat_interleave(n)
        order = torch.randperm(len(labels), generator=generator, device=generator.device)
        return samples[order], labels[order]

    def align_classifier(self) -> None:
        from clframe.engine import task_seed  # the engine imports strategies

        run, seen = self.run_config, self.seen_classes
        weight = nn.Parameter(self.head.weight.detach().clone())
        bias = nn.Parameter(self.head.bias.detach().clone())
        optimizer = torch.optim.SGD([weight, bias], lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
        generator = torch.Generator(device=self.home.device).manual_seed(task_seed(run.seed, self.task_id, 6))
        groups = [[i for i, c in enumerate(seen) if int(self.home[c]) == t] for t in range(self.task_id + 1)]
        groups = [g for g in groups if g]
        gaussians = self.class_gaussians(seen)  # the statistics do not change while the head aligns
        seen_ids = torch.tensor(seen, device=self.home.device)
        with torch.enable_grad():
            for epoch in range(self.config.ca_epochs):
                for group in optimizer.param_groups:  # CosineAnnealingLR(T_max=ca_epochs), stepped per epoch
                    group["lr"] = run.lr * (1 + math.cos(math.pi * epoch / self.config.ca_epochs)) / 2
                features, labels = self.sample_features(seen, generator, gaussians)
                targets = torch.searchsorted(seen_ids.to(labels.device), labels)
                for first in range(0, len(labels), self.config.samples_per_class):
                    rows = slice(first, first + self.config.samples_per_class)
                    logits = F.linear(features[rows], weight[seen], bias[seen])
                    if self.config.logit_norm > 0:
                        norms = torch.stack([logits[:, g].norm(dim=1) + 1e-7 for g in groups], 1).mean(1, keepdim=True)
                        logits = logits / norms / self.config.logit_norm
                    loss = F.cross_entropy(logits, targets[rows])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.aligned_weight.copy_(weight.detach())
        self.aligned_bias.copy_(bias.detach())

    def extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
