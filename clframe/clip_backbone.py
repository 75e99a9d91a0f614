"""open_clip models for the CLIP strategies: creation, the frozen encoders, and a text encoder
that takes prompt *embeddings* (learned context vectors among token embeddings) instead of ids.

open_clip is an optional extra (``pip install -e .[clip]``), imported only inside functions, so
``import strategies`` works without it.

- ``--model``: an open_clip name (``open_clip.list_models()``, e.g. ViT-B-16) or one of clframe's
  own configs in :data:`LOCAL_CONFIGS` (``clip_tiny``: a few layers, random init, for tests and
  CPU smoke runs; :func:`register_clip_config` adds more at run time).
- Weights: ``--weights FILE`` (an open_clip checkpoint); else with ``--pretrained`` the strategy's
  ``pretrained_tag`` (e.g. openai) through open_clip's download or cache; else random init.
- ``run.image_size`` rebuilds the image tower at that resolution (open_clip resamples the
  position embedding of loaded weights); ``run.model_kwargs`` holds timm arguments and is unused.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clframe.config import RunConfig, option
from clframe.errors import ClframeError, closest
from clframe.models import _go_offline_without_network, freeze

if TYPE_CHECKING:
    from clframe.strategies.base import StreamInfo

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip model configs (``open_clip.CLIP(**config)``) that clframe knows by name.
LOCAL_CONFIGS: dict[str, dict[str, Any]] = {
    "clip_tiny": {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}


@dataclass
class ClipOptions:
    """Config fields every CLIP strategy has (its config dataclass lists this as a second base)."""

    pretrained_tag: str = option("openai", "open_clip weights loaded with --pretrained when no --weights is "
                                 "given (open_clip.list_pretrained_tags_by_model(model))")
    quick_gelu: bool | None = option(None, "QuickGELU activations (OpenAI's weights need them); None: as the "
                                     "pretrained tag was trained, else the model config's")


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ClframeError("CLIP strategies need open_clip: pip install -e .[clip]") from None
    return open_clip


def register_clip_config(name: str, config: dict[str, Any]) -> None:
    """Make ``--model name`` build ``open_clip.CLIP(**config)`` (keys embed_dim, vision_cfg, text_cfg)."""
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError("a CLIP config needs embed_dim, vision_cfg and text_cfg")
    if name in LOCAL_CONFIGS and LOCAL_CONFIGS[name] != config:
        raise ValueError(f"CLIP config {name!r} is already registered")
    LOCAL_CONFIGS[name] = copy.deepcopy(config)


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs through the root logger (an ERROR line offline); the ClframeError says it all."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def create_clip(run: RunConfig, options: ClipOptions, section: str) -> tuple[nn.Module, Any]:
    """(open_clip model, tokenizer) for ``run.model``; every user mistake is one ClframeError line."""
    open_clip = import_open_clip()
    name, local = run.model, LOCAL_CONFIGS.get(run.model)
    if local is None and name not in open_clip.list_models():
        import timm

        hint = " (a timm name, e.g. from a scenario's config file)" if timm.is_model(name) else \
            closest(name, list(LOCAL_CONFIGS) + open_clip.list_models())
        raise ClframeError(f"unknown open_clip model '{name}'{hint}; CLIP strategies take an open_clip name "
                           f"such as --model ViT-B-16 (open_clip.list_models()) or clip_tiny")
    weights = None
    if run.weights:
        path = Path(run.weights).expanduser()
        if not path.is_file():
            raise ClframeError(f"--weights {run.weights}: no such file")
        weights = str(path)
    tag = options.pretrained_tag if run.pretrained and not weights else None
    if tag and local is not None:
        raise ClframeError(f"'{name}' is a clframe config without pretrained weights; use --no-pretrained or "
                           f"--weights FILE")
    if tag and tag not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ClframeError(f"open_clip has no weights '{tag}' for '{name}' (tags: {tags}); set "
                           f"{section}.pretrained_tag or pass --weights FILE")
    quick_gelu = options.quick_gelu
    if quick_gelu is None and tag:
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if tag:
        _go_offline_without_network()
    try:
        with _quiet_logging():
            if local is not None:
                config = copy.deepcopy(local)
                if run.image_size:
                    config["vision_cfg"]["image_size"] = run.image_size
                config["quick_gelu"] = bool(quick_gelu) or config.get("quick_gelu", False)
                model = open_clip.CLIP(**config)
                if weights:
                    open_clip.load_checkpoint(model, weights)
                tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
            else:
                kwargs = {"force_image_size": run.image_size} if run.image_size else {}
                model = open_clip.create_model(name, pretrained=weights or tag, force_quick_gelu=bool(quick_gelu),
                                               device=torch.get_default_device(), **kwargs)
                tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises RuntimeError for downloads, pickle/KeyError for files
        first = " ".join(str(exc).strip().splitlines()[:2])[:300]
        if weights:
            raise ClframeError(f"--weights {run.weights} does not fit open_clip model '{name}': {first}") from None
        if tag:
            raise ClframeError(f"cannot fetch open_clip weights '{tag}' for '{name}' (offline?); pass a local "
                               f"checkpoint with --weights FILE or use --no-pretrained") from None
        raise
    return model, tokenizer


_PLACEHOLDER = re.compile(r"^(?:class[ _-]?)?0*(\d+)$")  # what a scenario without names falls back to


def prompt_class_names(info: StreamInfo, strategy: str) -> list[str]:
    """The stream's class names as prompt words ('maple_tree' -> 'maple tree'). A stream without
    real names (missing, empty, or placeholders such as '3' or 'class_3' for class 3) is one error."""
    raw = [str(n).strip() for n in (info.class_names or [])]

    def placeholder(i: int, name: str) -> bool:
        match = _PLACEHOLDER.match(name.lower())
        return not name or (match is not None and int(match.group(1)) == i)

    if len(raw) != info.n_classes or any(placeholder(i, n) for i, n in enumerate(raw)):
        shown = f" (it has {', '.join(repr(n) for n in raw[:2])}, ...)" if raw else ""
        raise ClframeError(f"{strategy} builds text prompts from class names, but this scenario has none{shown}; "
                           f"use one with real names (split_cifar100, split_digits, folder scenarios, ...)")
    return [n.replace("_", " ") for n in raw]


class ClipBackbone(nn.Module):
    """A frozen open_clip model: normalised image features, text features from strings or from
    prompt embeddings, CLIP's logit scale and the input spec the engine prepares images with."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        freeze(model)
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def create(cls, run: RunConfig, options: ClipOptions, section: str) -> ClipBackbone:
        return cls(*create_clip(run, options, section))

    def train(self, mode: bool = True) -> ClipBackbone:
        super().train(mode)
        self.model.eval()  # frozen: no dropout / patch dropout, whatever the strategy's mode
        return self

    @property
    def text_tower(self) -> nn.Module:
        """CLIP keeps the text modules on the model itself; CustomTextCLIP in ``model.text``."""
        text = getattr(self.model, "text", None)
        return text if text is not None else self.model

    @property
    def blocks(self) -> nn.ModuleList:
        """The image tower's transformer blocks (what ``run.compile`` compiles)."""
        return self.model.visual.transformer.resblocks

    @property
    def width(self) -> int:
        """Width of a token embedding (a context vector's size)."""
        return self.text_tower.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space."""
        return int(self.model.visual.output_dim)

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        visual = self.model.visual
        size = visual.image_size
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        return (int(size[0] if isinstance(size, (tuple, list)) else size), tuple(cfg.get("mean", OPENAI_MEAN)),
                tuple(cfg.get("std", OPENAI_STD)))

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised features of plain text prompts (open_clip's own ``encode_text``)."""
        ids = self.tokenizer(texts).to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(ids), dim=-1)

    @torch.no_grad()
    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.text_tower.token_embedding
        return embedding(ids.to(embedding.weight.device)).float()

    def check_prompt_learning(self) -> None:
        """Prompt learning splices vectors among BPE token embeddings of a causal text transformer
        pooled at the end-of-text token: CLIP's own text tower and tokenizer."""
        tower = self.text_tower
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
        if (not hasattr(tower, "token_embedding") or getattr(tower, "attn_mask", None) is None
                or getattr(tower, "cls_emb", None) is not None or pool not in ("argmax", "eos")
                or not hasattr(self.tokenizer, "encode") or not hasattr(self.tokenizer, "eot_token_id")):
            raise ClframeError("prompt learning needs CLIP's own causal text transformer and BPE tokenizer; "
                               "this open_clip model has another kind (try ViT-B-16)")

    def encode_embeddings(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Normalised text features of prompt embeddings ``x`` [N, L, width] pooled at ``eot`` [N].

        This is ``encode_text`` after its token lookup: add position embeddings, run the causal
        transformer, final norm, take the end-of-text token, project. Since the mask is causal, the
        end-of-text output never sees later tokens, so ``L`` may stop right after the longest
        prompt's end-of-text token (77 -> ~20 for CoOp) with the very same result.
        """
        tower = self.text_tower
        length = x.shape[1]
        cast = tower.transformer.get_cast_dtype()
        x = x.to(cast) + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = x[torch.arange(len(x), device=x.device), eot]
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)
