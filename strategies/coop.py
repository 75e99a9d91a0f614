"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

M learned context vectors take the place of a hand-written prompt's words before the class name;
both CLIP encoders stay frozen and logits are CLIP's frozen logit scale x cosine. Defaults follow
the reference (KaiyangZhou/CoOp, trainers/coop.py, configs/trainers/CoOp/vit_b16.yaml): 16
vectors drawn from N(0, 0.02), class token at the end, one shared context; configs/coop.yaml has
its SGD settings. In class-IL one context trains across tasks. Only the classes whose logits can
count are encoded (the train mask's classes at training, the seen ones at test); the rest get
-inf. The text side does not depend on the image, so at test it runs once per evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe.clip_backbone import ClipBackbone, ClipOptions, prompt_class_names
from clframe.config import RunConfig, option
from clframe.registry import register_strategy
from clframe.text_prompts import EvalCache, PromptSlots, class_prompt, init_context
from clframe.scenarios.base import CLASS_IL
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class CoOpConfig(StrategyConfig, ClipOptions):
    n_ctx: int = option(16, "number of learned context vectors", min=1)
    position: str = option("end", "class name after the context (end), in its middle, or before it (front)",
                           choices=("end", "middle", "front"))
    class_specific: bool = option(False, "one context per class (CoOp's CSC) instead of one shared by all")
    init: str = option("", "phrase whose token embeddings initialise the context, e.g. 'a photo of a' (its "
                       "token count replaces n_ctx, as in CoOp); empty: N(0, 0.02)")


@register_strategy("coop")
class CoOp(Strategy):
    """CoOp: learned context words in CLIP's text prompt; both encoders frozen."""

    config_cls = CoOpConfig
    backbone_kind = "open_clip"  # scenarios give it their CLIP model (backbones.open_clip)

    def __init__(self, config: CoOpConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        names = prompt_class_names(info, self.name)
        self.backbone = ClipBackbone.create(run, config, self.name)
        copies = len(names) if config.class_specific else None
        self.ctx = nn.Parameter(init_context(self.backbone, config.n_ctx, config.init, copies))
        n_ctx = self.ctx.shape[-2]
        self.prompts = PromptSlots(self.backbone, [class_prompt(name, n_ctx, config.position) for name in names])
        self.text_cache = EvalCache()
        self._class_index: dict[tuple[int, bool], torch.Tensor | None] = {}

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        return self.backbone.input_spec()

    def logit_classes(self, training: bool) -> torch.Tensor | None:
        """Indices of the classes whose logits can count (None: all), computed once per task."""
        key = (self.task_id, training)
        if key not in self._class_index:
            if training:
                mask = self.train_class_mask()
            else:
                mask = torch.zeros(self.info.n_classes, dtype=torch.bool)
                mask[self.seen_classes] = True
                mask = mask if self.info.kind == CLASS_IL else None
            index = None if mask is None or bool(mask.all()) or not bool(mask.any()) else mask.nonzero().flatten().to(self.ctx.device)
            self._class_index[key] = index
        return self._class_index[key]

    def context(self, classes: torch.Tensor | None) -> torch.Tensor:
        """[M, width] shared, or [n, M, width] for the ``classes`` with class-specific contexts."""
        return self.ctx[classes] if self.config.class_specific and classes is not None else self.ctx

    def all_class_logits(self, logits: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        if classes is None:
            return logits
        full = logits.new_full((len(logits), self.info.n_classes), float("-inf"))
        return full.index_copy(1, classes, logits)

    def forward(self, batch: Batch) -> ForwardOutput:
        image = self.backbone.encode_image(batch.images)
        classes = self.logit_classes(batch.training)
        text = self.text_cache.get(self.task_id, lambda: self.prompts.encode(self.backbone, self.context(classes),
                                                                             classes))
        logits = self.backbone.logit_scale() * image @ text.t()
        return ForwardOutput(self.all_class_logits(logits, classes))
