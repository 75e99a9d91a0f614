"""VPT-Deep: a fresh set of L tokens at the input of every block, + head.

Jia et al., "Visual Prompt Tuning", ECCV 2022: before block i > 0 the L prompt outputs of block
i-1 are dropped and replaced by block i's own prompts, so every block sees N + L tokens. Only the
prompts' shape ([depth, L, D]) and the forward differ from VPT-Shallow.
"""
from __future__ import annotations

from dataclasses import dataclass

from clframe import vit
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.vpt_shallow import VptShallow, VptShallowConfig


@dataclass
class VptDeepConfig(VptShallowConfig):
    pass


@register_strategy("vpt_deep")
class VptDeep(VptShallow):
    """VPT-Deep: L prompt tokens per block (replacing the previous block's) and a linear head train."""

    config_cls = VptDeepConfig
    capturable_step = True

    def prompt_shape(self) -> tuple[int, ...]:
        return len(self.backbone.blocks), self.config.length, self.backbone.embed_dim

    def forward(self, batch: Batch) -> ForwardOutput:
        length = self.config.length
        x = vit.embed(self.backbone, batch.images)
        for i, blk in enumerate(self.backbone.blocks):
            if i > 0:
                x = vit.drop_tokens(self.backbone, x, length)
            x = blk(vit.insert_tokens(self.backbone, x, self.prompt_dropout(self.prompts[i])))
        return ForwardOutput(self.head(vit.pooled(self.backbone, x, length)))
