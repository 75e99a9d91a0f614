"""VPT-Shallow (Prompt Tuning): L learnable tokens after [CLS] at the input of block 0, + head.

Jia et al., "Visual Prompt Tuning", ECCV 2022. The prompts are added after the position
embedding (they carry none), initialised Xavier-uniform as in KMnP/vpt, and shared by every
task; the head reads the model's own pooled output with the prompt tokens dropped ([CLS] for a
[CLS] model).
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
class VptShallowConfig(StrategyConfig):
    length: int = option(5, "prompt tokens L (vpt_deep: per block)", min=1)
    dropout: float = option(0.0, "dropout on the prompt tokens at training", min=0.0)


@register_strategy("vpt_shallow")
class VptShallow(Strategy):
    """VPT-Shallow: L prompt tokens at the input of block 0 and a linear head train."""

    config_cls = VptShallowConfig
    capturable_step = True

    def __init__(self, config: VptShallowConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        bound = vit.patch_prompt_bound(self.backbone)
        self.prompts = nn.Parameter(torch.empty(self.prompt_shape()).uniform_(-bound, bound))
        self.prompt_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def prompt_shape(self) -> tuple[int, ...]:
        return self.config.length, self.backbone.embed_dim

    def forward(self, batch: Batch) -> ForwardOutput:
        x = vit.embed(self.backbone, batch.images)
        x = vit.insert_tokens(self.backbone, x, self.prompt_dropout(self.prompts))
        x = self.backbone.blocks(x)
        return ForwardOutput(self.head(vit.pooled(self.backbone, x, self.config.length)))
