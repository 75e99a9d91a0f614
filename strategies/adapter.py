"""Adapters: a bottleneck MLP with a residual in every block, + head.

Two placements: ``parallel`` (AdaptFormer, Chen et al., NeurIPS 2022: the adapter reads the
sub-layer's input and its scaled output is added beside the MLP's) and ``sequential`` (Houlsby
et al., ICML 2019: the adapter transforms the sub-layer's output, with its own residual).
``sublayers: attn_mlp`` also adapts the attention sub-layer, as Houlsby's two adapters per block.
The modules live in ``clframe.adapters`` (shared with APER, RanPAC and EASE). Defaults follow
LAMDA-PILOT's AdaptFormer settings (``utils/inc_net.py``): bottleneck 64, scale 0.1, ReLU, dropout
0.1, "lora" init (down Kaiming-uniform, up and biases zero), so training starts from the frozen
model's exact output.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clframe import vit
from clframe.adapters import adapted_tokens, bottlenecks
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


@register_strategy("adapter")
class Adapter(Strategy):
    """Adapters: bottleneck MLPs in every block and a linear head train."""

    config_cls = AdapterConfig
    capturable_step = True

    def __init__(self, config: AdapterConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)

        def adapters() -> nn.ModuleList:
            return bottlenecks(self.backbone, config.dim, config.scale, config.dropout)

        self.mlp_adapters = adapters()
        self.attn_adapters = adapters() if config.sublayers == "attn_mlp" else None
        self.head = nn.Linear(feature_dim(self.backbone), info.n_classes)

    def forward(self, batch: Batch) -> ForwardOutput:
        x = adapted_tokens(self.backbone, batch.images, self.mlp_adapters, self.attn_adapters, self.config.position)
        return ForwardOutput(self.head(vit.pooled(self.backbone, x)))
