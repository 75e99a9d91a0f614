"""Split CIFAR-100: 10 tasks x 10 classes, class order fixed by the seed.

Reads the standard ``cifar-100-python`` pickle layout under ``--data-root``; without it, unpacks a
``cifar-100-python.tar.gz`` found there, else tries torchvision's download, and says in one line
what to do when that is impossible.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.registry import register_scenario
from clframe.scenarios.base import CLASS_IL, Stream, class_order, split_by_classes

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"


@dataclass
class SplitCifar100Config:
    n_tasks: int = option(10, "number of tasks (100 classes split evenly)", choices=(1, 2, 5, 10, 20, 25, 50))
    shuffle_classes: bool = option(True, "class order fixed by the run seed (else 0..99)")
    download: bool = option(True, "try torchvision's download when the data is not under data_root")


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts, lists, bytes and numpy arrays; any other object is refused."""

    ALLOWED = {(core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                          ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            data = _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle raises, the fix is the same
        raise ClframeError(f"{path} is corrupted or truncated ({type(exc).__name__}); delete "
                           f"{path.parent} and download cifar-100-python again") from None
    if not isinstance(data, dict):
        raise ClframeError(f"{path} is not a CIFAR-100 file (it holds a {type(data).__name__}, not a dict); "
                           f"expected the cifar-100-python layout (train, test, meta)")
    return data


def _extract(root: Path) -> None:
    """Unpack ``cifar-100-python.tar.gz`` found under ``root`` (downloaded by hand) all at once:
    into a temporary folder first, so a damaged archive leaves no half-extracted data behind."""
    archive = root / ARCHIVE
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        if not (staging / FOLDER / "train").is_file():
            raise ClframeError(f"{archive} does not hold {FOLDER}/train; expected the archive from "
                               f"https://www.cs.toronto.edu/~kriz/cifar.html (python version)")
        os.replace(staging / FOLDER, root / FOLDER)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ClframeError(f"{archive} is truncated or corrupted ({type(exc).__name__}); delete it and "
                           f"download it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _to_images(batch: dict, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except (KeyError, ValueError, TypeError) as exc:
        raise ClframeError(f"{path} is not a CIFAR-100 batch ({exc}); expected the "
                           f"cifar-100-python layout (train, test, meta)") from None
    if len(images) != len(labels):
        raise ClframeError(f"{path}: {len(images)} images but {len(labels)} labels (truncated?)")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def load_cifar100(root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, list[str]]:
    folder = root / FOLDER
    if not folder.exists() and (root / ARCHIVE).is_file():
        _extract(root)
    if not (folder / "train").is_file() and download:
        try:
            from torchvision.datasets import CIFAR100

            CIFAR100(str(root), train=True, download=True)
        except Exception as exc:  # no network, no space, ...: the user's fix is the same
            raise ClframeError(f"CIFAR-100 not found in {folder} and the download failed "
                               f"({type(exc).__name__}); put cifar-100-python/ there or pass "
                               f"--data-root DIR") from None
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise ClframeError(f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}; pass "
                           f"--data-root DIR holding cifar-100-python/")
    train_x, train_y = _to_images(_unpickle(folder / "train"), folder / "train")
    test_x, test_y = _to_images(_unpickle(folder / "test"), folder / "test")
    meta = _unpickle(folder / "meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"fine_label_names", [])]
    if len(names) != 100:
        raise ClframeError(f"{folder / 'meta'} lacks the 100 fine label names")
    return train_x, train_y, test_x, test_y, names


@register_scenario("split_cifar100", config=SplitCifar100Config)
def split_cifar100(cfg: SplitCifar100Config, run: RunConfig) -> Stream:
    """Class-IL: CIFAR-100 in 10 tasks x 10 classes, order by seed (--data-root/cifar-100-python)."""
    train_x, train_y, test_x, test_y, names = load_cifar100(Path(run.data_root).expanduser(), cfg.download)
    order = class_order(100, run.seed, cfg.shuffle_classes, run.class_order)
    experiences = split_by_classes(train_x, train_y, test_x, test_y, order, cfg.n_tasks)
    return Stream("split_cifar100", CLASS_IL, names, experiences, info={"class_order": order})
