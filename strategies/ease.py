"""EASE (Zhou et al., CVPR 2024, "Expandable Subspace Ensemble for Pre-Trained Model-Based
Class-Incremental Learning"): one adapter subspace per task, a prototype classifier over all of
them, and semantic-guided completion of old classes' prototypes in newer subspaces.

Semantics of LAMDA-PILOT's ``models/ease.py`` / ``backbone/vit_ease.py`` / ``EaseCosineLinear``
(the EASE authors' code; ``exps/ease.json``: use_init_ptm false, recalc_sim true, use_reweight):

- task t trains a fresh AdaptFormer adapter set (zero-initialised up-projections) with a fresh
  cosine head over the task's classes; earlier adapter sets stay frozen;
- after task t, every class of the task gets a prototype (mean feature) in every subspace 0..t;
- a class c first seen in task i has no data in a newer subspace s > i: its prototype there is
  sum_j softmax_j(cos(P[c, i], P[j, i])) P[j, s] over the classes j that have data in s (the
  similarity is measured in c's own subspace i), recomputed after every task (``solve_sim_reset``);
- logits: sum over subspaces s of w * cos(feature_s, P[c, s]), w = 1 in the class's own subspace
  and alpha / t elsewhere (``forward_reweight``).
On a domain-incremental stream every class has data in every subspace (means accumulate over the
domains, nothing needs completion) and a class's own subspace is that of the task it first came in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clframe.adapters import adapted_features, bottlenecks
from clframe.class_stats import ClassStatistics
from clframe.config import RunConfig, option
from clframe.models import create_backbone, feature_dim, freeze
from clframe.ptm import CosineHead, statistics_pass
from clframe.registry import register_strategy
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport


@dataclass
class EaseConfig(StrategyConfig):
    adapter_dim: int = option(64, "adapter bottleneck width (ease.json ffn_num)", min=1)
    adapter_scale: float = option(0.1, "adapter output scale (PILOT ffn_adapter_scalar)")
    adapter_dropout: float = option(0.1, "dropout inside the adapter at training", min=0.0)
    alpha: float = option(0.1, "weight of a class's other subspaces, divided by the task index (ease.json alpha)",
                          min=0.0)


@register_strategy("ease")
class Ease(Strategy):
    """A fresh adapter subspace per task; cosine prototypes over all subspaces, old ones completed."""

    config_cls = EaseConfig

    def __init__(self, config: EaseConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.backbone = create_backbone(run)
        freeze(self.backbone)
        dim, tasks = feature_dim(self.backbone), info.n_tasks
        self.subspaces = nn.ModuleList(bottlenecks(self.backbone, config.adapter_dim, config.adapter_scale,
                                                   config.adapter_dropout) for _ in range(tasks))
        self.task_head = CosineHead(dim, info.n_classes)
        self.register_buffer("prototypes", torch.zeros(info.n_classes, tasks, dim))
        self.register_buffer("home", torch.full((info.n_classes,), -1, dtype=torch.long))  # first task per class
        self.stats = [ClassStatistics(info.n_classes, dim) for _ in range(tasks)]

    def subspace_features(self, images: torch.Tensor, count: int) -> list[torch.Tensor]:
        return [adapted_features(self.backbone, images, self.subspaces[s]) for s in range(count)]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """This task's adapters and head (all keep requires_grad, so the GPU fast path casts none)."""
        current = self.subspaces[max(self.task_id, 0)]
        return iter([*current.parameters(), *self.task_head.parameters()])

    def before_task(self, experience: Experience) -> None:
        super().before_task(experience)
        classes = torch.tensor(self.current_classes, device=self.home.device)
        self.home[classes] = torch.where(self.home[classes] < 0, experience.task_id, self.home[classes])
        self.task_head.reset_parameters()  # a fresh head per task, as the reference

    def forward(self, batch: Batch) -> ForwardOutput:
        if batch.training:
            return ForwardOutput(self.task_head(adapted_features(self.backbone, batch.images, self.subspaces[self.task_id])))
        count = self.task_id + 1
        features = torch.stack([F.normalize(f.float(), dim=-1) for f in self.subspace_features(batch.images, count)], 1)
        cosines = torch.einsum("nsd,csd->ncs", features, F.normalize(self.prototypes[:, :count], dim=-1))
        return ForwardOutput((cosines * self.subspace_weights(count)).sum(-1))

    def subspace_weights(self, count: int) -> torch.Tensor:
        """[C, count]: 1 in a class's own subspace, alpha / (count - 1) in the others."""
        own = self.home.clamp(min=0).unsqueeze(1) == torch.arange(count, device=self.home.device)
        other = self.config.alpha / max(count - 1, 1)
        return torch.where(own, 1.0, other)

    def after_task(self, experience: Experience) -> None:
        count = self.task_id + 1
        for stats in self.stats[:count]:
            stats.to(self.prototypes.device)
        statistics_pass(self, experience, lambda images: self.subspace_features(images, count), self.stats[:count])
        for s in range(count):
            self.prototypes[:, s] = self.stats[s].means().float()
        self.complete_prototypes(count)

    @torch.no_grad()
    def complete_prototypes(self, count: int) -> None:
        """Semantic-guided completion of the prototypes of classes without data in a subspace."""
        seen = torch.tensor(self.seen_classes, device=self.home.device)
        for s in range(1, count):
            has_data = self.stats[s].counts.to(self.home.device) > 0
            missing = seen[~has_data[seen]]
            donors = has_data.nonzero().squeeze(1)
            for c in missing.tolist():
                own = int(self.home[c])
                similarity = F.cosine_similarity(self.prototypes[c, own].unsqueeze(0), self.prototypes[donors, own], dim=1)
                self.prototypes[c, s] = F.softmax(similarity, dim=0) @ self.prototypes[donors, s]

    def task_report(self) -> TaskReport:
        count = self.task_id + 1
        norms = self.prototypes[self.seen_classes, :count].norm(dim=-1)
        return TaskReport({"prototype_norm/mean": float(norms.mean()), "ease/subspaces": float(count)})

    def extra_state(self) -> dict[str, Any]:
        return {"stats": [stats.state_dict() for stats in self.stats]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for stats, saved in zip(self.stats, state["stats"]):
            stats.load_state_dict(saved)
