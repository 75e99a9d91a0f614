"""Task-boundary checkpoints: written atomically, read back with ``weights_only=True``.

At the end of every task the runner writes ``<checkpoint_dir>/<run id>/last.pt`` holding what a
resumed run needs to continue exactly where the uninterrupted one would be:

- ``strategy_state``: the strategy's trainable state (never the frozen backbone, which is rebuilt
  from its weights), ``cl_state`` (seen classes, task id) and ``extra_state`` (strategy-defined);
- ``optimizer_state``: the optimizer of the task just finished. The engine builds a fresh
  optimizer at every task (as the L2P/DualPrompt references do), so a resume does not load it;
  it is kept so the checkpoint is complete (e.g. to go on training the last task by hand). The
  checkpoint of the last task drops it (trainable state only) unless ``run.keep_full_checkpoint``:
  for a ViT-B finetune it is twice the weights, and a finished run resumes no task;
- ``rng``: torch (CPU and every CUDA device), numpy and Python RNG states, restored on resume.
  The engine also re-seeds at every task from (seed, task), so the draws after a boundary do not
  depend on the RNG history before it; the saved states cover anything a strategy draws outside;
- ``acc_matrix`` so far, the stream position (``tasks_done``, ``epochs_done``, ``stream``: the
  tasks' classes, image counts and a fingerprint of their pixels), the resolved config (flattened
  for comparison, and as YAML so ``--resume RUN`` alone rebuilds it), the MLflow run id, the
  absolute tracking URI (so a resume from any folder finds the store) and ``elapsed_s``, the
  run's wall time so far (a resumed run's ``wall_time_s`` counts the whole run).

There is one copy: the MLflow run gets no copy of it. Beside it, ``.lock`` is held by the process
driving the run (clframe.runfiles.RunLock).

The file is written to a temporary name in the same folder, fsynced, then renamed over the old
one, so a crash or a kill at any moment leaves either the previous checkpoint or the new one (a
temporary file a kill leaves behind is removed by the next run or resume in that checkpoint folder).
Only tensors and plain Python values go in, so ``torch.load(weights_only=True)`` reads it back
without unpickling arbitrary objects.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from clframe.errors import ClframeError
from clframe.runfiles import is_disk_full, kill_point

FILE_NAME = "last.pt"
FORMAT_VERSION = 2


def checkpoint_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir).expanduser() / run_id / FILE_NAME


# ----- RNG states -----
def rng_state() -> dict[str, Any]:
    """Every global RNG a run may draw from, as tensors and plain values (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "cuda": [],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----- writing -----
_SAFE_LEAVES = (torch.Tensor, str, int, float, bool, type(None), bytes, torch.dtype, torch.device)


def _check_safe(value: Any, where: str) -> None:
    """Refuse what ``weights_only=True`` could not read back, naming the key (a strategy bug)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_safe(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _check_safe(item, f"{where}[{k}]")
    elif not isinstance(value, _SAFE_LEAVES):
        raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; a checkpoint holds only "
                        f"tensors and plain Python values (convert numpy arrays with torch.from_numpy)")


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    _check_safe(payload, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point("checkpoint_written")
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):  # torch wraps the OSError in a RuntimeError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ----- reading -----
@contextlib.contextmanager
def foreign_file_warnings_silenced() -> Iterator[None]:
    """torch.load warns before it fails on a file that is not a torch file (e.g. 'Detected pickle
    protocol 171'); the one-line error that follows says it all, so the warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise ClframeError(f"no checkpoint at {path}; pass a run id or the path of a last.pt")
    try:
        with foreign_file_warnings_silenced():
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, foreign or unsafe pickles all mean: not ours
        raise ClframeError(f"{path} is not a readable clframe checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "tasks_done" not in payload:
        raise ClframeError(f"{path} is not a clframe checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise ClframeError(f"{path} was written by another clframe version (checkpoint format "
                           f"{payload.get('version')}, this one reads {FORMAT_VERSION}); start the run again")
    return payload


def find(target: str, checkpoint_dir: str | Path) -> Path:
    """``--resume`` takes a checkpoint file, a run's checkpoint folder, or an MLflow run id."""
    as_path = Path(target).expanduser()
    if as_path.is_file():
        return as_path
    if as_path.is_dir() and (as_path / FILE_NAME).is_file():
        return as_path / FILE_NAME
    by_id = checkpoint_path(checkpoint_dir, target)
    if by_id.is_file():
        return by_id
    raise ClframeError(f"--resume {target}: no such checkpoint file, and no checkpoint of a run with that id "
                       f"under {Path(checkpoint_dir).expanduser()} (a run that finished no task has none; "
                       f"pass --set checkpoint_dir=DIR if the run used another folder)")


def checkpoint_dir_hint(config_file: str | None, sets: list[str] | tuple[str, ...]) -> str:
    """Where to look for ``--resume RUN_ID``: the checkpoint_dir the command line asks for, if any."""
    from clframe.config import RunConfig, load_yaml, parse_set

    directory = RunConfig.checkpoint_dir
    if config_file:
        run_section = load_yaml(config_file, "config file").get("run") or {}
        if isinstance(run_section, dict) and run_section.get("checkpoint_dir"):
            directory = str(run_section["checkpoint_dir"])
    for item in sets:
        key, value = parse_set(item)
        if key in ("checkpoint_dir", "run.checkpoint_dir"):
            directory = str(value)
    return directory


def locate(target: str, config_file: str | None, sets: list[str] | tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume target`` means, and the resolved config it was made with (nested
    sections, as ``ResolvedConfig.to_yaml`` writes them): the base a resumed run's config starts from."""
    from clframe.config import yaml_load

    path = find(target, checkpoint_dir_hint(config_file, sets))
    saved = load(path, mmap=True)
    sections = yaml_load(saved["config_yaml"])
    return path, sections


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    """``key: checkpoint value -> this command's value`` for every key that differs."""
    keys = sorted((set(saved) | set(current)) - ignore)
    missing = "(absent)"
    return [f"{k}: {saved.get(k, missing)} -> {current.get(k, missing)}" for k in keys
            if str(saved.get(k, missing)) != str(current.get(k, missing))]


def restore_strategy(strategy: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's trainable state; only the frozen backbone may be absent from it."""
    try:
        missing, unexpected = strategy.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()[:200]
        raise ClframeError(f"{path} does not fit this strategy: {first}") from None
    trainable = {name for name, p in strategy.named_parameters() if p.requires_grad}
    missing = [k for k in missing if not k.startswith("backbone.") or k in trainable]
    if missing or unexpected:
        raise ClframeError(f"{path} does not fit this strategy (missing {', '.join(missing[:5]) or 'nothing'}; "
                           f"unexpected {', '.join(unexpected[:5]) or 'nothing'})")
