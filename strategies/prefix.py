"""Prefix-Tuning / P-Tuning v2: learnable key/value prefixes in every attention layer, + head.

Li & Liang, ACL 2021; Liu et al. (P-Tuning v2), ACL 2022. Each block's attention gets L extra
keys and L extra values in front of its own; queries come from the tokens only, so the sequence
length and the head input ([CLS]) do not change. The parameters are laid out as DualPrompt's
prefix prompts, ``[depth, 2 (key, value), L, D]``, initialised uniform(-1, 1) as dualprompt-pytorch
does. ``reparam_hidden > 0`` produces them instead from an [L, D] embedding through
Linear-Tanh-Linear (P-Tuning v2's ``prefix_projection``, Li & Liang's reparameterisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe import vit
from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, freeze
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class PrefixConfig(StrategyConfig):
    length: int = option(5, "prefix length L (keys and values per attention layer)", min=0)
    reparam_hidden: int = option(0, "hidden width of the reparameterisation MLP; 0 learns the prefixes "
                                 "directly", min=0)


@register_strategy("prefix")
class Prefix(Strategy):
    """Prefix-tuning: per-layer key/value prefixes and a linear head train."""

    config_cls = PrefixConfig
    capturable_step = True

    def __init__(self, config: PrefixConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        depth, width = len(self.backbone.blocks), self.backbone.embed_dim
        if config.reparam_hidden:
            self.prefix_embedding = nn.Parameter(torch.empty(config.length, width).uniform_(-1, 1))
            self.reparam = nn.Sequential(nn.Linear(width, config.reparam_hidden), nn.Tanh(),
                                         nn.Linear(config.reparam_hidden, depth * 2 * width))
        else:
            self.prefix = nn.Parameter(torch.empty(depth, 2, config.length, width).uniform_(-1, 1))
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def prefixes(self) -> torch.Tensor:
        """[depth, 2, L, D]: key and value prefixes of every block."""
        if not self.config.reparam_hidden:
            return self.prefix
        depth, width = len(self.backbone.blocks), self.backbone.embed_dim
        return self.reparam(self.prefix_embedding).reshape(-1, depth, 2, width).permute(1, 2, 0, 3)

    def forward(self, batch: Batch) -> ForwardOutput:
        x = vit.embed(self.backbone, batch.images)
        size = x.shape[0]
        for blk, (keys, values) in zip(self.backbone.blocks, self.prefixes()):
            x = vit.block(blk, x, vit.head_split(blk.attn, keys, size), vit.head_split(blk.attn, values, size))
        return ForwardOutput(self.head(vit.pooled(self.backbone, x)))
