"""What a scenario hands the engine: a stream of experiences plus what strategies may need.

Images are materialised once as uint8 tensors ``[N, 3, H, W]`` so the engine can move a task's
data to the device and augment it there in batches (no per-sample Python on the hot path).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from clframe.errors import ClframeError

CLASS_IL = "class_il"
DOMAIN_IL = "domain_il"
KIND_NAMES = {CLASS_IL: "class-IL", DOMAIN_IL: "domain-IL"}  # how the kinds are written to the user


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


# Class orders the references use, by name (``run.class_order``); each maps n_classes to an order.
PYCIL_SEED = 1993  # PyCIL/LAMDA-PILOT exps/*.json "seed": [1993], "shuffle": true (utils/data_manager.py)
NAMED_ORDERS = {
    # PyCIL and LAMDA-PILOT, utils/data_manager.py DataManager._setup_data: np.random.seed(seed);
    # order = np.random.permutation(n).tolist(); CIFAR-100 starts 68, 56, 78, 8, 23, ...
    "pycil": lambda n: np.random.RandomState(PYCIL_SEED).permutation(n).tolist(),
    # l2p-pytorch, datasets.py split_single_dataset: labels = range(n), shuffled only with --shuffle,
    # whose default (configs/cifar100_l2p.py) is False; so 0..n-1 (torchvision's label order).
    "l2p": lambda n: list(range(n)),
}


def class_order(n_classes: int, seed: int, shuffle: bool = True, named: str | list[int] = "seed") -> list[int]:
    """The class order for a class-IL split, as ``run.class_order`` asks: ``seed`` (a permutation
    fixed by ``seed``, or 0..n-1 when not ``shuffle``), a name of ``NAMED_ORDERS``, an explicit list
    of class ids, or a file holding one (YAML/JSON list, or ids separated by commas/blanks)."""
    if isinstance(named, str) and named == "seed":
        return np.random.RandomState(seed).permutation(n_classes).tolist() if shuffle else list(range(n_classes))
    if not shuffle:
        raise ClframeError(f"class_order={named!r} and shuffle_classes=false ask for two different orders; "
                           f"leave shuffle_classes at true (or class_order at seed)")
    if isinstance(named, str) and named in NAMED_ORDERS:
        return NAMED_ORDERS[named](n_classes)
    order = _read_order(named) if isinstance(named, str) else [int(c) for c in named]
    if sorted(order) != list(range(n_classes)):
        raise ClframeError(f"class_order must list each of the {n_classes} class ids 0..{n_classes - 1} once; got "
                           f"{len(order)} entries{_order_problem(order, n_classes)}")
    return order


def _read_order(spec: str) -> list[int]:
    text = spec
    if not spec.lstrip().startswith("["):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ClframeError(f"class_order {spec!r} is neither seed, {', '.join(NAMED_ORDERS)}, a list like "
                               f"[3, 1, 0, 2] nor a readable file")
        text = path.read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None
    items = loaded if isinstance(loaded, list) else re.split(r"[\s,]+", text.strip().strip("[]"))
    try:
        return [int(item) for item in items if str(item).strip() != ""]
    except (TypeError, ValueError):
        raise ClframeError(f"class_order {spec!r}: expected integer class ids") from None


def _order_problem(order: list[int], n_classes: int) -> str:
    repeated = sorted({c for c in order if order.count(c) > 1})
    outside = sorted({c for c in order if not 0 <= c < n_classes})
    missing = sorted(set(range(n_classes)) - set(order))
    parts = [f"{what} {values[:10]}" for what, values in (("repeated", repeated), ("out of range", outside),
                                                          ("missing", missing)) if values]
    return f" ({'; '.join(parts)})" if parts else ""


def check_class_order(stream: "Stream", run) -> None:
    """Refuse a ``class_order`` the stream cannot honour, instead of ignoring it."""
    if run.class_order == "seed":
        return
    if stream.kind != CLASS_IL:
        raise ClframeError(f"class_order applies to class-IL streams; {stream.name} is domain-IL (leave it at seed)")
    if "class_order" not in stream.info or stream.name.startswith("avalanche"):
        raise ClframeError(f"scenario {stream.name} takes its class order from its own options, not class_order "
                           f"(for avalanche:<Name> pass --set 'avalanche:<Name>.kwargs={{fixed_class_order: [...]}}')")


def class_order_record(stream: "Stream", run) -> str | None:
    """The class order as JSON for the run's ``class_order.json`` artifact (None for domain-IL)."""
    order = stream.info.get("class_order")
    if order is None:
        return None
    order = [int(c) for c in order]
    record = {"class_order": run.class_order, "seed": run.seed, "order": order,
              "names": [stream.class_names[c] for c in order],
              "tasks": [list(map(int, e.classes)) for e in stream.experiences]}
    return "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items()) + "\n}\n"


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
