"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models:
generalizability and adaptivity are all you need", IJCV 2024): no training at all.

After each task the frozen backbone's pooled feature of every training image (evaluation
preprocessing, no augmentation) is added to running per-class sums; a class's prototype is its
mean feature and the classifier is the cosine similarity to the prototypes (LAMDA-PILOT
``models/simplecil.py``: ``replace_fc`` writes the class means into a CosineLinear). On a
domain-incremental stream the same classes come back in every task and their means keep
accumulating over all domains seen.

APER and RanPAC subclass this class: they change ``features`` (and RanPAC the head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clframe.class_stats import ClassStatistics
from clframe.config import RunConfig
from clframe.models import create_backbone, feature_dim, freeze, frozen_features
from clframe.ptm import cosine_logits, statistics_pass
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport


@dataclass
class SimpleCILConfig(StrategyConfig):
    pass


@register_strategy("simplecil")
class SimpleCIL(Strategy):
    """Cosine classifier over class-mean features of the frozen backbone; nothing trains."""

    config_cls = SimpleCILConfig

    def __init__(self, config: Any, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        dim = self.feature_width()
        self.stats = self.make_statistics(dim)
        self.register_buffer("prototypes", torch.zeros(info.n_classes, dim))

    # ----- what subclasses change -----
    def feature_width(self) -> int:
        """Width of ``features``' output (the prototypes' width)."""
        return feature_dim(self.backbone)

    def make_statistics(self, dim: int) -> ClassStatistics:
        return ClassStatistics(self.info.n_classes, dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features prototypes are built from and compared with."""
        return frozen_features(self.backbone, images)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.prototypes)

    # ----- hooks -----
    def forward(self, batch: Batch) -> ForwardOutput:
        return ForwardOutput(self.classify(self.features(batch.images)))

    def after_task(self, experience: Experience) -> None:
        super().after_task(experience)
        self.stats.to(self.prototypes.device)
        statistics_pass(self, experience, self.features, self.stats)
        self.prototypes.copy_(self.stats.means().float())

    def task_report(self) -> TaskReport:
        norms = self.prototypes[self.seen_classes].norm(dim=1)
        return TaskReport({"prototype_norm/mean": float(norms.mean()), "prototype_norm/min": float(norms.min()),
                           "prototype_norm/max": float(norms.max())})

    def extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
