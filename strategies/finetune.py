"""Full fine-tuning: every weight trains on each task in turn, the forgetting lower bound."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clframe.config import RunConfig
from clframe.models import create_backbone, feature_dim
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class FinetuneConfig(StrategyConfig):
    pass


@register_strategy("finetune")
class Finetune(Strategy):
    """Full fine-tuning: every weight trains on each task in turn (the forgetting lower bound)."""

    config_cls = FinetuneConfig
    capturable_step = True

    def __init__(self, config: FinetuneConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        features = self.backbone.forward_head(self.backbone.forward_features(batch.images), pre_logits=True)
        return ForwardOutput(self.head(features))
