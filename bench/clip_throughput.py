"""Train and eval img/s of the CLIP strategies through the real engine, as JSON lines.

    python bench/clip_throughput.py --strategies zeroshot_clip coop cocoop dapl --batch 128 --classes 10 100

Each strategy is built as ``clframe run`` builds it (configs/<name>.yaml, ``--model``, random
init) and the engine times ``train_task`` / ``evaluate`` on a CIFAR-shaped task (uint8 32x32,
resized to the model's input on the device) after a warm-up task. ``--classes`` is how many
classes are seen: 10 is Split CIFAR-100's first task, 100 its last (the text side, CoCoOp's
above all, grows with it). DAPL gets a domain-IL stream and is timed on its second domain, so
its classifier holds two domains' prompts. zeroshot_clip trains nothing: only eval is timed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clframe.config import resolve_config  # noqa: E402
from clframe.engine import Engine, resolve_device  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.runner import build_strategy  # noqa: E402
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience, Stream  # noqa: E402


def experience(task_id: int, classes: list[int], n_train: int, n_test: int, seed: int) -> Experience:
    generator = torch.Generator().manual_seed(seed)
    def images(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    def labels(n):
        return torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=generator)]
    return Experience(task_id, classes, images(n_train), labels(n_train), images(n_test), labels(n_test),
                      domain=f"domain {task_id}")


def measure(name: str, n_seen: int, args) -> dict:
    torch._dynamo.reset()  # one process measures them all: earlier graphs must not use up this one's recompile limit
    domain_il = name == "dapl"
    n_classes = n_seen if domain_il else 100
    scenario = "split_cifar100"  # for its config sections only; the stream is built here
    cli = dict(scenario=scenario, strategy=name, model=args.model, pretrained=False, batch_size=args.batch,
               device=args.device, progress=False, eval_batch_size=args.eval_batch)
    config = resolve_config(cli, None, ["epochs=1", "image_size=null", *args.set],
                            SCENARIOS.get(scenario).config_cls, STRATEGIES.get(name).config_cls)
    classes = list(range(n_seen))
    warm = experience(0, classes, args.batch * args.warmup, args.eval_batch * 2, 1)
    timed = experience(1, classes, args.batch * args.steps, args.eval_images, 2)
    stream = Stream("synthetic", DOMAIN_IL if domain_il else CLASS_IL, [f"object {i}" for i in range(n_classes)],
                    [warm, timed], domain_names=[warm.domain, timed.domain] if domain_il else None)
    device = resolve_device(args.device)
    engine = Engine(config, stream, build_strategy(config, stream), device, lambda values, step: None)
    engine.train_task(warm)
    engine.evaluate(warm)
    engine.timer = type(engine.timer)()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trains = name != "zeroshot_clip"
    if trains:
        engine.train_task(timed)
    else:
        engine.strategy.before_task(timed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    engine.evaluate(timed)
    engine.evaluate(timed)
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", strategy=name,
                model=args.model, seen_classes=n_seen, batch=args.batch, eval_batch=args.eval_batch,
                train_img_s=round(engine.timer.rate("train"), 1) if trains else None,
                eval_img_s=round(engine.timer.rate("eval"), 1), train_peak_gib=peak,
                trainable_params=engine.strategy.count_trainable(), sets=args.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["zeroshot_clip", "coop", "cocoop", "dapl"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100], help="seen classes")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2560)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="config override, as clframe run --set")
    args = parser.parse_args()
    for name in args.strategies:
        for n_seen in args.classes:
            print(json.dumps(measure(name, n_seen, args)), flush=True)


if __name__ == "__main__":
    main()
