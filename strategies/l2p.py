"""L2P (Learning to Prompt, Wang et al. 2022) as l2p-pytorch computes it, on current timm.

A frozen ViT; a pool of prompts with learned keys. The query is the frozen model's pre-logits
feature of the unprompted image (no autograd); the prompts whose keys are most cosine-similar are
inserted after [CLS], each prompt token carrying the [CLS] position embedding, and the head reads
the mean of the prompt tokens' outputs after the final norm. Training adds the pull term
``-pull_coef * reduce_sim``. Only prompts, keys and head train. docs/design.md describes the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe.config import RunConfig, option
from clframe.key_index import BACKENDS
from clframe.models import create_backbone, feature_dim, freeze, frozen_features
from clframe.query_cache import FrozenQueryCache
from clframe.prompt_pool import PromptPool, SelectionStats
from clframe.registry import register_strategy
from clframe.vit import embed, insert_tokens, num_prefix_tokens, run_blocks
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport

SELECTION = ("image", "batch")


@dataclass
class L2PConfig(StrategyConfig):
    pool_size: int = option(10, "number of prompts (and keys) in the pool", min=1)
    prompt_length: int = option(5, "tokens per prompt", min=1)
    top_n: int = option(5, "prompts chosen per image", min=1)
    prompt_init: str = option("uniform", "prompt and key init: uniform(-1, 1) or zero", choices=("uniform", "zero"))
    train_selection: str = option("batch", "training: each image's top-N, or the batch's N most chosen "
                                  "(reference)", choices=SELECTION)
    eval_selection: str = option("image", "evaluation: each image's top-N (no task leak), or the batch's N "
                                 "most chosen (reference protocol; its batches hold one task)", choices=SELECTION)
    pull_coef: float = option(0.1, "pull term: the loss adds -pull_coef x (sum of the chosen keys' cosines to "
                              "their queries) / batch size, as the reference", min=0.0)
    head_input: str = option("prompts", "head reads the mean of the prompt tokens, or [CLS]",
                             choices=("prompts", "cls"))
    key_index: str = option("auto", "nearest-key lookup backend", choices=BACKENDS)
    cache_queries: bool = option(True, "compute each test image's frozen query once per run (exact: the "
                                 "query model is frozen and test images are not augmented)")
    diversity: float = option(0.0, "prompt-frequency penalty at training: rank by cosine minus this x each "
                              "prompt's share of earlier tasks' selections (0 = off)", min=0.0)

    def __post_init__(self) -> None:
        if self.top_n > self.pool_size:
            raise ValueError(f"top_n ({self.top_n}) cannot exceed pool_size ({self.pool_size})")


def cls_position(vit: nn.Module) -> torch.Tensor | float:
    """The [CLS] slot's position embedding [1, 1, D] (0 when the class token has none)."""
    pos = getattr(vit, "pos_embed", None)
    if pos is None or getattr(vit, "no_embed_class", False) or getattr(vit, "cls_token", None) is None:
        return 0.0
    return pos[:, :1]


@register_strategy("l2p")
class L2P(Strategy):
    """Learning to Prompt: a prompt pool with learned keys on a frozen ViT."""

    config_cls = L2PConfig
    capturable_step = True

    def __init__(self, config: L2PConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        width = feature_dim(self.backbone)
        self.pool = PromptPool(config.pool_size, width, config.top_n, (config.prompt_length, width),
                               init=config.prompt_init, key_index=config.key_index)
        self.head = nn.Linear(width, info.n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's head init, as the reference's
        nn.init.zeros_(self.head.bias)
        self.stats = SelectionStats(info.n_tasks, config.pool_size)
        self.query_cache = FrozenQueryCache(config.cache_queries)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen model's pre-logits feature of the unprompted images (no autograd)."""
        return frozen_features(self.backbone, images).float()

    def prompted_features(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Head input: [CLS, N·L prompt tokens, patches] through the frozen blocks, final norm, then
        the mean of the prompt tokens (or [CLS])."""
        vit = self.backbone
        tokens = self.pool.gather(ids).flatten(1, 2)  # [B, N·L, D]
        tokens = vit.norm_pre(tokens + cls_position(vit))  # norm_pre is per token
        start = num_prefix_tokens(vit)
        read = slice(start, start + tokens.shape[1]) if self.config.head_input == "prompts" else slice(0, 1)
        x = vit.norm(run_blocks(vit, insert_tokens(vit, embed(vit, images), tokens), keep=read))  # [B, read, D]
        return vit.head_drop(vit.fc_norm(x.mean(dim=1)))

    def selection_bias(self) -> torch.Tensor | None:
        if self.config.diversity <= 0 or self.task_id <= 0:
            return None
        return -self.config.diversity * self.stats.train_frequency(self.task_id)

    def forward(self, batch: Batch) -> ForwardOutput:
        query = self.query_cache(batch, self.query)
        if batch.training:
            ids = self.pool.select(query, self.config.train_selection, self.selection_bias())
            self.stats.observe_train(batch.task_id, ids)
        else:
            ids = self.pool.select(query, self.config.eval_selection)
            self.stats.observe_eval(batch.task_id, ids, self.task_id + 1)  # reporting only
        logits = self.head(self.prompted_features(batch.images, ids))
        extra = -self.config.pull_coef * self.pool.reduce_sim(query, ids) if batch.training else None
        return ForwardOutput(logits, extra, ids)

    def before_task(self, experience) -> None:
        super().before_task(experience)
        self.stats.reset_eval()

    def task_report(self) -> TaskReport:
        # With --joint every test set is judged against one trained task: no task identification to report.
        metrics, histogram = self.stats.report(self.task_id, "l2p", task_id_acc=not self.run_config.joint)
        return TaskReport(metrics, {"prompt_selection.csv": histogram})
