"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022) on a frozen timm ViT.

A learned per-channel ``x * scale + shift`` after the patch embedding, after every block's
``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` and after the final
norm: the placement of LAMDA-PILOT's ``backbone/vit_ssf.py`` (scale ~ N(1, 0.02), shift ~
N(0, 0.02), its ``init_ssf_scale_shift``). The backbone is not modified: ``features`` attaches
the affine maps as forward hooks for the one call, so the same backbone still gives the
unmodified features everywhere else (APER concatenates both). The forward is walked by hand
(patch embedding, then each block's attention and MLP branches, then the final norm and pooling),
calling the hooked submodules themselves: a block compiled by the GPU fast path
(``clframe.fastpath.compile_blocks``) would otherwise run its graph, which torch 2.14 does not
re-trace for hooks added later (``skip_nnmodule_hook_guards``), and SSF would be silently dropped;
clframe's fast patch embedding (``vit.patch_tokens``) would skip the ``patch_embed.proj`` hook too.
"""
from __future__ import annotations

import torch
from torch import nn

from clframe import vit
from clframe.errors import ClframeError

BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _targets(backbone: nn.Module) -> dict[str, nn.Module]:
    named = dict(backbone.named_modules())
    names = ["patch_embed.proj"] + [f"blocks.{i}.{t}" for i in range(len(getattr(backbone, "blocks", ())))
                                    for t in BLOCK_TARGETS] + ["norm"]
    missing = [n for n in names if n not in named]
    if missing or len(names) == 2:
        raise ClframeError(f"SSF needs a timm VisionTransformer (patch_embed.proj, blocks.*.{{{','.join(BLOCK_TARGETS)}}}, "
                           f"norm); this backbone lacks {', '.join(missing[:3]) or 'blocks'}")
    return {n: named[n] for n in names}


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise ClframeError(f"SSF cannot follow a {type(module).__name__}")


class SSF(nn.Module):
    """Scale and shift vectors for every target module of ``backbone`` (which stays untouched)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        targets = _targets(backbone)
        self.names = list(targets)
        self.scales = nn.ParameterList(nn.Parameter(torch.empty(_channels(m)).normal_(1.0, 0.02))
                                       for m in targets.values())
        self.shifts = nn.ParameterList(nn.Parameter(torch.empty(_channels(m)).normal_(0.0, 0.02))
                                       for m in targets.values())

    def features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features of ``backbone`` with every scale and shift applied."""
        named = dict(backbone.named_modules())
        handles = []

        def hook_for(k: int):
            def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
                shape = (-1, 1, 1) if isinstance(module, nn.Conv2d) else (-1,)  # conv: NCHW channels
                return out * self.scales[k].view(shape).to(out.dtype) + self.shifts[k].view(shape).to(out.dtype)
            return hook

        try:
            for k, name in enumerate(self.names):
                handles.append(named[name].register_forward_hook(hook_for(k)))
            return _walked_features(backbone, images)
        finally:
            for handle in handles:
                handle.remove()


def _walked_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_features`` + pre-logits ``forward_head`` of a pre-norm ViT, with every
    hooked submodule called directly (never a compiled block, never the fused patch embedding)."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
    for blk in backbone.blocks:
        x = x + vit.attn_branch(blk, x)
        x = x + vit.mlp_branch(blk, x)
    return vit.pooled(backbone, x)
