"""One ``clframe run``: build the stream and strategy, open the MLflow run, drive the engine,
checkpoint at every task boundary, and close the run with the right status.

Nothing that looks like a result is written before the inputs are known to be good: the
config, device, tracking server, data and model are all checked before the MLflow run opens.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import clframe
from clframe import checkpoint, metrics
from clframe.config import ResolvedConfig
from clframe.engine import Engine, resolve_device
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES
from clframe.tracking import FallbackTracker, check_reachable, git_commit, resolve_uri
from scenarios.base import Stream
from strategies.base import Strategy, StreamInfo

# Keys that may differ between a run and its resumption (they do not change results).
RESUME_FREE_KEYS = {"run.progress", "run.tracking_uri", "run.checkpoint_dir", "run.eval_batch_size",
                    "run.run_name", "run.device"}


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run stops at once and is marked KILLED."""


@dataclass
class RunResult:
    run_id: str
    acc_matrix: np.ndarray
    summary: dict[str, float]
    wall_s: float
    train_img_s: float
    eval_img_s: float
    checkpoint: Path
    tracking_uri: str | None = None  # where the run ended up (a local fallback if the server went away)


def build_stream(config: ResolvedConfig) -> Stream:
    builder = SCENARIOS.get(config.run.scenario).obj
    stream = builder(config.scenario, config.run)
    if not stream.experiences:
        raise ClframeError(f"scenario {config.run.scenario} produced no tasks")
    return stream


def build_strategy(config: ResolvedConfig, stream: Stream) -> Strategy:
    strategy_cls = STRATEGIES.get(config.run.strategy).obj
    info = StreamInfo(kind=stream.kind, n_classes=stream.n_classes, class_names=list(stream.class_names),
                      domain_names=stream.domain_names, n_tasks=stream.n_tasks)
    torch.manual_seed(config.run.seed)
    return strategy_cls(config.strategy, config.run, info)


def default_run_name(config: ResolvedConfig) -> str:
    return f"{config.run.strategy}-{config.run.scenario}-{time.strftime('%m%d-%H%M%S')}"


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise RunInterrupted(signal.Signals(signum).name)


def run_experiment(config: ResolvedConfig, resume: str | None = None, parent_run_id: str | None = None,
                   echo: Callable[[str], None] = print) -> RunResult:
    run = config.run
    device = resolve_device(run.device)
    uri = resolve_uri(run.tracking_uri)
    check_reachable(uri)
    saved = None
    if resume:
        saved = checkpoint.load(checkpoint.find(resume, run.checkpoint_dir))
        differences = checkpoint.config_differences(saved["config"], config.flatten(), RESUME_FREE_KEYS)
        if differences:
            raise ClframeError(f"--resume: the checkpoint was made with another config ({'; '.join(differences)})")
    stream = build_stream(config)
    strategy = build_strategy(config, stream)
    tracker = FallbackTracker(uri, run.experiment)
    params = dict(config.flatten(), n_trainable_params=strategy.count_trainable(), n_tasks=stream.n_tasks)
    tags = {"scenario": run.scenario, "strategy": run.strategy, "model": run.model, "device": str(device),
            "clframe_version": clframe.__version__, "scenario_kind": stream.kind}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run_id = tracker.start(run.run_name or default_run_name(config), tags, params,
                           run_id=saved["run_id"] if saved else None, parent_run_id=parent_run_id)
    ckpt_path = checkpoint.checkpoint_path(run.checkpoint_dir, run_id)

    def on_task_end(i: int, engine: Engine) -> None:
        payload = {"version": 1, "run_id": run_id, "config": {k: str(v) for k, v in config.flatten().items()},
                   "tasks_done": engine.state.tasks_done, "epochs_done": engine.state.epochs_done,
                   "acc_matrix": torch.from_numpy(engine.state.acc_matrix.copy()),
                   "strategy_state": engine.strategy.trainable_state(), "cl_state": engine.strategy.cl_state(),
                   "extra_state": engine.strategy.extra_state()}
        checkpoint.save_atomic(payload, ckpt_path)
        tracker.log_text(metrics.matrix_csv(engine.state.acc_matrix, i + 1), "acc_matrix.csv")
        tracker.log_heatmap(engine.state.acc_matrix, i + 1)
        for name, text in engine.last_report.artifacts.items():
            tracker.log_text(text, f"task_{i}/{name}")

    engine = Engine(config, stream, strategy, device, tracker.log_metrics, on_task_end)
    if saved:
        strategy.load_state_dict(saved["strategy_state"], strict=False)
        strategy.load_cl_state(saved["cl_state"])
        strategy.load_extra_state(saved["extra_state"])
        engine.state.acc_matrix = saved["acc_matrix"].numpy().copy()
        engine.state.tasks_done = int(saved["tasks_done"])
        engine.state.epochs_done = int(saved["epochs_done"])
        echo(f"resuming run {run_id} after task {engine.state.tasks_done}")
    else:
        tracker.log_text(config.to_yaml(), "config.yaml")

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    try:
        acc_matrix = engine.run_all()
    except (KeyboardInterrupt, RunInterrupted):
        tracker.end("KILLED")
        done = engine.state.tasks_done
        hint = f"; resume with: clframe run --resume {run_id} (plus the same options)" if done else ""
        raise ClframeError(f"interrupted during task {done}; {done} finished task(s) kept in run {run_id}{hint}") \
            from None
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall_s = time.perf_counter() - start
    last = engine.state.tasks_done - 1
    summary = engine.task_metrics(last)
    tracker.log_metrics({"wall_time_s": wall_s}, last)
    tracker.log_file(ckpt_path, "checkpoints")
    tracker.end("FINISHED")
    return RunResult(tracker.run_id, acc_matrix, summary, wall_s, engine.timer.rate("train"),
                     engine.timer.rate("eval"), ckpt_path, tracker.uri)


def format_result(result: RunResult, config: ResolvedConfig, uri: str) -> str:
    rows = int(np.sum(~np.isnan(result.acc_matrix).all(axis=1)))
    lines = ["", "accuracy matrix (%, row = after training task i, column = test set of task j):",
             metrics.format_matrix(result.acc_matrix, rows), "",
             f"average accuracy {result.summary['acc_avg']:.2f}   forgetting {result.summary['forgetting']:.2f}   "
             f"BWT {result.summary['bwt']:.2f}",
             f"train {result.train_img_s:.0f} img/s   eval {result.eval_img_s:.0f} img/s   wall {result.wall_s:.1f} s",
             f"MLflow run {result.run_id} in experiment '{config.run.experiment}' at {result.tracking_uri or uri} "
             f"(clframe ui to browse)"]
    return "\n".join(lines)
