"""iCaRL (Rebuffi et al., CVPR 2017; mammoth ``models/icarl.py``, PyCIL ``models/icarl.py``): herding
exemplars, distillation on the old classes, and a nearest-mean-of-exemplars classifier at test.

- Training data: the task's images plus every exemplar in the buffer (mammoth's ``icarl_replay``).
- Loss: binary cross-entropy with logits; the targets of the classes distilled (seen before this
  task and absent from it: class-IL's old classes, none in domain-IL) are the previous model's
  sigmoids, the others one-hot. mammoth averages over all the stream's classes; this averages over
  the classes ``train_mask`` keeps (default: seen), which only rescales the loss.
- After a task: the buffer keeps m = capacity // groups exemplars per (class, task) group, each
  group's first m in herding order; the new groups are herded on L2-normalised features of the
  engine-prepared (unaugmented) images. A class's mean is the normalised mean of its exemplars'
  normalised features, averaged with those of the flipped images when ``run.train_aug`` is on (the
  reference's flip; off for the digit scenarios, where a flip changes a digit).
- Test: logits = -||f(x)/|f(x)| - mean_c||^2 (mammoth's NME).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clframe.class_stats import ClassStatistics
from clframe.config import RunConfig
from clframe.registry import register_strategy
from clframe.rehearsal import herding_order
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput, StreamInfo
from clframe.strategies.baseline import RehearsalConfig, RehearsalStrategy


def nme_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Negative squared distance of the L2-normalised ``features`` [n, d] to each class mean [C, d]."""
    return -torch.cdist(F.normalize(features.float(), dim=1), means.float()).pow(2)


@dataclass
class ICaRLConfig(RehearsalConfig):
    pass


@register_strategy("icarl")
class ICaRL(RehearsalStrategy):
    """iCaRL: herding exemplars, sigmoid distillation, nearest-mean-of-exemplars at test."""

    config_cls = ICaRLConfig

    def __init__(self, config: ICaRLConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        self.class_means: torch.Tensor | None = None  # [C, d], set after each task
        self.distilled: list[int] = []

    def before_task(self, experience: Experience) -> None:
        self.distilled = sorted(set(self.seen_classes) - set(experience.classes))
        self.distilled_ids = torch.tensor(self.distilled, dtype=torch.long, device=self.device())  # once per task
        super().before_task(experience)

    def train_set(self, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().train_set(experience)
        exemplars, exemplar_labels = self.buffer.contents()
        if not len(exemplar_labels):
            return images, labels
        return torch.cat([images, exemplars]), torch.cat([labels.to(images.device), exemplar_labels])

    def forward(self, batch: Batch) -> ForwardOutput:
        if batch.training or self.class_means is None:
            return self.net(batch)
        return ForwardOutput(nme_logits(self.features(batch), self.class_means))

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        logits = out.logits.float()
        targets = F.one_hot(batch.labels, logits.shape[1]).float()
        if self.distilled and self.has_teacher:
            old = self.distilled_ids
            targets[:, old] = torch.sigmoid(self.teacher_logits(batch)[:, old])
        if class_mask is not None:
            logits, targets = logits[:, class_mask], targets[:, class_mask]
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        return loss + out.extra_loss if out.extra_loss is not None else loss

    @torch.no_grad()
    def normalised_features(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False) -> torch.Tensor:
        rows = []
        for batch in self.prepared_batches(images, labels):
            if flip:
                batch.images = batch.images.flip(-1)
            with self.autocast():
                rows.append(F.normalize(self.features(batch).float(), dim=1))
        return torch.cat(rows)

    @torch.no_grad()
    def after_task(self, experience: Experience) -> None:
        task_images = self.task_images
        super().after_task(experience)
        self.keep_teacher()
        was_training = self.training
        self.eval()
        buffer, task = self.buffer, experience.task_id
        labels = experience.train_labels.to(task_images.device)
        new = sorted(set(labels.tolist()))
        m = buffer.capacity // max(len(buffer.groups()) + len(new), 1)
        if buffer.size:
            buffer.keep(torch.nonzero(buffer.ranks[:buffer.size] < m).flatten())
        features = self.normalised_features(task_images, labels)
        for c in new:
            rows = torch.nonzero(labels == c).flatten()
            picks = rows[herding_order(features[rows], m)]
            buffer.append(task_images[picks], labels[picks], task, torch.arange(len(picks)))
        self.class_means = self.exemplar_means()
        self.train(was_training)

    def exemplar_means(self) -> torch.Tensor:
        images, labels = self.buffer.contents()
        stats = None
        for flip in (False, True) if self.run_config.train_aug else (False,):
            features = self.normalised_features(images, labels, flip)
            if stats is None:
                stats = ClassStatistics(self.info.n_classes, features.shape[1], device=features.device)
            stats.update(features, labels)
        return F.normalize(stats.means().float(), dim=1)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "class_means": self.class_means}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        means = state.get("class_means")
        self.class_means = means.to(self.device()) if means is not None else None
