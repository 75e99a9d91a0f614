"""Training throughput of the rehearsal and regularisation baselines, each at its reference batch
size (its configs/<name>.yaml), printed as JSON lines.

Each strategy is built as ``clframe run --scenario split_cifar100 --strategy NAME`` builds it
(ViT-B/16 at 224, random weights: the speed is the same), trained on a first CIFAR-shaped task of
10 classes (so that the buffer, the teacher and the Fisher exist), then timed on a second task of
10 other classes: ``train_img_s`` counts the task's own images per second of the training loop
(replayed rows are extra work inside it), ``after_task_s`` the pass after training (EWC's
per-image Fisher, iCaRL's herding and class means).

    python bench/rehearsal_throughput.py                       # every baseline, on the GPU
    python bench/rehearsal_throughput.py --strategies er derpp --steps 20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import environment, synthetic_experience  # noqa: E402

from clframe.config import resolve_config  # noqa: E402
from clframe.engine import Engine, resolve_device  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.runner import build_strategy  # noqa: E402
from clframe.scenarios.base import CLASS_IL, Stream  # noqa: E402

BASELINES = ["finetune", "er", "der", "derpp", "icarl", "gdumb", "ewc", "lwf"]


def measure(name: str, args, device: torch.device) -> dict:
    torch._dynamo.reset()
    cli = dict(scenario="split_cifar100", strategy=name, model=args.model, pretrained=False, device=args.device,
               progress=False)
    config = resolve_config(cli, None, ["epochs=1", *args.set], SCENARIOS.get("split_cifar100").config_cls,
                            STRATEGIES.get(name).config_cls)
    batch = config.run.batch_size
    first = synthetic_experience(batch * args.warmup, 64, list(range(10)), 1)
    timed = synthetic_experience(batch * args.steps, 64, list(range(10, 20)), 2)
    first.task_id, timed.task_id = 0, 1
    stream = Stream("synthetic", CLASS_IL, [f"c{i}" for i in range(100)], [first, timed])
    engine = Engine(config, stream, build_strategy(config, stream), device, lambda metrics, step: None)
    engine.train_task(first)
    engine.timer = type(engine.timer)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    engine.train_task(timed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    buffer = getattr(engine.strategy, "buffer", None)
    return dict(environment(device), strategy=name, model=args.model, batch=batch,
                replay_rows=getattr(engine.strategy, "replay_count", lambda: 0)() if buffer is not None else 0,
                train_img_s=round(engine.timer.rate("train"), 1),
                train_images=engine.timer.images["train"],
                after_task_s=round(total - engine.timer.seconds["train"], 2),
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                buffer_images=buffer.size if buffer is not None else None,
                trainable_params=engine.strategy.count_trainable())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=BASELINES)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--steps", type=int, default=40, help="timed training batches")
    parser.add_argument("--warmup", type=int, default=10, help="batches of the first (untimed) task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="config override, as clframe run --set")
    args = parser.parse_args()
    device = resolve_device(args.device)
    for name in args.strategies:
        print(json.dumps(measure(name, args, device)), flush=True)


if __name__ == "__main__":
    main()
