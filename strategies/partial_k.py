"""Partial-k: the last k blocks, the final norm (and any pooling layer after it) train, + head.

VPT's "Partial-1" baseline (Jia et al., ECCV 2022; Yosinski et al., NeurIPS 2014). The frozen
lower blocks run without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe import vit
from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.models import create_backbone, feature_dim, freeze
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class PartialKConfig(StrategyConfig):
    k: int = option(1, "how many of the last blocks train (0: only the final norm and the head)", min=0)


@register_strategy("partial_k")
class PartialK(Strategy):
    """Partial-k: the last k blocks, the final norm and a linear head train."""

    config_cls = PartialKConfig
    capturable_step = True

    def __init__(self, config: PartialKConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        depth = len(self.backbone.blocks)
        if config.k > depth:
            raise ClframeError(f"partial_k.k={config.k} but model '{run.model}' has {depth} blocks")
        self.split = depth - config.k
        top = [*self.backbone.blocks[self.split:], self.backbone.norm, self.backbone.fc_norm,
               getattr(self.backbone, "attn_pool", None)]
        for module in top:
            if module is not None:
                module.requires_grad_(True)
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        with torch.no_grad():
            x = self.backbone.blocks[:self.split](vit.embed(self.backbone, batch.images))
        x = self.backbone.blocks[self.split:](x)
        return ForwardOutput(self.head(vit.pooled(self.backbone, x)))
