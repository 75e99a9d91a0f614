"""Split Digits: scikit-learn's bundled 8x8 handwritten digits as a class-IL stream.

It ships with scikit-learn, so a fresh machine runs a real continual-learning experiment with no
download. The 8x8 images are upsampled to the model's input size on the device.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clframe.config import RunConfig, option
from clframe.registry import register_scenario
from clframe.scenarios.base import CLASS_IL, Stream, class_order, split_by_classes

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class SplitDigitsConfig:
    n_tasks: int = option(5, "number of tasks (10 classes split evenly)", choices=(1, 2, 5, 10))
    test_fraction: float = option(0.25, "share of each class held out for testing", min=0.05)
    shuffle_classes: bool = option(True, "class order fixed by the run seed (else 0..9)")


def load_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as uint8 [N, 3, 8, 8] (grey replicated to RGB) and int64 labels."""
    data = _read_digits()
    grey = np.round(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(grey).unsqueeze(1).repeat(1, 3, 1, 1).contiguous()
    return images, torch.from_numpy(data[:, -1].astype(np.int64))


def _read_digits() -> np.ndarray:
    """scikit-learn's ``digits.csv.gz`` (64 pixel values 0-16, then the label, per row), read without
    importing scikit-learn: ``sklearn.datasets`` pulls in scipy and pandas, ~2 s of a CPU run's start."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders
                 if (Path(f) / "datasets" / "data" / "digits.csv.gz").is_file()), None)
    if path is None:  # another layout: let scikit-learn find its file
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.column_stack([digits.data, digits.target])
    with gzip.open(path, "rt") as rows:
        return np.loadtxt(rows, delimiter=",")


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded share of indices goes to test: (train_idx, test_idx)."""
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels.numpy() == c)
        rng.shuffle(idx)
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test_idx.extend(idx[:n_test])
        train_idx.extend(idx[n_test:])
    # dtype given: an empty split (everything held out) must still index, so the run can say so in one line
    return torch.tensor(sorted(train_idx), dtype=torch.long), torch.tensor(sorted(test_idx), dtype=torch.long)


@register_scenario("split_digits", config=SplitDigitsConfig)
def split_digits(cfg: SplitDigitsConfig, run: RunConfig) -> Stream:
    """Class-IL, offline: scikit-learn's bundled digits, 5 tasks x 2 classes (no download)."""
    images, labels = load_digits_uint8()
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, run.seed)
    order = class_order(10, run.seed, cfg.shuffle_classes, run.class_order)
    experiences = split_by_classes(images[train_idx], labels[train_idx], images[test_idx],
                                   labels[test_idx], order, cfg.n_tasks)
    return Stream("split_digits", CLASS_IL, list(DIGIT_NAMES), experiences, info={"class_order": order})
