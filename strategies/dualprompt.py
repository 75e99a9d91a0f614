"""DualPrompt (Wang et al., ECCV 2022) as dualprompt-pytorch computes it, on current timm.

A frozen ViT with two kinds of prompts: a G-prompt shared by all tasks on the first blocks, and an
E-prompt pool, one prompt and one learned key per task, on later blocks. Training uses the current
task's E-prompt (copied from the previous task's at the task start) and pulls its key toward the
frozen model's [CLS] queries; at test the nearest key (a :mod:`clframe.key_index` search through
:class:`~clframe.prompt_pool.PromptPool`) chooses the E-prompt, no task id given. Prompts enter as
key/value prefixes or as tokens (:mod:`clframe.prefix_prompts`); the head reads [CLS].

Unlike the reference (its issue #8: the prompt is reshaped, not permuted, before the key/value
split) every image gets the E-prompt's key half as key prefix and its value half as value prefix.
docs/design.md describes the reference. With ``--joint`` the stream is one task: one E-prompt, always chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clframe.config import RunConfig, option
from clframe.key_index import BACKENDS
from clframe.models import feature_dim, frozen_features
from clframe.prefix_prompts import MODES, by_block, frozen_vit, prompt_shape, prompted_features, timm_head
from clframe.prompt_pool import PromptPool, SelectionStats
from clframe.query_cache import FrozenQueryCache
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport


@dataclass
class DualPromptConfig(StrategyConfig):
    g_length: int = option(5, "G-prompt length (prefix tokens per key and per value, or inserted tokens)", min=0)
    g_blocks: list[int] = option(None, "blocks the G-prompt is attached to", factory=lambda: [0, 1])
    e_length: int = option(5, "E-prompt length", min=0)
    e_blocks: list[int] = option(None, "blocks the E-prompt is attached to", factory=lambda: [2, 3, 4])
    pool_size: int = option(0, "E-prompts (and keys) in the pool; 0 = one per task of the stream. Tasks past "
                            "the pool pick theirs by key, as the reference", min=0)
    mode: str = option("prefix", "prompts enter as key/value prefixes (prefix-tuning) or as inserted tokens "
                       "(prompt-tuning)", choices=MODES)
    pull_coef: float = option(1.0, "the loss adds -pull_coef x the mean cosine of the used E-key to the queries",
                              min=0.0)
    eval_selection: str = option("image", "test: each image's nearest key, or the batch's most chosen (reference "
                                 "protocol; its test batches hold one task)", choices=("image", "batch"))
    eval_keys: str = option("trained", "keys searched at test: those of the tasks trained so far, or all (reference; "
                            "the others are still random)", choices=("trained", "all"))
    key_index: str = option("auto", "nearest-key lookup backend", choices=BACKENDS)
    cache_queries: bool = option(True, "compute each test image's frozen query once per run (exact: the "
                                 "query model is frozen and test images are not augmented)")


@register_strategy("dualprompt")
class DualPrompt(Strategy):
    """DualPrompt: a shared G-prompt and a keyed E-prompt per task on a frozen ViT; [CLS] head."""

    config_cls = DualPromptConfig
    capturable_step = True

    def __init__(self, config: DualPromptConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = frozen_vit(run, {"dualprompt.g_blocks": config.g_blocks,
                                         "dualprompt.e_blocks": config.e_blocks})
        width, n_tasks = self.backbone.embed_dim, 1 if run.joint else info.n_tasks
        self.g_prompt = nn.Parameter(torch.empty(prompt_shape(config.mode, len(config.g_blocks), config.g_length,
                                                              width)).uniform_(-1.0, 1.0))
        e_shape = prompt_shape(config.mode, len(config.e_blocks), config.e_length, width)
        self.pool = PromptPool(config.pool_size or n_tasks, feature_dim(self.backbone), 1, e_shape,
                               key_index=config.key_index)  # prompts and keys uniform(-1, 1), as the reference
        self.head = timm_head(feature_dim(self.backbone), info.n_classes)
        self.stats = SelectionStats(info.n_tasks, self.pool.size)  # a row per test set, --joint too
        self.query_cache = FrozenQueryCache(config.cache_queries)

    def e_prompt_ids(self, query: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, 1] E-prompt ids: the current task's at training, the nearest key's at test."""
        pool, task = self.pool, self.task_id
        if batch.training:
            ids = (torch.full((len(query), 1), task, device=query.device) if task < pool.size
                   else pool.select(query, "batch"))
            self.stats.observe_train(task, ids)
            return ids
        searched = min(task + 1, pool.size) if self.config.eval_keys == "trained" else pool.size
        bias = torch.zeros(pool.size, device=query.device)
        bias[searched:] = float("-inf")
        ids = pool.select(query, self.config.eval_selection, bias)
        self.stats.observe_eval(batch.task_id, ids, task + 1)  # reporting only
        return ids

    def forward(self, batch: Batch) -> ForwardOutput:
        query = self.query_cache(batch, lambda images: frozen_features(self.backbone, images).float())
        ids = self.e_prompt_ids(query, batch)
        g_prompts = self.g_prompt.unsqueeze(0).expand(len(query), *self.g_prompt.shape)
        prompts = by_block((self.config.g_blocks, g_prompts), (self.config.e_blocks, self.pool.gather(ids)[:, 0]))
        logits = self.head(prompted_features(self.backbone, batch.images, prompts, self.config.mode))
        pull = -self.config.pull_coef * self.pool.reduce_sim(query, ids) if batch.training else None
        return ForwardOutput(logits, pull, ids)

    def before_task(self, experience) -> None:
        super().before_task(experience)
        task, prompts = self.task_id, self.pool.prompts
        if 0 < task < self.pool.size:
            with torch.no_grad():
                prompts[task].copy_(prompts[task - 1])  # the reference's shared_prompt_pool; keys start afresh
        self.stats.reset_eval()

    def configure_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """Earlier tasks' E-prompts and keys are rows of the pool's Parameters, beside the current
        task's: they get no gradient, but weight decay would still shrink them while later tasks
        train. So the pool gets none (the reference uses none at all); the rest gets the run's."""
        in_pool = {id(p) for p in self.pool.parameters()}
        groups = [{"params": [p for p in params if id(p) not in in_pool]},
                  {"params": [p for p in params if id(p) in in_pool], "weight_decay": 0.0}]
        return super().configure_optimizer([group for group in groups if group["params"]], lr)

    def task_report(self) -> TaskReport:
        # With --joint every test set is judged against one trained task: no task identification to report.
        metrics, histogram = self.stats.report(self.task_id, "dualprompt", task_id_acc=not self.run_config.joint)
        return TaskReport(metrics, {"prompt_selection.csv": histogram})
