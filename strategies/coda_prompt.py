"""CODA-Prompt (Smith et al., CVPR 2023) as GT-RIPL/CODA-Prompt computes it, on current timm.

A frozen ViT; every prompted block has a pool of prompt components, each with a key and an
attention vector. An image's prompt for a block is the sum of the components weighted by
cos(query ⊙ attention, key), the query being the frozen model's [CLS] output; the first half of
its tokens become key prefixes, the second half value prefixes (:mod:`clframe.prefix_prompts`).
Trained end to end with the head, which reads [CLS].

Each task adds ``pool_size // tasks`` components per block, drawn by Gram–Schmidt orthogonal to
every earlier one (the reference's current code). Every task's components, keys and attention
vectors are Parameters of their own, and only the current task's have ``requires_grad``: earlier
ones stay bit-identical whatever the optimizer does (weight decay included). The optional
orthogonality loss is the reference's ``ortho_mu``. With ``--joint`` the one task gets the pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.models import feature_dim, frozen_features
from clframe.prefix_prompts import by_block, frozen_vit, prompted_features
from clframe.query_cache import FrozenQueryCache
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo


@dataclass
class CodaPromptConfig(StrategyConfig):
    pool_size: int = option(100, "prompt components per block in all; each task adds pool_size // tasks", min=1)
    prompt_length: int = option(8, "tokens per component: the first half key prefixes, the second value prefixes",
                                min=0)
    blocks: list[int] = option(None, "blocks that get a prompt", factory=lambda: [0, 1, 2, 3, 4])
    ortho_coef: float = option(0.0, "orthogonality loss: coef x sum over blocks of mean((X Xᵀ - I)²) of the "
                               "components, keys and attention vectors in use (the reference's ortho_mu)", min=0.0)
    cache_queries: bool = option(True, "compute each test image's frozen query once per run (exact: the "
                                 "query model is frozen and test images are not augmented)")

    def __post_init__(self) -> None:
        if self.prompt_length % 2:
            raise ValueError(f"prompt_length ({self.prompt_length}) must be even: half key, half value prefixes")


def orthogonal_rows(earlier: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to every row of ``earlier`` [s, n]:
    Gram–Schmidt of standard-normal draws. The reference projects on the earlier rows one by one,
    which is exact only while they are orthogonal; trained ones are not, so the draws are projected
    off an orthonormal basis of their span instead."""
    n = earlier.shape[1]
    if n == 0 or count == 0:
        return earlier.new_zeros(count, n)
    draws = torch.randn(n, count, dtype=torch.float64, device=earlier.device)
    if len(earlier):
        basis = torch.linalg.qr(earlier.t().double()).Q  # [n, s]: spans the earlier rows
        for _ in range(2):  # twice is enough in float64
            draws = draws - basis @ (basis.t() @ draws)
    q, r = torch.linalg.qr(draws)
    return (q * torch.sign(torch.diagonal(r))).t().to(earlier.dtype)  # signs as sequential Gram–Schmidt gives


def component_weights(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """cos(query ⊙ attention_k, key_k) for every block l and component k, [B, blocks, K], computed as
    (q · (a_k ⊙ k̂_k)) / ‖q ⊙ a_k‖, without the reference's [B, K, D] product; in fp32, as the reference."""
    query, keys, attention = query.float(), keys.float(), attention.float()
    with torch.autocast(query.device.type, enabled=False):
        numerator = torch.einsum("bd,lkd->blk", query, attention * F.normalize(keys, dim=-1))
        norm = torch.einsum("bd,lkd->blk", query.square(), attention.square()).clamp_min(1e-24).sqrt()
        return numerator / norm  # F.normalize's eps (1e-12), as the reference; clamped before sqrt: no NaN grad


def ortho_penalty(rows: torch.Tensor) -> torch.Tensor:
    """The reference's mean((X Xᵀ - I)²) per block, summed over the blocks; ``rows`` [blocks, K, n].
    In fp32 (autocast off): near-orthogonal rows differ from I by less than bf16 resolves."""
    rows = rows.float()
    with torch.autocast(rows.device.type, enabled=False):
        gram = rows @ rows.transpose(1, 2)
        return (gram - torch.eye(gram.shape[-1], device=gram.device)).square().mean(dim=(1, 2)).sum()


@register_strategy("coda_prompt")
class CodaPrompt(Strategy):
    """CODA-Prompt: per-block prefixes mixed from components by attended query-key cosine; [CLS] head."""

    config_cls = CodaPromptConfig
    capturable_step = True

    def __init__(self, config: CodaPromptConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = frozen_vit(run, {"coda_prompt.blocks": config.blocks})
        n_tasks, key_width, blocks = 1 if run.joint else info.n_tasks, feature_dim(self.backbone), len(config.blocks)
        self.per_task = config.pool_size // n_tasks
        if not 0 < self.per_task * n_tasks <= key_width:
            raise ClframeError(f"coda_prompt.pool_size={config.pool_size}: the {n_tasks} tasks need at least one "
                               f"component each, and at most {key_width} (the key width) can be orthogonal")

        def per_task(*shape: int) -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.zeros(blocks, self.per_task, *shape)) for _ in range(n_tasks))

        self.components = per_task(config.prompt_length, self.backbone.embed_dim)
        self.keys, self.attention = per_task(key_width), per_task(key_width)
        self.head = nn.Linear(key_width, info.n_classes)  # PyTorch's default init, as the reference's
        self.query_cache = FrozenQueryCache(config.cache_queries)
        self.train_only(0)

    def train_only(self, task: int) -> None:
        for kind in (self.components, self.keys, self.attention):
            for index, chunk in enumerate(kind):
                chunk.requires_grad_(index == task)

    def forward(self, batch: Batch) -> ForwardOutput:
        query = self.query_cache(batch, lambda images: frozen_features(self.backbone, images).float())
        used = max(self.task_id, 0) + 1  # tasks so far; training uses the current one's too
        components, keys, attention = (torch.cat(list(kind[:used]), dim=1)
                                       for kind in (self.components, self.keys, self.attention))
        prompts = torch.einsum("blk,lkpd->blpd", component_weights(query, keys, attention), components)
        prompts = prompts.unflatten(2, (2, self.config.prompt_length // 2))  # [B, blocks, key/value, L/2, D]
        logits = self.head(prompted_features(self.backbone, batch.images, by_block((self.config.blocks, prompts))))
        ortho = None
        if batch.training and self.config.ortho_coef > 0:
            ortho = self.config.ortho_coef * sum(map(ortho_penalty, (components.flatten(2), keys, attention)))
        return ForwardOutput(logits, ortho)

    @torch.no_grad()
    def before_task(self, experience) -> None:
        super().before_task(experience)
        task = self.task_id
        for kind in (self.components, self.keys, self.attention):
            earlier = torch.cat(list(kind[:task]), dim=1) if task else kind[0][:, :0]
            for block, new in enumerate(kind[task]):
                new.copy_(orthogonal_rows(earlier[block].flatten(1), self.per_task).view_as(new))
        self.train_only(task)
