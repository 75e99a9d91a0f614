"""Throughput of clframe strategies through the real engine, printed as JSON lines.

Each measurement builds the strategy exactly as ``clframe run`` does, feeds the engine a
CIFAR-shaped task (uint8 32x32 images, 100 classes, resized to the model's input on the
device) and times ``Engine.train_task`` / ``Engine.evaluate`` after a warm-up task. With
``--protocol`` it also runs the whole Split CIFAR-100 protocol end to end from a generated
``cifar-100-python`` archive (real shape: 50 000 + 10 000 images) through ``run_experiment``,
MLflow logging included, and reports its wall time.

    python bench/throughput.py --strategies l2p linear --batch 128
    python bench/throughput.py --strategies l2p dualprompt coda_prompt --graph-ab   # each at its reference batch
    python bench/throughput.py --strategies l2p --protocol --skip-throughput        # the default config, end to end

Without ``--batch`` each strategy runs at its own configured (reference) batch size, e.g. L2P 16,
DualPrompt 24, CODA-Prompt 128. ``--graph-ab`` times the same warmed engine twice, captured CUDA
graph step (``cuda_graph=on``, for a strategy whose step can be captured) and eager step, so the
ratio is free of compile and machine noise.

Under torchrun every rank runs the same measurement data-parallel (``--batch`` is the global
batch, split over the ranks, as in ``clframe run --gpus N``); rank 0 prints the global img/s:

    torchrun --standalone --nproc-per-node 2 bench/throughput.py --strategies l2p --batch 256
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clframe import distributed  # noqa: E402
from clframe.config import resolve_config  # noqa: E402
from clframe.engine import Engine, resolve_device  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.runner import build_strategy, run_experiment  # noqa: E402
from clframe.scenarios.base import CLASS_IL, Experience, Stream  # noqa: E402
from clframe.step_graph import WARMUP_STEPS  # noqa: E402


def config_for(strategy: str, args, sets: list[str]):
    cli = dict(scenario="split_cifar100", strategy=strategy, model=args.model, pretrained=False,
               device=args.device, progress=False)
    if args.batch is not None:  # else the strategy's configured (reference) batch size
        cli["batch_size"] = args.batch
    if args.eval_batch is not None:
        cli["eval_batch_size"] = args.eval_batch
    return resolve_config(cli, None, list(args.set) + sets, SCENARIOS.get("split_cifar100").config_cls,
                          STRATEGIES.get(strategy).config_cls)


def synthetic_experience(n_train: int, n_test: int, classes: list[int], seed: int) -> Experience:
    generator = torch.Generator().manual_seed(seed)
    def images(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    def labels(n):
        return torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=generator)]
    return Experience(0, classes, images(n_train), labels(n_train), images(n_test), labels(n_test))


def environment(device: torch.device) -> dict:
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device_name": name, "torch": torch.__version__, "timm": timm.__version__}


def timed_steps(args, batch: int) -> int:
    """``--steps``, or enough full batches for about 5120 images (40 at batch 128, 320 at 16)."""
    return args.steps or max(40, 5120 // batch)


def warmed_engine(config, args, device: torch.device, timed_eval_images: int) -> tuple[Engine, Experience]:
    """The engine ``clframe run`` would build, warmed up (compiled) on one task, and the CIFAR-shaped
    task to time: full training batches of the run's batch size and ``timed_eval_images`` test images.
    The warm-up task is long enough to capture the step (clframe.step_graph) as a real task does."""
    classes = list(range(10))
    batch = config.run.batch_size
    timed = synthetic_experience(batch * timed_steps(args, batch), timed_eval_images, classes, 1)
    warm = synthetic_experience(batch * max(args.warmup, WARMUP_STEPS + 2), config.run.eval_batch_size * 2, classes, 2)
    stream = Stream("synthetic", CLASS_IL, [f"c{i}" for i in range(100)], [timed])
    engine = Engine(config, stream, build_strategy(config, stream), device, lambda metrics, step: None)
    engine.train_task(warm)
    engine.evaluate(warm)
    return engine, timed


def timed_training(engine: Engine, timed: Experience, device: torch.device) -> dict:
    """One timed training task: img/s, peak memory and how its steps ran (captured or eager)."""
    engine.timer = type(engine.timer)()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.train_task(timed)
    counts = engine.last_step_counts
    return dict(train_img_s=round(engine.timer.rate("train"), 1),
                train_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                steps_replayed=counts.replayed if counts else 0, steps_eager=counts.eager if counts else None,
                capture_fallbacks=counts.fallbacks if counts else [])


def measure(strategy_name: str, args, device: torch.device) -> dict:
    # Each strategy is measured as its own `clframe run` would be: compiled graphs of the strategies
    # measured before it (all share timm's Block.forward) must not use up its recompile limit.
    torch._dynamo.reset()
    # --graph-ab: the A side captured at any batch (auto steps eagerly from batch 128 on, where it does not pay)
    config = config_for(strategy_name, args, ["epochs=1", *(["cuda_graph=on"] if args.graph_ab and device.type == "cuda" else [])])
    engine, timed = warmed_engine(config, args, device, args.eval_images)
    training = timed_training(engine, timed, device)
    eager = None
    if args.graph_ab:  # the same engine again, eager: same compiled blocks, same data
        setting = engine.graph_capture
        engine.graph_capture = None
        eager = timed_training(engine, timed, device)
        engine.graph_capture = setting
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.evaluate(timed)
    first_eval = engine.timer.rate("eval")
    engine.timer.seconds["eval"], engine.timer.images["eval"] = 0.0, 0
    engine.evaluate(timed)  # second pass: what every later evaluation of this task costs (query caches)
    eval_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = dict(environment(device), strategy=strategy_name, model=args.model, batch=config.run.batch_size,
                  world_size=distributed.world(), eval_batch=config.run.eval_batch_size,
                  cuda_graph=engine.graph_capture is True, **training,
                  eval_img_s=round(first_eval, 1), eval_repeat_img_s=round(engine.timer.rate("eval"), 1),
                  eval_peak_gib=eval_peak, trainable_params=engine.strategy.count_trainable(),
                  fast_path=[s for s in args.set])
    if eager is not None:
        result["eager_train_img_s"] = eager["train_img_s"]
        result["graph_speedup"] = round(training["train_img_s"] / max(eager["train_img_s"], 1e-9), 2)
    return result


def write_cifar_archive(root: Path, seed: int = 0) -> None:
    """A cifar-100-python folder of the real shape (random pixels), in the real pickle format."""
    import pickle

    rng = np.random.RandomState(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 50_000), ("test", 10_000)):
        labels = np.repeat(np.arange(100), n // 100)
        rng.shuffle(labels)
        data = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        with (folder / split).open("wb") as handle:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, handle)
    with (folder / "meta").open("wb") as handle:
        pickle.dump({b"fine_label_names": [f"class_{i}".encode() for i in range(100)]}, handle)


def protocol(strategy_name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar_archive(root / "data")
        start = time.perf_counter()
        sets = [f"data_root={root / 'data'}", f"tracking_uri=sqlite:///{root}/mlflow.db",
                f"checkpoint_dir={root / 'ckpt'}", f"epochs={args.epochs}"]
        config = config_for(strategy_name, args, sets)
        echoed = []  # the runner echoes its header once the model, data and MLflow run are ready
        result = run_experiment(config, echo=lambda line: echoed.append(time.perf_counter()))
        wall = time.perf_counter() - start
        setup = echoed[0] - start
    device = resolve_device(args.device)
    return dict(environment(device), strategy=strategy_name, mode="protocol", batch=config.run.batch_size,
                eval_batch=config.run.eval_batch_size, cuda_graph=config.run.cuda_graph,
                epochs=args.epochs, protocol_wall_s=round(wall, 1), engine_wall_s=round(result.wall_s, 1),
                setup_s=round(setup, 1), after_engine_s=round(wall - setup - result.wall_s, 1),
                acc_avg=round(result.summary["acc_avg"], 2), train_img_s=round(result.train_img_s, 1),
                eval_img_s=round(result.eval_img_s, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["l2p"])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=None, help="default: each strategy's configured batch size")
    parser.add_argument("--eval-batch", type=int, default=None, help="default: the configured eval batch size")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default: ~5120 images' worth)")
    parser.add_argument("--graph-ab", action="store_true", help="also time the eager step on the same engine")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=5120)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="config override, as clframe run --set")
    parser.add_argument("--protocol", action="store_true", help="also run the whole Split CIFAR-100 protocol")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with distributed.session(resolve_device(args.device)) as device:
        if distributed.world() > 1 and args.protocol:
            parser.error("--protocol runs in one process; time multi-GPU protocols with clframe run --gpus N")
        for name in args.strategies:
            if not args.skip_throughput:
                result = measure(name, args, device)
                if distributed.is_main():
                    print(json.dumps(result), flush=True)
            if args.protocol:
                print(json.dumps(protocol(name, args)), flush=True)


if __name__ == "__main__":
    main()
