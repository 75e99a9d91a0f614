"""Whole-protocol seconds of the pre-trained-model baselines on Split CIFAR-100 shapes, as JSON lines.

Each case runs ``run_experiment`` exactly as ``clframe run`` does (MLflow logging and checkpoints
included) on a generated ``cifar-100-python`` archive of the real shape (50 000 + 10 000 random
images, 10 tasks) with a randomly initialised ViT-B/16 (same shapes and cost as the pretrained one;
accuracy is meaningless). Cases: SimpleCIL; RanPAC without first-session adaptation (the random
projection, statistics and ridge solves alone); RanPAC with its defaults (20 adapter epochs on
task 0 first). Every line also gives the engine's own wall time and the evaluation throughput.

    python bench/ptm_baselines.py                       # all three cases
    python bench/ptm_baselines.py --cases simplecil     # one
    python bench/ptm_baselines.py --set ranpac.projection_dim=5000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clframe.engine import resolve_device  # noqa: E402
from clframe.runner import run_experiment  # noqa: E402
from throughput import config_for, environment, write_cifar_archive  # noqa: E402

CASES = {  # name -> (strategy, extra --set values)
    "simplecil": ("simplecil", []),
    "ranpac_no_adaptation": ("ranpac", ["ranpac.first_session=false"]),
    "ranpac": ("ranpac", []),
}


def run_case(name: str, args, root: Path) -> dict:
    strategy, extra = CASES[name]
    sets = [f"data_root={root / 'data'}", f"tracking_uri=sqlite:///{root}/mlflow.db",
            f"checkpoint_dir={root / 'ckpt'}", *extra, *args.set]
    config = config_for(strategy, args, sets)
    torch._dynamo.reset()
    start = time.perf_counter()
    result = run_experiment(config, echo=lambda line: None)
    wall = time.perf_counter() - start
    device = resolve_device(args.device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(environment(device), case=name, strategy=strategy, sets=extra + list(args.set),
                epochs=config.run.epochs, batch=config.run.batch_size, protocol_wall_s=round(wall, 1),
                engine_wall_s=round(result.wall_s, 1), acc_avg=round(result.summary["acc_avg"], 2),
                train_img_s=round(result.train_img_s, 1), eval_img_s=round(result.eval_img_s, 1), peak_gib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=48, help="training batch (RanPAC's first session)")
    parser.add_argument("--eval-batch", type=int, default=256, help="evaluation and statistics-pass batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="config override, as clframe run --set")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar_archive(root / "data")
        for name in args.cases:
            if resolve_device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            print(json.dumps(run_case(name, args, root)), flush=True)


if __name__ == "__main__":
    main()
