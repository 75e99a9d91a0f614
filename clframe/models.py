"""One backbone factory for every strategy: a timm model by name, pretrained or from a local file.

Strategies touch the backbone only through timm's public ViT modules (``patch_embed``,
``cls_token``, ``pos_embed``, ``blocks``, ``norm``), so any timm ViT works.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clframe import vit
from clframe.checkpoint import foreign_file_warnings_silenced
from clframe.config import RunConfig
from clframe.errors import ClframeError, closest


def create_backbone(run: RunConfig) -> nn.Module:
    """Build ``run.model`` without a classifier head (``num_classes=0``), then freeze nothing:
    which parameters train is each strategy's decision.
    """
    if run.pretrained and not run.weights:
        _go_offline_without_network()  # before huggingface_hub reads its settings on import
    import timm

    if not timm.is_model(run.model):
        raise ClframeError(f"unknown timm model '{run.model}'{closest(run.model, timm.list_models())}; "
                           f"see timm.list_models()")
    kwargs = dict(run.model_kwargs)
    if run.image_size is not None:
        kwargs["img_size"] = run.image_size
    if run.weights:
        path = Path(run.weights).expanduser()
        if not path.is_file():
            raise ClframeError(f"--weights {run.weights}: no such file")
        # timm's own loader: filters the head and resamples position embeddings to img_size.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), hf_hub_id=None, url=None)
        pretrained = True
    else:
        pretrained = run.pretrained
    try:
        with foreign_file_warnings_silenced():
            model = timm.create_model(run.model, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ClframeError(f"model '{run.model}' does not take these model_kwargs: {exc}") from None
    except (RuntimeError, KeyError, ValueError) as exc:
        if run.weights:
            first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])[:300]
            if any(word in first.lower() for word in ("pickle", "weights_only", "load key", "zip", "header")):
                raise ClframeError(f"--weights {run.weights} is not a readable weights file (expected a state dict "
                                   f"saved with torch.save, or .safetensors): {first.split('. ')[0][:160]}") from None
            raise ClframeError(f"--weights {run.weights} does not fit model '{run.model}': {first}") from None
        raise
    except OSError as exc:  # includes network errors from the HF hub
        raise ClframeError(f"cannot fetch pretrained weights for '{run.model}' (offline?); pass a local "
                           f"checkpoint with --weights FILE or use --no-pretrained ({type(exc).__name__})") \
            from None
    except Exception as exc:  # huggingface_hub / urllib raise a zoo of non-OSError types offline
        if pretrained and not run.weights and _looks_like_network_error(exc):
            raise ClframeError(f"cannot fetch pretrained weights for '{run.model}' (offline?); pass a local "
                               f"checkpoint with --weights FILE or use --no-pretrained") from None
        raise
    return model


def _go_offline_without_network(host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Without network, tell huggingface_hub so at once: it then uses its cache or fails fast,
    instead of retrying for a minute."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def _looks_like_network_error(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("connection", "offline", "resolve", "http", "hub", "timeout", "network"))


def feature_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim"))


def input_stats(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the model was trained with (timm's pretrained_cfg), for input normalisation."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


def native_image_size(backbone: nn.Module) -> int:
    patch_embed = getattr(backbone, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = (getattr(backbone, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[1:]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


@torch.no_grad()
def frozen_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features of the unmodified backbone (the L2P query, the linear probe's input).

    For a ViT whose head reads [CLS] the last block computes [CLS] alone (``vit.kept_tokens_block``):
    the same features as timm's ``forward_features`` + ``forward_head``, ~6% less work.
    """
    if not vit.is_plain_vit(backbone):  # other families embed and pool their own way
        return backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    x = vit.run_blocks(backbone, vit.embed(backbone, images), keep=vit.class_token_tokens(backbone))
    return backbone.forward_head(backbone.norm(x), pre_logits=True)
