"""Task-boundary checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds what a resumed run needs to continue exactly: the strategy's trainable state
(never the frozen backbone), its continual-learning state, the accuracy matrix so far, the
stream position, the resolved config and the MLflow run id. Per-task seeds (engine.task_seed)
make the random draws after a boundary independent of what happened before it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clframe.errors import ClframeError

FILE_NAME = "last.pt"


def checkpoint_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir).expanduser() / run_id / FILE_NAME


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ClframeError(f"no checkpoint at {path}; pass a run id from `clframe compare` or a .pt path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe pickles all mean: not ours
        raise ClframeError(f"{path} is not a readable clframe checkpoint ({type(exc).__name__})") from None


def find(target: str, checkpoint_dir: str | Path) -> Path:
    """``--resume`` takes a checkpoint file or an MLflow run id."""
    as_path = Path(target).expanduser()
    if as_path.is_file():
        return as_path
    if as_path.is_dir() and (as_path / FILE_NAME).is_file():
        return as_path / FILE_NAME
    by_id = checkpoint_path(checkpoint_dir, target)
    if by_id.is_file():
        return by_id
    raise ClframeError(f"--resume {target}: no checkpoint file and no run with that id under "
                       f"{Path(checkpoint_dir).expanduser()}")


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if str(saved.get(k)) != str(current.get(k))]
