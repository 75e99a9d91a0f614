"""Where a strategy's GPU time goes: kernel time by kind, and how busy the GPU is, as JSON lines.

Builds the strategy as ``clframe run`` does (same engine, same fast path), warms it up on a
CIFAR-shaped task, then records a few training steps and a first evaluation under
``torch.profiler`` and prints, per phase: the wall time, the summed CUDA kernel time (their
ratio is how busy the GPU was: below ~95% the host is the bottleneck, and CUDA graphs or fewer
launches pay), the time per kernel kind (matrix products, attention, Triton-fused, other) and
the top kernels.

    python bench/profile_step.py --strategy l2p --batch 128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import config_for, environment, warmed_engine  # noqa: E402
from clframe.engine import resolve_device  # noqa: E402
from clframe.registry import STRATEGIES  # noqa: E402

KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
         ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "wgmma", "cublas")),
         ("triton", ("triton",)))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, words in KINDS:
        if any(word in lowered for word in words):
            return kind
    return "other"


def summarise(profile, wall_s: float, images: int, top: int) -> dict:
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time  # microseconds
            kernels[event.name][1] += 1
    total_us = sum(t for t, _ in kernels.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (t, _) in kernels.items():
        by_kind[kind_of(name)] += t
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return dict(wall_ms=round(wall_s * 1e3, 2), kernel_ms=round(total_us / 1e3, 2),
                gpu_busy=round(total_us / 1e6 / wall_s, 3), img_s=round(images / wall_s, 1),
                launches=sum(n for _, n in kernels.values()),
                by_kind_ms={k: round(v / 1e3, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top=[dict(name=name[:90], ms=round(t / 1e3, 2), calls=n, kind=kind_of(name)) for name, (t, n) in ranked])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="l2p")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="training steps (and eval batches) per phase")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], help="config override, as clframe run --set")
    args = parser.parse_args()
    device = resolve_device(args.device)
    fields = {f.name for f in dataclasses.fields(STRATEGIES.get(args.strategy).config_cls)}
    # Every evaluation is profiled as a first one: the query cache would turn the second into a repeat.
    no_cache = [f"{args.strategy}.cache_queries=false"] if "cache_queries" in fields else []
    config = config_for(args.strategy, args, ["epochs=1", *no_cache])
    start = time.perf_counter()
    engine, timed = warmed_engine(config, args, device, args.eval_batch * args.steps)
    warm_s = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    result = dict(environment(device), strategy=args.strategy, batch=args.batch, eval_batch=args.eval_batch,
                  warmup_s=round(warm_s, 1), overrides=args.set)
    phases = (("train", lambda: engine.train_task(timed), len(timed.train_labels)),
              ("eval", lambda: engine.evaluate(timed), len(timed.test_labels)))
    for phase, work, images in phases:
        engine._sync()
        start = time.perf_counter()
        work()  # unprofiled: the profiler's own overhead stays out of this rate
        engine._sync()
        plain_s = time.perf_counter() - start
        with torch.profiler.profile(activities=activities) as profile:
            start = time.perf_counter()
            work()
            engine._sync()
            wall = time.perf_counter() - start
        result[phase] = dict(img_s_unprofiled=round(images / plain_s, 1), **summarise(profile, wall, images, args.top))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
