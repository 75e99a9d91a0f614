"""Linear probe: a frozen backbone and one linear head over the classes seen so far."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clframe.config import RunConfig
from clframe.models import create_backbone, feature_dim, freeze, frozen_features
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class LinearConfig(StrategyConfig):
    pass


@register_strategy("linear")
class Linear(Strategy):
    """Only the head trains; features come from the frozen backbone without autograd."""

    config_cls = LinearConfig
    capturable_step = True

    def __init__(self, config: LinearConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        return ForwardOutput(self.head(frozen_features(self.backbone, batch.images)))
