"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022).

CoOp plus a Meta-Net (Linear-ReLU-Linear, bottleneck width/16) that maps each image's normalised
feature to a shift added to every context vector, so every image has its own prompts. Defaults
from the reference (KaiyangZhou/CoOp, trainers/cocoop.py, configs/trainers/CoCoOp/
vit_b16_c4_ep10_batch1_ctxv1.yaml): 4 context vectors initialised from "a photo of a", SGD lr 0.002.

The cost is the text pass over B x C prompt sequences per step (the reference loops over the
images). Here they go through the text encoder in batched chunks of ``text_chunk`` sequences;
with ``recompute`` a chunk's activations are recomputed in backward instead of stored, which
bounds training memory by one chunk at the price of a second text forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe.config import RunConfig, option
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, StreamInfo
from clframe.strategies.coop import CoOp, CoOpConfig


@dataclass
class CoCoOpConfig(CoOpConfig):
    text_chunk: int = option(4096, "prompt sequences (images x classes) per text-encoder pass", min=1)
    recompute: bool = option(True, "at training, recompute each chunk's text pass in backward instead of "
                             "storing its activations (memory of one chunk)")


@register_strategy("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: CoOp's context plus a per-image shift from a small Meta-Net."""

    config_cls = CoCoOpConfig

    def __init__(self, config: CoCoOpConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        dim = self.backbone.embed_dim
        self.meta_net = nn.Sequential(nn.Linear(dim, dim // 16), nn.ReLU(inplace=True),
                                      nn.Linear(dim // 16, self.backbone.width))

    def forward(self, batch: Batch) -> ForwardOutput:
        image = self.backbone.encode_image(batch.images)
        classes = self.logit_classes(batch.training)
        context = self.context(classes)
        context = context[None] if context.dim() == 2 else context       # [1 or n, M, width]
        shifted = context[None] + self.meta_net(image)[:, None, None, :]  # [B, 1 or n, M, width]
        text = self.prompts.encode(self.backbone, shifted, classes, chunk=self.config.text_chunk,
                                   recompute=self.config.recompute)      # [B, n, embed_dim]
        logits = self.backbone.logit_scale() * torch.einsum("be,bne->bn", image, text.to(image.dtype))
        return ForwardOutput(self.all_class_logits(logits, classes))
