"""Adapters: a bottleneck MLP with a residual in every block, + head.

Two placements: ``parallel`` (AdaptFormer, Chen et al., NeurIPS 2022: the adapter reads the
sub-layer's input and its scaled output is added beside the MLP's) and ``sequential`` (Houlsby
et al., ICML 2019: the adapter transforms the sub-layer's output, with its own residual).
``sublayers: attn_mlp`` also adapts the attention sub-layer, as Houlsby's two adapters per block.
Defaults follow LAMDA-PILOT's AdaptFormer settings (``utils/inc_net.py``): bottleneck 64, scale
0.1, ReLU, dropout 0.1, "lora" init (down Kaiming-uniform, up and biases zero), so training
starts from the frozen model's exact output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from clframe import vit
from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, freeze
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class AdapterConfig(StrategyConfig):
    dim: int = option(64, "bottleneck width", min=1)
    scale: float = option(0.1, "the adapter's output is multiplied by this")
    position: str = option("parallel", "parallel to the sub-layer (AdaptFormer) or after it (Houlsby)",
                           choices=("parallel", "sequential"))
    sublayers: str = option("mlp", "which sub-layers get an adapter", choices=("mlp", "attn_mlp"))
    dropout: float = option(0.1, "dropout inside the bottleneck at training", min=0.0)


class Bottleneck(nn.Module):
    """down -> ReLU -> dropout -> up, times ``scale``; zero at initialisation."""

    def __init__(self, width: int, dim: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        self.dropout, self.scale = nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


@register_strategy("adapter")
class Adapter(Strategy):
    """Adapters: bottleneck MLPs in every block and a linear head train."""

    config_cls = AdapterConfig

    def __init__(self, config: AdapterConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        depth, width = len(self.backbone.blocks), self.backbone.embed_dim

        def adapters() -> nn.ModuleList:
            return nn.ModuleList(Bottleneck(width, config.dim, config.scale, config.dropout) for _ in range(depth))

        self.mlp_adapters = adapters()
        self.attn_adapters = adapters() if config.sublayers == "attn_mlp" else None
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def adapt(self, x: torch.Tensor, branch_out: torch.Tensor, adapter: Bottleneck | None) -> torch.Tensor:
        """x + branch(x), the adapter beside the branch (reading x) or after it (reading its output)."""
        if adapter is not None:
            branch_out = branch_out + adapter(x if self.config.position == "parallel" else branch_out)
        return x + branch_out

    def forward(self, batch: Batch) -> ForwardOutput:
        x = vit.embed(self.backbone, batch.images)
        attn_adapters = self.attn_adapters or [None] * len(self.mlp_adapters)
        for blk, attn_adapter, mlp_adapter in zip(self.backbone.blocks, attn_adapters, self.mlp_adapters):
            x = self.adapt(x, vit.attn_branch(blk, x), attn_adapter)
            x = self.adapt(x, vit.mlp_branch(blk, x), mlp_adapter)
        return ForwardOutput(self.head(vit.pooled(self.backbone, x)))
