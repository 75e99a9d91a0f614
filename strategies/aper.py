"""APER / ADAM (Zhou et al., IJCV 2024, "Revisiting class-incremental learning with pre-trained
models: generalizability and adaptivity are all you need"): adapt on the first task only, then
SimpleCIL over the frozen and the adapted features side by side.

Task 0 trains a PEFT module (an AdaptFormer adapter per block, or SSF) with a cosine head over the
task's classes (LAMDA-PILOT ``models/aper_adapter.py`` / ``aper_ssf.py``, SimpleVitNet's
CosineLinear); afterwards nothing trains again, so the engine skips every later training loop and
the module stays bit-identical. The prototypes, for every task including the first, are class
means of ``[frozen feature, adapted feature]`` (PILOT's MultiBranchCosineIncrementalNet
concatenates the pre-trained and the tuned backbones' features), compared by cosine.

RanPAC subclasses this class for its own first-session adaptation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from clframe.adapters import adapted_features, bottlenecks
from clframe.config import option
from clframe.models import feature_dim, frozen_features
from clframe.ptm import CosineHead
from clframe.registry import register_strategy
from clframe.ssf import SSF
from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.simplecil import SimpleCIL, SimpleCILConfig


@dataclass
class AperConfig(SimpleCILConfig):
    peft: str = option("adapter", "module trained on the first task: AdaptFormer adapters or SSF",
                       choices=("adapter", "ssf"))
    adapter_dim: int = option(64, "adapter bottleneck width (PILOT ffn_num)", min=1)
    adapter_scale: float = option(0.1, "adapter output scale (PILOT ffn_adapter_scalar)")
    adapter_dropout: float = option(0.1, "dropout inside the adapter at training", min=0.0)
    first_session: bool = option(True, "adapt on the first task (false: features of the frozen model only)")


@register_strategy("aper")
class Aper(SimpleCIL):
    """First-task PEFT adaptation, then prototypes over [frozen, adapted] features; nothing trains later."""

    config_cls = AperConfig

    def feature_width(self) -> int:  # called once by SimpleCIL.__init__, after the backbone exists
        self.build_peft()
        return 2 * feature_dim(self.backbone)

    def build_peft(self) -> None:
        config, width = self.config, feature_dim(self.backbone)
        if config.peft == "ssf":
            self.ssf = SSF(self.backbone)
        else:
            self.adapters = bottlenecks(self.backbone, config.adapter_dim, config.adapter_scale, config.adapter_dropout)
        self.first_head = CosineHead(width, self.info.n_classes)

    def adapted(self, images: torch.Tensor) -> torch.Tensor:
        """Features of the backbone with the first-task module (the module is the identity until trained)."""
        if not self.config.first_session:
            return frozen_features(self.backbone, images)
        if self.config.peft == "ssf":
            return self.ssf.features(self.backbone, images)
        return adapted_features(self.backbone, images, self.adapters)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        frozen = frozen_features(self.backbone, images)
        return torch.cat([frozen, self.adapted(images) if self.config.first_session else frozen], dim=1)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The PEFT module and its head during the first task; nothing afterwards (the engine then
        skips training). Their requires_grad stays on so the GPU fast path never casts them."""
        if self.task_id > 0 or not self.config.first_session:
            return iter(())
        peft = self.ssf if self.config.peft == "ssf" else self.adapters
        return iter([*peft.parameters(), *self.first_head.parameters()])

    def forward(self, batch: Batch) -> ForwardOutput:
        if batch.training:  # only ever during task 0
            return ForwardOutput(self.first_head(self.adapted(batch.images)))
        return super().forward(batch)
