"""Zero-shot CLIP: cosine between an image and the text features of a template over the class
names, times CLIP's logit scale. Nothing trains (set epochs to 0); every CLIP table starts here."""
from __future__ import annotations

from dataclasses import dataclass

from clframe.clip_backbone import ClipBackbone, ClipOptions, prompt_class_names
from clframe.config import RunConfig, option
from clframe.registry import register_strategy
from clframe.text_prompts import EvalCache
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class ZeroshotClipConfig(StrategyConfig, ClipOptions):
    template: str = option("a photo of a {}.", "text prompt; {} is replaced by the class name")

    def __post_init__(self) -> None:
        if "{}" not in self.template:
            raise ValueError(f"template must contain {{}} for the class name, got {self.template!r}")


@register_strategy("zeroshot_clip")
class ZeroshotClip(Strategy):
    """Zero-shot CLIP: a text classifier from a template over the class names; nothing trains."""

    config_cls = ZeroshotClipConfig
    backbone_kind = "open_clip"  # scenarios give it their CLIP model (backbones.open_clip)

    def __init__(self, config: ZeroshotClipConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.prompts = [config.template.format(name) for name in prompt_class_names(info, self.name)]
        self.backbone = ClipBackbone.create(run, config, self.name)
        self.text_cache = EvalCache(fixed=True)

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        return self.backbone.input_spec()

    def forward(self, batch: Batch) -> ForwardOutput:
        # All classes, once per run: the text side never changes; the engine masks unseen classes.
        text = self.text_cache.get("all", lambda: self.backbone.encode_texts(self.prompts))
        image = self.backbone.encode_image(batch.images)
        return ForwardOutput(self.backbone.logit_scale() * image @ text.t())
