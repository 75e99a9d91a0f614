"""A user's strategy: the built-in linear probe with a cosine classifier instead of a linear one.

Run it without registering anything, from a folder where ``examples`` is importable:

    clframe run --strategy examples.cosine_linear:CosineLinear --set examples.cosine_linear:CosineLinear.scale=10

Everything else (backbone, freezing, the hooks the engine calls) comes from ``Linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from clframe.config import option
from clframe.models import frozen_features
from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.linear import Linear, LinearConfig


@dataclass
class CosineLinearConfig(LinearConfig):
    scale: float = option(16.0, "logits are cosine similarities times this", min=0.0)


class CosineLinear(Linear):
    """Linear probe whose logits are scaled cosine similarities to the class weights."""

    config_cls = CosineLinearConfig

    def __init__(self, config: CosineLinearConfig, run, info) -> None:
        super().__init__(config, run, info)
        self.head.bias = None  # a cosine classifier has no bias

    def forward(self, batch: Batch) -> ForwardOutput:
        features = F.normalize(frozen_features(self.backbone, batch.images), dim=-1)
        return ForwardOutput(self.config.scale * F.linear(features, F.normalize(self.head.weight, dim=-1)))
