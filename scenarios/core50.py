"""CORe50 new instances (NI): 8 training sessions of the same 50 objects (or 10 categories), one
domain each (new backgrounds and lighting), read through Avalanche's CORe50 benchmark.

The data must already be under ``--data-root``/core50 in the layout Avalanche downloads (unless
``core50.download`` is on). CORe50's protocol tests on held-out sessions (s3, s7, s10): that one
test set is every experience's test set, so ``A[i][j]`` is the same for every j <= i.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.registry import register_scenario
from clframe.scenarios.avalanche_streams import benchmark_to_stream, import_classic
from clframe.scenarios.base import DOMAIN_IL, Stream

METADATA = ("paths.pkl", "LUP.pkl", "labels.pkl", "labels2names.pkl")
N_SESSIONS = 8  # NI training batches


@dataclass
class Core50Config:
    ordering: int | None = option(None, "which of CORe50's 10 official NI orderings (0-9); None means seed % 10")
    object_level: bool = option(True, "the 50 objects are the classes (else the 10 categories)")
    mini: bool = option(False, "read core50_32x32 instead of core50_128x128")
    image_size: int | None = option(None, "resize images to this square size once (None keeps 128 or 32)", min=8)
    workers: int = option(4, "DataLoader worker processes decoding the images once", min=0)
    download: bool = option(False, "let Avalanche download CORe50 (several GB) into --data-root/core50 when absent")


def expected_layout(root: Path, mini: bool) -> str:
    images = "core50_32x32" if mini else "core50_128x128"
    return (f"{root}/{images}/s1..s11/o1..o50/*.png, {root}/batches_filelists/NI_inc/run0..run9/"
            f"{{train_batch_00..07,test}}_filelist.txt and {root}/{{{','.join(METADATA)}}}")


def missing_files(root: Path, mini: bool, ordering: int) -> list[str]:
    images = "core50_32x32" if mini else "core50_128x128"
    run_dir = Path("batches_filelists") / "NI_inc" / f"run{ordering}"
    wanted = [images, *METADATA, str(run_dir / "test_filelist.txt")]
    wanted += [str(run_dir / f"train_batch_{b:02d}_filelist.txt") for b in range(N_SESSIONS)]
    return [name for name in wanted if not (root / name).exists()]


def session_names(root: Path, ordering: int) -> list[str]:
    """The session (s1..s11) each NI training batch holds, from the first line of its file list."""
    names = []
    for batch in range(N_SESSIONS):
        path = root / "batches_filelists" / "NI_inc" / f"run{ordering}" / f"train_batch_{batch:02d}_filelist.txt"
        first = path.read_text().split(maxsplit=1)
        names.append(first[0].split("/")[0] if first else f"batch_{batch}")
    return names


def class_names(root: Path, ordering: int, object_level: bool) -> list[str] | None:
    """Object names (e.g. 'plug_adapter1') from labels2names.pkl; a category is its objects' stem."""
    try:
        with (root / "labels2names.pkl").open("rb") as handle:
            names = pickle.load(handle)["ni"][ordering]
        objects = [str(names[k]) for k in range(50)]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError):
        return None
    return objects if object_level else [objects[5 * c].rstrip("0123456789") for c in range(10)]


@register_scenario("core50", config=Core50Config)
def core50(cfg: Core50Config, run: RunConfig) -> Stream:
    """Domain-IL: CORe50 NI, 8 sessions of 50 objects (Avalanche's loader; data in --data-root/core50)."""
    root = Path(run.data_root).expanduser() / "core50"
    ordering = run.seed % 10 if cfg.ordering is None else cfg.ordering
    if not 0 <= ordering <= 9:
        raise ClframeError(f"core50.ordering must be 0-9 (CORe50 has 10 official NI orderings); got {ordering}")
    missing = missing_files(root, cfg.mini, ordering)
    if missing and not cfg.download:
        raise ClframeError(f"CORe50 not found: {root} lacks {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}; expected {expected_layout(root, cfg.mini)} "
                           f"(pass --data-root DIR holding core50/, or --set core50.download=true)")
    CORe50 = import_classic().CORe50  # noqa: N806 - Avalanche's name
    quiet = contextlib.redirect_stdout(io.StringIO()) if not missing else contextlib.nullcontext()
    try:
        with quiet:  # Avalanche prints progress lines while it loads the metadata
            benchmark = CORe50(scenario="ni", run=ordering, object_lvl=cfg.object_level, mini=cfg.mini,
                               dataset_root=root)
    except Exception as exc:  # a failed download or a damaged file: the user's fix is the same
        raise ClframeError(f"CORe50 could not be loaded from {root} ({type(exc).__name__}); expected "
                           f"{expected_layout(root, cfg.mini)}") from None
    return benchmark_to_stream(benchmark, "core50", DOMAIN_IL, class_names(root, ordering, cfg.object_level),
                               session_names(root, ordering), cfg.image_size, cfg.workers)
