"""RanPAC (McDonnell et al., NeurIPS 2023, "RanPAC: Random Projections and Pre-trained Models for
Continual Learning"): first-session adaptation, a fixed random projection with ReLU, and a ridge
regression head from accumulated second-order statistics.

Semantics of the authors' code (github.com/RanPAC/RanPAC ``RanPAC.py``, 012927f):

- task 0 trains an AdaptFormer adapter (or SSF) with a cosine head, as APER does (``_train``:
  PETL on the first task only, then ``freeze_backbone``);
- ``setup_RP``: W ~ N(0, 1) of shape [D, M], fixed for the run (here drawn from the run's seed,
  so a resumed run rebuilds the same W without storing it);
- ``replace_fc``, every task: h = ReLU(f W) of each training image (evaluation preprocessing);
  G += h^T h, Q += h^T Y; lambda from ``optimise_ridge_parameter``: the grid 10^-8..10^8, fit on the
  first 80% of the task's (shuffled) rows, least mean squared error on the other 20%; the head is
  W_o = ((G + lambda I)^-1 Q)^T and logits are h W_o^T (no normalisation; LAMDA-PILOT's port
  feeds W_o into a CosineLinear instead). G and Q are float64 here (float32 in the reference).
On a domain-incremental stream G and Q simply keep accumulating (the reference's DIL branch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clframe.class_stats import ClassStatistics
from clframe.config import option
from clframe.models import feature_dim
from clframe.ptm import choose_ridge, ridge_weights, statistics_pass
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.aper import Aper, AperConfig
from clframe.strategies.base import TaskReport

REFERENCE_M, REFERENCE_D = 10000, 768  # the reference's projection size, for ViT-B/16's 768 features


@dataclass
class RanpacConfig(AperConfig):
    projection_dim: int | None = option(None, "random projection size M; None keeps the reference's "
                                        "M/D = 10000/768 (10000 on ViT-B, 2500 at width 192)", min=1)
    val_fraction: float = option(0.2, "share of each task's training rows held out to choose lambda", min=0.01)


@register_strategy("ranpac")
class Ranpac(Aper):
    """First-task PEFT, then ReLU(random projection) features and a ridge head from G and Q."""

    config_cls = RanpacConfig

    def feature_width(self) -> int:
        self.build_peft()
        width = feature_dim(self.backbone)
        m = self.config.projection_dim or round(REFERENCE_M * width / REFERENCE_D)
        generator = torch.Generator().manual_seed(self.run_config.seed)
        self.register_buffer("projection", torch.randn(width, m, generator=generator), persistent=False)
        self.register_buffer("head", torch.zeros(self.info.n_classes, m))
        self.chosen_ridge = float("nan")
        return m

    def make_statistics(self, dim: int) -> ClassStatistics:
        return ClassStatistics(self.info.n_classes, dim, ridge=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        adapted = self.adapted(images)
        with torch.autocast(adapted.device.type, enabled=False):  # the projection in float32
            return torch.relu(adapted.float() @ self.projection)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.head.T

    def after_task(self, experience: Experience) -> None:
        from clframe.engine import task_seed  # the engine imports strategies

        kept: list[torch.Tensor] = []

        def keep(images: torch.Tensor) -> torch.Tensor:
            kept.append(self.features(images))
            return kept[-1]

        self.stats.to(self.head.device)
        statistics_pass(self, experience, keep, self.stats)
        self.prototypes.copy_(self.stats.means().float())
        projected, labels = torch.cat(kept), experience.train_labels.to(self.head.device)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            task_seed(self.run_config.seed, experience.task_id, 5))).to(self.head.device)
        targets = F.one_hot(labels, self.info.n_classes)
        self.chosen_ridge, _ = choose_ridge(projected[order], targets[order], train_fraction=1 - self.config.val_fraction)
        self.head.copy_(ridge_weights(self.stats.gram, self.stats.class_sums, self.chosen_ridge).float())

    def task_report(self) -> TaskReport:
        report = super().task_report()
        report.metrics.update({"ranpac/lambda": self.chosen_ridge, "ranpac/projection_dim": float(self.head.shape[1]),
                               "ranpac/log10_lambda": float(torch.tensor(self.chosen_ridge).log10())})
        return report

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "chosen_ridge": self.chosen_ridge}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.chosen_ridge = float(state["chosen_ridge"])
