"""BitFit: only the backbone's bias terms train, + head.

Ben Zaken et al., ACL 2022; VPT's "Bias" baseline (``tinytl-bias`` in KMnP/vpt: every parameter
whose name contains ``bias``). Here: every backbone parameter named ``*bias`` (attention, MLP,
patch embedding and LayerNorm biases).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clframe.config import RunConfig
from clframe.models import create_backbone, feature_dim
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class BitfitConfig(StrategyConfig):
    pass


@register_strategy("bitfit")
class Bitfit(Strategy):
    """BitFit: the backbone's bias terms and a linear head train."""

    config_cls = BitfitConfig
    capturable_step = True

    def __init__(self, config: BitfitConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(name.endswith("bias"))
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        features = self.backbone.forward_head(self.backbone.forward_features(batch.images), pre_logits=True)
        return ForwardOutput(self.head(features))
