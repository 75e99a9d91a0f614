"""One ``clframe run``: build the stream and strategy, open the MLflow run, drive the engine,
checkpoint at every task boundary, and close the run with the right status.

Nothing that looks like a result is written before the inputs are known to be good: the
config, device, tracking server, data and model are all checked before the MLflow run opens.

Under torchrun every rank runs this same function (clframe.distributed); only rank 0 opens the
MLflow run (the others get a NullTracker and rank 0's run id) and writes checkpoints; a resume
loads the checkpoint on every rank.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import clframe
from clframe import checkpoint, distributed, metrics
from clframe.config import ResolvedConfig, RunConfig
from clframe.engine import Engine, TrainingDiverged, resolve_device
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES
from clframe.tracking import FallbackTracker, NullTracker, check_reachable, git_commit, resolve_uri
from clframe.scenarios.base import Stream
from clframe.strategies.base import Strategy, StreamInfo

# Keys that may differ between a run and its resumption (where and how fast it runs, not what it computes).
RESUME_FREE_KEYS = {"run.progress", "run.tracking_uri", "run.checkpoint_dir", "run.eval_batch_size",
                    "run.run_name", "run.device", "run.compile", "run.frozen_bf16"}


class RunInterrupted(BaseException):
    """Ctrl-C or SIGTERM: the run stops at once and is marked KILLED. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way mistakes it for an error."""


class RunKilled(ClframeError):
    """What the user sees after Ctrl-C / SIGTERM: the run is KILLED, and how to resume it."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        number = signal.Signals[signal_name] if signal_name in signal.Signals.__members__ else signal.SIGINT
        self.exit_code = 128 + int(number)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


class InterruptGuard:
    """While a run is open, SIGTERM and SIGINT raise :class:`RunInterrupted` (main thread only).

    Inside ``deferred()`` a signal is held until the block ends, so a task boundary (checkpoint and
    its artifacts) is written whole; after the first signal, further ones are ignored while the
    run is being marked KILLED.
    """

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.pending: str | None = None
        self.depth = 0
        self.fired = False

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.fired:
            return
        if self.depth:
            self.pending = signal.Signals(signum).name
            return
        self.fired = True
        raise RunInterrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending and not self.fired:
                self.fired = True
                raise RunInterrupted(self.pending)


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


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature (used by sweeps)
    raise RunInterrupted(signal.Signals(signum).name)


TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line, a tracking URI of a kind MLflow cannot log to (before anything is built)."""
    if "://" not in uri:
        return  # a folder path
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise ClframeError(f"--tracking-uri {uri}: MLflow cannot log to a '{scheme}://' store; use "
                           f"http(s)://HOST:PORT (a server), sqlite:///FILE.db or a folder path")


def stream_signature(stream: Stream, config: ResolvedConfig) -> dict:
    """What a checkpoint records of the stream, to refuse resuming on a stream that changed."""
    order = stream.info.get("class_order")
    return {"name": stream.name, "n_tasks": stream.n_tasks, "n_train_tasks": 1 if config.run.joint else stream.n_tasks,
            "classes": [list(map(int, e.classes)) for e in stream.experiences],
            "class_order": list(map(int, order)) if order is not None else None}


def load_resume(target: str, config: ResolvedConfig) -> tuple[dict, Path]:
    """Read the checkpoint ``--resume target`` names and refuse it if this config differs."""
    path = checkpoint.find(str(target), config.run.checkpoint_dir)
    saved = checkpoint.load(path)
    differences = checkpoint.config_differences(saved["config"], config.flatten(), RESUME_FREE_KEYS)
    if differences:
        raise ClframeError(f"--resume {target}: the checkpoint was made with another config (checkpoint -> this "
                           f"command: {'; '.join(differences)}); leave those options out to go on as the run began")
    return saved, path


def check_resumable(saved: dict, path: Path, stream: Stream, config: ResolvedConfig) -> None:
    if saved["stream"] != stream_signature(stream, config):
        raise ClframeError(f"--resume: the stream {stream.name} builds now (tasks, classes, class order) is not the "
                           f"one in {path}; was the data or the scenario changed? Start the run again")
    total = saved["stream"]["n_train_tasks"]
    if saved["tasks_done"] >= total:
        raise ClframeError(f"--resume: run {saved['run_id']} already finished all {total} tasks; nothing to resume "
                           f"(clframe compare {saved['run_id']} shows its results)")


def resume_command(run: RunConfig, path: Path, run_id: str) -> str:
    """The shortest command that resumes this run (the config comes back from the checkpoint)."""
    by_id = (run.checkpoint_dir == RunConfig.checkpoint_dir
             and path == checkpoint.checkpoint_path(run.checkpoint_dir, run_id))
    return f"clframe run --resume {run_id if by_id else path}"


def run_experiment(config: ResolvedConfig, resume: str | Path | None = None, parent_run_id: str | None = None,
                   echo: Callable[[str], None] = print) -> RunResult:
    """Run (or, with ``resume``, continue) one experiment; every input is checked before the MLflow run opens."""
    with distributed.session(resolve_device(config.run.device)) as device:
        return _run_experiment(config, device, resume, parent_run_id, echo)


def _run_experiment(config: ResolvedConfig, device: torch.device, resume: str | Path | None,
                    parent_run_id: str | None, echo: Callable[[str], None]) -> RunResult:
    run, main = config.run, distributed.is_main()
    uri = resolve_uri(run.tracking_uri)
    saved, resume_path = load_resume(resume, config) if resume else (None, None)
    if saved and str(run.tracking_uri) == saved["config"]["run.tracking_uri"]:
        uri = saved["tracking_uri"]  # where the run lives now (a local fallback store, if it moved)
    check_tracking_uri(uri)
    if main:
        check_reachable(uri)
    stream = build_stream(config)
    strategy = build_strategy(config, stream)
    if saved:
        check_resumable(saved, resume_path, stream, config)
    tracker = FallbackTracker(uri, run.experiment) if main else NullTracker(uri)
    params = dict(config.flatten(), n_trainable_params=strategy.count_trainable(), n_tasks=stream.n_tasks)
    tags = {"scenario": run.scenario, "strategy": run.strategy, "model": run.model, "device": str(device),
            "clframe_version": clframe.__version__, "scenario_kind": stream.kind}
    if distributed.world() > 1:
        tags["world_size"] = str(distributed.world())
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    guard = InterruptGuard()

    def on_task_end(i: int, engine: Engine) -> None:
        if not main:  # rank 0 writes the checkpoint and the artifacts
            return
        with guard.deferred():  # a task boundary is written whole, or not at all
            payload = {"version": checkpoint.FORMAT_VERSION, "clframe_version": clframe.__version__,
                       "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                       "config": {k: str(v) for k, v in config.flatten().items()}, "config_yaml": config.to_yaml(),
                       "stream": stream_signature(stream, config),
                       "tasks_done": engine.state.tasks_done, "epochs_done": engine.state.epochs_done,
                       "acc_matrix": torch.from_numpy(engine.state.acc_matrix.copy()),
                       "strategy_state": engine.strategy.trainable_state(), "cl_state": engine.strategy.cl_state(),
                       "extra_state": engine.strategy.extra_state(),
                       "optimizer_state": engine.optimizer.state_dict() if engine.optimizer is not None else None,
                       "rng": checkpoint.rng_state()}
            checkpoint.save_atomic(payload, ckpt_path)
            tracker.log_text(metrics.matrix_csv(engine.state.acc_matrix, i + 1), "acc_matrix.csv")
            tracker.log_heatmap(engine.state.acc_matrix, i + 1)
            for name, text in engine.last_report.artifacts.items():
                tracker.log_text(text, f"task_{i}/{name}")

    engine, ckpt_path = None, None
    with guard:
        try:
            try:
                run_id = tracker.start(run.run_name or default_run_name(config), tags, params,
                                       run_id=saved["run_id"] if saved else None, parent_run_id=parent_run_id)
                if distributed.world() > 1:  # every rank names the run (and its checkpoint) as rank 0 does
                    run_id = distributed.broadcast(run_id if main else None)
                    if not main:
                        tracker.run_id = run_id
            except Exception as exc:
                if saved and not isinstance(exc, ClframeError):
                    raise ClframeError(f"--resume: cannot reopen MLflow run {saved['run_id']} at {uri} "
                                       f"({type(exc).__name__}); pass the --tracking-uri it was logged to") from None
                raise
            ckpt_path = checkpoint.checkpoint_path(run.checkpoint_dir, run_id)
            engine = Engine(config, stream, strategy, device, tracker.log_metrics, on_task_end)
            if saved:
                restore(engine, saved, resume_path)
                tracker.set_tags({"clframe.resumed_after_task": str(engine.state.tasks_done)})
                if main:
                    echo(f"resuming run {run_id} after task {engine.state.tasks_done}/{len(engine.train_experiences)} "
                         f"from {resume_path}")
            else:
                tracker.log_text(config.to_yaml(), "config.yaml")
            start = time.perf_counter()
            acc_matrix = engine.run_all()
            wall_s = time.perf_counter() - start
            last = engine.state.tasks_done - 1
            summary = engine.task_metrics(last)
            tracker.log_metrics({"wall_time_s": wall_s}, last)
            tracker.log_file(ckpt_path, "checkpoints")
        except (KeyboardInterrupt, RunInterrupted) as exc:
            guard.fired = True
            tracker.end("KILLED")
            signal_name = str(exc) if isinstance(exc, RunInterrupted) else "SIGINT"
            raise RunKilled(_stopped(f"interrupted by {signal_name}", "KILLED", engine, stream, run, tracker,
                                     ckpt_path, resume_path, hint=True), signal_name) from None
        except BaseException as exc:
            guard.fired = True
            message = str(exc) if isinstance(exc, ClframeError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                tracker.set_tags({"clframe.error": message[:5000]})
            tracker.end("FAILED")
            if isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(_stopped(str(exc), "FAILED", engine, stream, run, tracker, ckpt_path,
                                                resume_path, hint=False)) from None
            raise
        guard.fired = True  # every task is done: a signal now does not undo that
        tracker.end("FINISHED")
    return RunResult(tracker.run_id, acc_matrix, summary, wall_s, engine.timer.rate("train"),
                     engine.timer.rate("eval"), ckpt_path, tracker.uri)


def restore(engine: Engine, saved: dict, path: Path) -> None:
    """Put a checkpoint's state back: trainable weights, continual-learning state, position, RNGs.

    The optimizer is not restored: the engine builds a fresh one at every task."""
    strategy = engine.strategy
    checkpoint.restore_strategy(strategy, saved["strategy_state"], path)
    strategy.load_cl_state(saved["cl_state"])
    strategy.load_extra_state(saved["extra_state"])
    engine.state.acc_matrix = saved["acc_matrix"].numpy().copy()
    engine.state.tasks_done = int(saved["tasks_done"])
    engine.state.epochs_done = int(saved["epochs_done"])
    checkpoint.restore_rng(saved["rng"])


def _stopped(what: str, status: str, engine: Engine | None, stream: Stream, run: RunConfig, tracker,
             ckpt_path: Path | None, resume_path: Path | None, hint: bool) -> str:
    """One line: what stopped the run, where its finished tasks are, and how to go on."""
    total = len(engine.train_experiences) if engine is not None else (1 if run.joint else stream.n_tasks)
    done = engine.state.tasks_done if engine is not None else 0
    if hint:  # a divergence message already names its task and step
        what += f" during task {done + 1}/{total}" if done < total else " after the last task"
    kept_at = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else resume_path
    if done and kept_at is not None:
        kept = f"the checkpoint after task {done}/{total} is kept at {kept_at}"
        if hint:
            kept += f"; resume with: {resume_command(run, kept_at, tracker.run_id)}"
    else:
        kept = "no task had finished, so there is no checkpoint to resume from"
    marked = f"MLflow run {tracker.run_id} marked {status}" if tracker.run_id else "no MLflow run was opened"
    return f"{what}; {marked}; {kept}"


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
