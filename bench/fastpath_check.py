"""Fast path vs plain path on the same seed and data: the accuracy matrices must agree.

The plain path is fp32 eager (``amp=off frozen_bf16=false compile=off cuda_graph=off``); the fast
path is the CUDA default (bf16 autocast, frozen weights held in bf16, compiled blocks, the training
step captured as a CUDA graph). Runs the offline
Split Digits stream, so it needs no data, and prints one JSON line per path plus the largest
difference.

    python bench/fastpath_check.py --strategy l2p --set lr=0.1 --set lr_batch_scale=false
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clframe.config import resolve_config  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.runner import run_experiment  # noqa: E402

PATHS = {"plain": ["amp=off", "frozen_bf16=false", "compile=off", "cuda_graph=off"], "fast": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="l2p")
    parser.add_argument("--scenario", default="split_digits")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    matrices = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in PATHS.items():
            cli = dict(scenario=args.scenario, strategy=args.strategy, progress=False)
            config = resolve_config(cli, None, [f"tracking_uri=sqlite:///{tmp}/mlflow.db",
                                                f"checkpoint_dir={tmp}/ckpt", *args.set, *sets],
                                    SCENARIOS.get(args.scenario).config_cls, STRATEGIES.get(args.strategy).config_cls)
            result = run_experiment(config, echo=lambda line: None)
            matrices[name] = result.acc_matrix
            print(json.dumps({"path": name, "strategy": args.strategy, "acc_avg": round(result.summary["acc_avg"], 2),
                              "acc_matrix": [[None if np.isnan(v) else round(float(v), 2) for v in row]
                                             for row in result.acc_matrix]}), flush=True)
    difference = float(np.nanmax(np.abs(matrices["plain"] - matrices["fast"])))
    print(json.dumps({"max_abs_difference_points": round(difference, 2)}))


if __name__ == "__main__":
    main()
