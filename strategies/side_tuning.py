"""Side-tuning: a small side network's features blended with the frozen backbone's, + head.

Zhang et al., "Side-Tuning", ECCV 2020; VPT's "Sidetune" baseline (KMnP/vpt ``vit_models.py``):
features = a·backbone(x) + (1 - a)·W·side(x), a = sigmoid(learned scalar) starting at 0.5, W a
bias-free projection to the backbone's width. VPT's side network is a pretrained AlexNet; the
default here is a 3-layer stride-2 conv net (GroupNorm, GELU, global average pool) trained from
scratch, which needs no download and fits any input size; ``side_model`` may name any timm
model instead (e.g. ``resnet18`` with ``side_pretrained: true``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, freeze, frozen_features
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class SideTuningConfig(StrategyConfig):
    side_model: str = option("conv", "side network: 'conv' (small conv net) or a timm model name")
    side_pretrained: bool = option(False, "load timm's pretrained weights for a timm side model")
    channels: list[int] = option(None, "widths of the conv side network's stride-2 layers",
                                 factory=lambda: [32, 64, 128])
    alpha_init: float = option(0.5, "initial weight a of the backbone's features in the blend")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"alpha_init must lie strictly between 0 and 1, got {self.alpha_init}")
        if not self.channels:
            raise ValueError("channels needs at least one width, e.g. [32, 64, 128]")


def conv_side_network(channels: list[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for c_in, c_out in zip([3, *channels], channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels[-1]


@register_strategy("side_tuning")
class SideTuning(Strategy):
    """Side-tuning: a side network, its projection, the blend weight and a linear head train."""

    config_cls = SideTuningConfig
    capturable_step = True

    def __init__(self, config: SideTuningConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        if config.side_model == "conv":
            self.side, side_width = conv_side_network(config.channels)
        else:
            side_run = dataclasses.replace(run, model=config.side_model, pretrained=config.side_pretrained,
                                           weights=None, model_kwargs={}, image_size=None)
            self.side = create_backbone(side_run)
            side_width = feature_dim(self.side)
        width = feature_dim(self.backbone)
        self.side_projection = nn.Linear(side_width, width, bias=False)
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(config.alpha_init / (1 - config.alpha_init))))
        self.head = nn.Linear(width, info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        alpha = torch.sigmoid(self.alpha_logit)
        side = self.side_projection(self.side(batch.images))
        features = alpha * frozen_features(self.backbone, batch.images) + (1 - alpha) * side
        return ForwardOutput(self.head(features))
