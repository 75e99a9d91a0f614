"""What a scenario hands the engine: a stream of experiences plus what strategies may need.

Images are materialised once as uint8 tensors ``[N, 3, H, W]`` so the engine can move a task's
data to the device and augment it there in batches (no per-sample Python on the hot path).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

CLASS_IL = "class_il"
DOMAIN_IL = "domain_il"


@dataclass
class Experience:
    """One task: its id, the global class ids it holds, and its train/test data."""

    task_id: int
    classes: list[int]
    train_images: torch.Tensor  # uint8 [N, 3, H, W]
    train_labels: torch.Tensor  # int64 [N], global class ids
    test_images: torch.Tensor
    test_labels: torch.Tensor
    domain: str | None = None

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"task {self.task_id}: {name}_images must be uint8 [N, 3, H, W], "
                                 f"got {images.dtype} {tuple(images.shape)}")
            if len(images) != len(labels):
                raise ValueError(f"task {self.task_id}: {len(images)} {name} images but {len(labels)} labels")


@dataclass
class Stream:
    """A continual-learning stream; ``kind`` is CLASS_IL (head over seen classes, no task id at
    test) or DOMAIN_IL (same classes in every experience, a new domain each time)."""

    name: str
    kind: str
    class_names: list[str]
    experiences: list[Experience]
    domain_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_tasks(self) -> int:
        return len(self.experiences)

    def joint_experience(self) -> Experience:
        """All tasks' training data as one experience (the joint upper bound's single task)."""
        return Experience(
            task_id=0,
            classes=sorted({c for e in self.experiences for c in e.classes}),
            train_images=torch.cat([e.train_images for e in self.experiences]),
            train_labels=torch.cat([e.train_labels for e in self.experiences]),
            test_images=self.experiences[0].test_images[:0], test_labels=self.experiences[0].test_labels[:0])


def class_order(n_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """The class order for a class-IL split: a permutation fixed by ``seed`` (identity if not shuffled)."""
    if not shuffle:
        return list(range(n_classes))
    return np.random.RandomState(seed).permutation(n_classes).tolist()


def split_by_classes(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, order: list[int], n_tasks: int) -> list[Experience]:
    """Cut a labelled set into ``n_tasks`` experiences of consecutive classes in ``order``."""
    if len(order) % n_tasks:
        raise ValueError(f"{len(order)} classes do not split into {n_tasks} equal tasks")
    per_task = len(order) // n_tasks
    experiences = []
    for task_id in range(n_tasks):
        classes = order[task_id * per_task:(task_id + 1) * per_task]
        wanted = torch.tensor(classes)
        train_mask = torch.isin(labels, wanted)
        test_mask = torch.isin(test_labels, wanted)
        experiences.append(Experience(task_id, classes, images[train_mask], labels[train_mask],
                                      test_images[test_mask], test_labels[test_mask]))
    return experiences
