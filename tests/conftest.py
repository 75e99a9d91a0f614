"""Shared test helpers: a tiny model, a fake CIFAR-100 archive in the real pickle layout, and
ways to run the CLI in-process or as a real subprocess."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# A ViT small enough for fast CPU tests; any strategy must work with it.
TINY_MODEL_KWARGS = "{patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, weight_init: moco}"
TINY_SETS = ["--set", f"model_kwargs={TINY_MODEL_KWARGS}", "--set", "epochs=1", "--set", "image_size=16",
             "--no-progress"]


def tiny_run_options(tmp_path: Path) -> list[str]:
    return TINY_SETS + ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                        "--set", f"checkpoint_dir={tmp_path}/ckpt"]


def clframe_subprocess(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m clframe ARGS`` as a user would (separate process, real exit code)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "clframe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll a growing stderr file every 2 ms until ``text`` shows up (e.g. a task's progress bar)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None:
            pytest.fail(f"the run ended before {text!r} appeared:\n{path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{text!r} did not appear in {timeout} s")
        time.sleep(0.002)


def write_fake_cifar100(root: Path, per_class_train: int = 3, per_class_test: int = 2, seed: int = 0) -> Path:
    """A tiny ``cifar-100-python`` folder in the real on-disk format (pickled dicts of bytes keys)."""
    rng = np.random.RandomState(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        # Each class gets its own mean colour so a model can actually learn something.
        data = (rng.randint(0, 64, size=(len(labels), 3072)) + (labels[:, None] * 2)).astype(np.uint8)
        batch = {b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": split.encode(),
                 b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": data}
        with (folder / split).open("wb") as handle:
            pickle.dump(batch, handle)
    meta = {b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    with (folder / "meta").open("wb") as handle:
        pickle.dump(meta, handle)
    return folder


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    write_fake_cifar100(tmp_path / "data")
    return tmp_path / "data"
