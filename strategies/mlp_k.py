"""Mlp-k: a frozen backbone and a k-layer MLP classifier.

VPT's "Mlp-k" baseline (Jia et al., ECCV 2022; KMnP/vpt ``models/mlp.py``): hidden layers of the
backbone's feature width, each Linear -> ReLU -> norm -> dropout 0.1. LayerNorm stands in for
VPT's BatchNorm1d, which keeps running statistics across tasks and fails on a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, freeze, frozen_features
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class MlpKConfig(StrategyConfig):
    k: int = option(3, "linear layers in the classifier (1 is a linear probe)", min=1)
    hidden: int = option(0, "hidden width; 0 means the backbone's feature width", min=0)
    dropout: float = option(0.1, "dropout after each hidden layer at training", min=0.0)


@register_strategy("mlp_k")
class MlpK(Strategy):
    """Mlp-k: only a k-layer MLP classifier on the frozen features trains."""

    config_cls = MlpKConfig
    capturable_step = True

    def __init__(self, config: MlpKConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        width = feature_dim(self.backbone)
        hidden = config.hidden or width
        layers: list[nn.Module] = []
        for i in range(config.k - 1):
            layers += [nn.Linear(width if i == 0 else hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                       nn.Dropout(config.dropout)]
        layers.append(nn.Linear(hidden if config.k > 1 else width, info.n_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, batch: Batch) -> ForwardOutput:
        return ForwardOutput(self.head(frozen_features(self.backbone, batch.images)))
