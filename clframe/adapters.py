"""Bottleneck adapters in a timm ViT: the one implementation the adapter strategies share.

Two placements: ``parallel`` (AdaptFormer, Chen et al., NeurIPS 2022: the adapter reads the
sub-layer's input and its scaled output is added beside the sub-layer's) and ``sequential``
(Houlsby et al., ICML 2019: the adapter transforms the sub-layer's output, with its own residual).
Used by the ``adapter`` strategy (one trained set, + head), APER and RanPAC (a set trained on the
first task only) and EASE (a fresh set per task).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from clframe import vit


class Bottleneck(nn.Module):
    """down -> ReLU -> dropout -> up, times ``scale``; zero at initialisation ("lora" init: down
    Kaiming-uniform, up and biases zero), so training starts from the frozen model's exact output."""

    def __init__(self, width: int, dim: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        self.dropout, self.scale = nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


def bottlenecks(backbone: nn.Module, dim: int, scale: float, dropout: float) -> nn.ModuleList:
    """One ``Bottleneck`` per block of ``backbone``."""
    return nn.ModuleList(Bottleneck(backbone.embed_dim, dim, scale, dropout) for _ in backbone.blocks)


def _adapt(x: torch.Tensor, branch_out: torch.Tensor, adapter: Bottleneck | None, position: str) -> torch.Tensor:
    """x + branch(x), the adapter beside the branch (reading x) or after it (reading its output)."""
    if adapter is not None:
        branch_out = branch_out + adapter(x if position == "parallel" else branch_out)
    return x + branch_out


def adapted_tokens(backbone: nn.Module, images: torch.Tensor, mlp_adapters: nn.ModuleList,
                   attn_adapters: nn.ModuleList | None = None, position: str = "parallel") -> torch.Tensor:
    """The last block's tokens of ``backbone`` with an adapter beside (or after) every MLP sub-layer,
    and every attention sub-layer too when ``attn_adapters`` is given."""
    x = vit.embed(backbone, images)
    attn = attn_adapters if attn_adapters is not None else [None] * len(mlp_adapters)
    for blk, attn_adapter, mlp_adapter in zip(backbone.blocks, attn, mlp_adapters):
        x = _adapt(x, vit.attn_branch(blk, x), attn_adapter, position)
        x = _adapt(x, vit.mlp_branch(blk, x), mlp_adapter, position)
    return x


def adapted_features(backbone: nn.Module, images: torch.Tensor, mlp_adapters: nn.ModuleList,
                     position: str = "parallel") -> torch.Tensor:
    """Pooled pre-logits features of the adapted backbone (what a head or a prototype reads)."""
    return vit.pooled(backbone, adapted_tokens(backbone, images, mlp_adapters, None, position))
