"""One ``clframe run``: build the stream and strategy, open the MLflow run, drive the engine,
checkpoint at every task boundary, and close the run with the right status.

Nothing that looks like a result is written before the inputs are known to be good: the
config, device, tracking server, data and model are all checked before the MLflow run opens, and
so are the store (kind, writable, intact) and the checkpoint folder (writable).

One process drives a run: it holds ``.lock`` beside the run's checkpoint (clframe.runfiles), so a
second ``--resume`` is refused while the first lives, and a dead one's run is closed (KILLED) by
the next run in that checkpoint folder. Every way a run ends leaves it FINISHED, FAILED or KILLED
with its last good checkpoint intact; a resume of a checkpoint that holds every task finishes the
bookkeeping its end would have done (a kill after the last task boundary).

Under torchrun every rank runs this same function (clframe.distributed); only rank 0 opens the
MLflow run (the others get a NullTracker and rank 0's run id) and writes checkpoints; a resume
loads the checkpoint on every rank.
"""
from __future__ import annotations

import contextlib
import hashlib
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import clframe
from clframe import checkpoint, distributed, metrics
from clframe.config import RESUME_FREE_KEYS, ResolvedConfig, RunConfig
from clframe.engine import Engine, TrainingDiverged, cuda_graph_plan, resolve_device
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES
from clframe.runfiles import (RunLock, abandoned_runs, check_writable_dir, is_disk_full, kill_point,
                              remove_orphan_temporaries)
from clframe.tracking import (FallbackTracker, NullTracker, absolute_uri, check_reachable, check_store, git_commit,
                              refuse_file_store, resolve_uri, store_failure)
from clframe.scenarios.base import KIND_NAMES, Stream, check_class_order, class_order_record
from clframe.strategies.base import Strategy, StreamInfo


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
    """The scenario's stream; every task must have images to train on and to test on."""
    name = config.run.scenario
    builder = SCENARIOS.get(name).obj
    stream = builder(config.scenario, config.run)
    if not stream.experiences:
        raise ClframeError(f"scenario {name} produced no tasks")
    for experience in stream.experiences:
        for split in ("train", "test"):
            if not len(getattr(experience, f"{split}_labels")):
                raise ClframeError(f"scenario {name}: task {experience.task_id + 1}/{stream.n_tasks} has no {split}ing "
                                   f"images; {'lower' if split == 'train' else 'raise'} {name}.test_fraction if it "
                                   f"has one, or give each class more images")
    return stream


def build_strategy(config: ResolvedConfig, stream: Stream) -> Strategy:
    strategy_cls = STRATEGIES.get(config.run.strategy).obj
    info = StreamInfo(kind=stream.kind, n_classes=stream.n_classes, class_names=list(stream.class_names),
                      domain_names=stream.domain_names, n_tasks=stream.n_tasks)
    torch.manual_seed(config.run.seed)
    try:
        return strategy_cls(config.strategy, config.run, info)
    except ClframeError:
        raise
    except Exception as exc:
        if not _raised_in_timm(exc):
            raise
        run = config.run
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ClframeError(f"model '{run.model}' cannot be built with model_kwargs={run.model_kwargs} and "
                           f"image_size={run.image_size} ({type(exc).__name__}: {first}); fix run.model_kwargs "
                           f"or run.image_size") from None


def _raised_in_timm(exc: BaseException) -> bool:
    """Did timm itself refuse the model's settings (an assert on embed_dim, a zero patch size, ...)?"""
    import os

    marker = f"{os.sep}timm{os.sep}"
    return any(marker in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def default_run_name(config: ResolvedConfig) -> str:
    return f"{config.run.strategy}-{config.run.scenario}-{time.strftime('%m%d-%H%M%S')}"


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature (used by sweeps)
    raise RunInterrupted(signal.Signals(signum).name)


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line, a tracking URI of a kind MLflow cannot log to (before anything is built)."""
    refuse_file_store(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise ClframeError(f"--tracking-uri {uri}: MLflow cannot log to a '{scheme}://' store; use "
                           f"http(s)://HOST:PORT (a server) or sqlite:///FILE.db")


def stream_fingerprint(stream: Stream) -> str:
    """A hash of every task's uint8 images and labels (both splits): ~1 s per GB, once per run."""
    digest = hashlib.blake2b(digest_size=16)
    for experience in stream.experiences:
        for tensor in (experience.train_images, experience.train_labels, experience.test_images,
                       experience.test_labels):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()


def stream_signature(stream: Stream, config: ResolvedConfig) -> dict:
    """What a checkpoint records of the stream, to refuse resuming on a stream that changed: the
    tasks' classes and order, their image counts and a fingerprint of the images themselves."""
    order = stream.info.get("class_order")
    return {"name": stream.name, "n_tasks": stream.n_tasks, "n_train_tasks": 1 if config.run.joint else stream.n_tasks,
            "classes": [list(map(int, e.classes)) for e in stream.experiences],
            "class_order": list(map(int, order)) if order is not None else None,
            "domain_order": list(stream.domain_names) if stream.domain_names else None,
            "n_images": [[len(e.train_labels), len(e.test_labels)] for e in stream.experiences],
            "fingerprint": stream_fingerprint(stream)}


SIGNATURE_PARTS = {"name": "the scenario", "n_tasks": "the number of tasks", "n_train_tasks": "the tasks trained",
                   "classes": "the tasks' classes", "class_order": "the class order",
                   "domain_order": "the domain order", "n_images": "the number of images per task",
                   "fingerprint": "the images themselves"}


def load_resume(target: str, config: ResolvedConfig) -> tuple[dict, Path]:
    """Read the checkpoint ``--resume target`` names and refuse it if this config differs."""
    path = checkpoint.find(str(target), config.run.checkpoint_dir)
    saved = checkpoint.load(path)
    differences = checkpoint.config_differences(saved["config"], config.flatten(), RESUME_FREE_KEYS)
    if differences:
        raise ClframeError(f"--resume {target}: the checkpoint was made with another config (checkpoint -> this "
                           f"command: {'; '.join(differences)}); leave those options out to go on as the run began")
    return saved, path


def check_resumable(saved: dict, path: Path, stream: Stream, signature: dict) -> None:
    """The stream must be the one the checkpoint was made on (a checkpoint of an older clframe
    lacks some parts of the signature: those it has are compared)."""
    changed = [part for part in signature if part in saved["stream"] and saved["stream"][part] != signature[part]]
    if changed:
        raise ClframeError(f"--resume: the data of {stream.name} changed since {path} was written "
                           f"({', '.join(SIGNATURE_PARTS.get(part, part) for part in changed)} differ); resuming would "
                           f"train the remaining tasks on other data in the same run. Restore the data, or start a "
                           f"new run")


def is_complete(saved: dict) -> bool:
    """Every task is in the checkpoint: a resume only finishes the run's bookkeeping."""
    return saved["tasks_done"] >= saved["stream"]["n_train_tasks"]


def resume_command(run: RunConfig, path: Path, run_id: str) -> str:
    """The shortest command that resumes this run (the config comes back from the checkpoint)."""
    by_id = (run.checkpoint_dir == RunConfig.checkpoint_dir
             and path == checkpoint.checkpoint_path(run.checkpoint_dir, run_id))
    return f"clframe run --resume {run_id if by_id else path}"


def run_experiment(config: ResolvedConfig, resume: str | Path | None = None, parent_run_id: str | None = None,
                   echo: Callable[[str], None] = print,
                   task_end: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Run (or, with ``resume``, continue) one experiment; every input is checked before the MLflow run opens.

    ``task_end(i, metrics)`` is called after task ``i``'s checkpoint is written, with that task's metrics
    (acc_avg, ...): a hyper-parameter search reports them there so a scheduler can stop the run early."""
    with distributed.session(resolve_device(config.run.device)) as device, cpu_threads(config.run.cpu_threads, device):
        return _run_experiment(config, device, resume, parent_run_id, echo, task_end)


@contextlib.contextmanager
def cpu_threads(count: int | None, device: torch.device):
    """torch's CPU thread count for one run (``run.cpu_threads``), put back afterwards. On 2 cores the
    offline default run's engine took 1.6 s on one thread and 7.6 s on two: for a model this small the
    threads mostly wait for each other."""
    if not count or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_experiment(config: ResolvedConfig, device: torch.device, resume: str | Path | None,
                    parent_run_id: str | None, echo: Callable[[str], None],
                    task_end: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Check where the run will write, and lock it, before anything is built; then drive it."""
    run, main = config.run, distributed.is_main()
    cuda_graph_plan(run.cuda_graph, device, STRATEGIES.get(run.strategy).obj, run.batch_size)  # refused before the run exists
    uri = resolve_uri(run.tracking_uri)
    saved, resume_path = load_resume(resume, config) if resume else (None, None)
    if saved and str(run.tracking_uri) == saved["config"]["run.tracking_uri"]:
        uri = saved["tracking_uri"]  # where the run lives now (absolute; a local fallback store, if it moved)
    check_tracking_uri(uri)
    uri = absolute_uri(uri)  # the checkpoint names the store so that a resume finds it from any folder
    held = HeldLocks()
    try:
        if main:
            check_reachable(uri)
            check_store(uri, resuming=saved is not None)
            folder = resume_path.parent if saved else Path(run.checkpoint_dir).expanduser()
            check_writable_dir(folder, "the checkpoint folder", "pass --set checkpoint_dir=A/WRITABLE/FOLDER")
            for base in {Path(run.checkpoint_dir).expanduser(), *([resume_path.parent.parent] if saved else [])}:
                remove_orphan_temporaries(base)  # half-written checkpoints of killed runs
            if saved:  # one process drives a run: a second is refused before its MLflow run is touched
                held.acquire(resume_path.parent, saved["run_id"])
        return _drive(config, device, uri, saved, resume_path, parent_run_id, echo, task_end, held)
    finally:
        held.release()


@dataclass
class HeldLocks:
    """The run's locks, and whether its MLflow run was closed (FINISHED, FAILED or KILLED). Only a
    closed run's lock is released as ``ended``: a resume that fails before it reopens the run (bad
    data, a changed stream, out of memory) leaves a kill -9'd run RUNNING, so its lock must stay one
    that ``close_abandoned_runs`` will find and close."""

    locks: list[RunLock] = field(default_factory=list)
    closed: bool = False

    def acquire(self, folder: Path, run_id: str) -> None:
        self.locks.append(RunLock(folder).acquire(run_id))

    def release(self) -> None:
        for lock in self.locks:
            lock.release(ended=self.closed)


def run_header(config: ResolvedConfig, stream: Stream, strategy: Strategy, device: torch.device) -> str:
    """One line saying what runs: the stream and its order, the strategy, the model, device, seed."""
    run, order = config.run, stream.info.get("class_order")
    kind = KIND_NAMES.get(stream.kind, stream.kind)
    described = f"{stream.name} ({kind}, {stream.n_tasks} tasks"
    if stream.domain_names:
        described += f", domain order {' '.join(stream.domain_names)}"
    if order is not None:
        described += f", class order {' '.join(map(str, order))}"
    total = sum(p.numel() for p in strategy.parameters())
    return (f"{described}) | strategy {run.strategy} | model {run.model} ({total:,} parameters, "
            f"{strategy.count_trainable():,} trainable) | device {device} | seed {run.seed}")


def stream_params(stream: Stream, signature: dict) -> dict[str, str]:
    """The stream's order and fingerprint as MLflow params (what the run trained on, in which order)."""
    params = {"stream.fingerprint": signature["fingerprint"],
              "stream.n_images": str(signature["n_images"])}
    if signature["class_order"] is not None:
        params["stream.class_order"] = " ".join(map(str, signature["class_order"]))
    if signature["domain_order"]:
        params["stream.domain_order"] = " ".join(signature["domain_order"])
    return params


def warn_untrained(config: ResolvedConfig, stream: Stream) -> None:
    run = config.run
    if stream.name.startswith("folder_") and not run.pretrained and not run.weights and run.epochs <= 1:
        print(f"warning: {stream.name} on a randomly initialised {run.model} with {run.epochs} epoch per task "
              f"learns little; pass --pretrained (or --weights FILE) or more --epochs", file=sys.stderr, flush=True)


def _drive(config: ResolvedConfig, device: torch.device, uri: str, saved: dict | None, resume_path: Path | None,
           parent_run_id: str | None, echo: Callable[[str], None],
           task_end: Callable[[int, dict[str, float]], None] | None, held: HeldLocks) -> RunResult:
    run, main = config.run, distributed.is_main()
    stream = build_stream(config)
    check_class_order(stream, run)
    strategy = build_strategy(config, stream)
    signature = stream_signature(stream, config)
    if saved:
        check_resumable(saved, resume_path, stream, signature)
    complete = saved is not None and is_complete(saved)
    tracker = FallbackTracker(uri, run.experiment, system_metrics=run.system_metrics) if main else NullTracker(uri)
    params = dict(config.flatten(), n_trainable_params=strategy.count_trainable(), n_tasks=stream.n_tasks,
                  **strategy.extra_params(tuple(stream.experiences[0].train_images.shape[1:])),
                  **stream_params(stream, signature))
    tags = {"scenario": run.scenario, "strategy": run.strategy, "model": run.model, "device": str(device),
            "clframe_version": clframe.__version__, "scenario_kind": stream.kind}
    if distributed.world() > 1:
        tags["world_size"] = str(distributed.world())
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    guard = InterruptGuard()
    clock = [time.perf_counter()]  # when the run began, less the time it ran before a resume
    written = [int(saved["tasks_done"]) if saved else 0]  # the tasks in the checkpoint on disk

    def on_task_end(i: int, engine: Engine) -> None:
        if not main:  # rank 0 writes the checkpoint and the artifacts
            return
        with guard.deferred():  # a task boundary is written whole, or not at all
            last_task = engine.state.tasks_done == len(engine.train_experiences)
            keep_optimizer = engine.optimizer is not None and (run.keep_full_checkpoint or not last_task)
            payload = {"version": checkpoint.FORMAT_VERSION, "clframe_version": clframe.__version__,
                       "run_id": tracker.run_id, "tracking_uri": absolute_uri(tracker.uri),
                       "config": {k: str(v) for k, v in config.flatten().items()}, "config_yaml": config.to_yaml(),
                       "stream": signature, "elapsed_s": time.perf_counter() - clock[0],
                       "tasks_done": engine.state.tasks_done, "epochs_done": engine.state.epochs_done,
                       "acc_matrix": torch.from_numpy(engine.state.acc_matrix.copy()),
                       "strategy_state": engine.strategy.trainable_state(), "cl_state": engine.strategy.cl_state(),
                       "extra_state": engine.strategy.extra_state(),
                       "optimizer_state": engine.optimizer.state_dict() if keep_optimizer else None,
                       "rng": checkpoint.rng_state()}
            checkpoint.save_atomic(payload, ckpt_path)
            written[0] = engine.state.tasks_done
            tracker.log_text(metrics.matrix_csv(engine.state.acc_matrix, i + 1), "acc_matrix.csv")
            if last_task:  # the CSV above is the per-task record; drawing a PNG costs ~0.1 s CPU each
                tracker.log_heatmap(engine.state.acc_matrix, i + 1)
            for name, text in engine.last_report.artifacts.items():
                tracker.log_text(text, f"task_{i}/{name}")
        kill_point(f"after_task_{i + 1}")
        if task_end is not None:
            task_end(i, engine.task_metrics(i))

    engine, ckpt_path = None, None
    with guard:
        try:
            try:
                with guard.deferred():  # a signal now waits until the run exists, then marks it KILLED
                    run_id = tracker.start(run.run_name or default_run_name(config), tags, params,
                                           run_id=saved["run_id"] if saved else None, parent_run_id=parent_run_id,
                                           complete=complete)
                    if distributed.world() > 1:  # every rank names the run (and its checkpoint) as rank 0 does
                        run_id = distributed.broadcast(run_id if main else None)
                        if not main:
                            tracker.run_id = run_id
            except Exception as exc:
                if saved and not isinstance(exc, ClframeError):
                    raise ClframeError(f"--resume: cannot reopen MLflow run {saved['run_id']} at {uri} "
                                       f"({type(exc).__name__}); pass the --tracking-uri it was logged to") from None
                raise
            # A resumed run goes on writing where it was resumed from: one checkpoint, wherever it lives.
            ckpt_path = resume_path if saved else checkpoint.checkpoint_path(run.checkpoint_dir, run_id)
            if main and not saved:
                held.acquire(ckpt_path.parent, run_id)
            if main:
                close_abandoned_runs(tracker, Path(run.checkpoint_dir).expanduser(), run_id)
            engine = Engine(config, stream, strategy, device, tracker.log_metrics, on_task_end)
            if main:
                echo(f"{run_header(config, stream, strategy, device)} | MLflow run {run_id}")
                warn_untrained(config, stream)
            if saved:
                restore(engine, saved, resume_path)
                tracker.set_tags({"clframe.resumed_after_task": str(engine.state.tasks_done)})
                total = len(engine.train_experiences)
                if main and complete:
                    echo(f"run {run_id} had trained all {total} tasks when it stopped; finishing it from {resume_path}")
                elif main:
                    echo(f"resuming run {run_id} after task {engine.state.tasks_done}/{total} from {resume_path}")
            else:
                tracker.log_text(config.to_yaml(), "config.yaml")
                order_record = class_order_record(stream, run)
                if order_record is not None:  # the order, with class names and tasks
                    tracker.log_text(order_record, "class_order.json")
            clock[0] = time.perf_counter() - float(saved.get("elapsed_s", 0.0) if saved else 0.0)
            acc_matrix = engine.run_all()
            kill_point("before_end")
            last = engine.state.tasks_done - 1
            summary = engine.task_metrics(last)
            if complete:  # stopped after its last checkpoint: write again what may not have been written
                tracker.log_text(metrics.matrix_csv(acc_matrix, last + 1), "acc_matrix.csv")
                tracker.log_heatmap(acc_matrix, last + 1)
            wall_s = time.perf_counter() - clock[0]
            tracker.log_metrics({"wall_time_s": wall_s}, last)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            guard.fired = True
            tracker.end("KILLED")
            held.closed = True
            signal_name = str(exc) if isinstance(exc, RunInterrupted) else "SIGINT"
            raise RunKilled(_stopped(f"interrupted by {signal_name}", "KILLED", engine, stream, run, tracker,
                                     ckpt_path, resume_path, hint=True, done=written[0]), signal_name) from None
        except BaseException as exc:
            guard.fired = True
            unwritable = _write_failure(exc, tracker.uri)
            message = str(exc) if isinstance(exc, ClframeError) else unwritable[0] if unwritable else \
                f"{type(exc).__name__}: {exc}"
            status = "FAILED"
            try:
                with contextlib.suppress(Exception):
                    tracker.set_tags({"clframe.error": message[:5000]})
                tracker.end("FAILED")
                held.closed = True
            except Exception:  # noqa: BLE001 - the store itself cannot be written (a full disk)
                if unwritable is None:
                    raise
                status = None
            if isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(_stopped(str(exc), status, engine, stream, run, tracker, ckpt_path,
                                                resume_path, hint=False, done=written[0])) from None
            if unwritable is not None:
                what, fix = unwritable
                raise ClframeError(_stopped(what, status, engine, stream, run, tracker, ckpt_path, resume_path,
                                            hint=True, done=written[0], fix=fix)) from None
            raise
        guard.fired = True  # every task is done: a signal now does not undo that
        tracker.end("FINISHED")
        held.closed = True
    return RunResult(tracker.run_id, acc_matrix, summary, wall_s, engine.timer.rate("train"),
                     engine.timer.rate("eval"), ckpt_path, tracker.uri)


def close_abandoned_runs(tracker, checkpoint_dir: Path, own_run_id: str) -> None:
    """Mark KILLED the runs of this store that were left RUNNING by a process that died (kill -9
    before or between checkpoints) in this checkpoint folder: no run stays RUNNING without a live
    process. Those with a checkpoint can still be resumed. Best effort, never stops this run."""
    client = getattr(tracker, "client", None)
    for run_id, lock in abandoned_runs(checkpoint_dir):
        try:
            if run_id != own_run_id and client is not None and client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "clframe.closed_by", f"run {own_run_id}: the process driving it had died")
                client.set_terminated(run_id, status="KILLED")
        except Exception:  # noqa: BLE001 - a run of another store, or none: leave it
            lock.release(ended=False)
            continue
        lock.release(ended=True)


def _write_failure(exc: BaseException, uri: str | None) -> tuple[str, str] | None:
    """(what happened, what to do before resuming) when the run stopped because a file or the store
    could not be written; None for anything else."""
    if isinstance(exc, ClframeError):
        return None
    if is_disk_full(exc):
        where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return f"the disk is full{where}", "free some space, then "
    damaged = store_failure(uri, exc) if uri else None
    if damaged is not None:
        return str(damaged), ""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot write {exc.filename or 'a file'} ({exc.strerror})", "make it writable, then "
    return None


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


def _stopped(what: str, status: str | None, engine: Engine | None, stream: Stream, run: RunConfig, tracker,
             ckpt_path: Path | None, resume_path: Path | None, hint: bool, done: int = 0, fix: str = "") -> str:
    """One line: what stopped the run, where its finished tasks are (``done``: the tasks in the
    checkpoint on disk), and how to go on (``fix``: what to do before resuming)."""
    total = len(engine.train_experiences) if engine is not None else (1 if run.joint else stream.n_tasks)
    if hint:  # a divergence message already names its task and step
        what += (" as its MLflow run was being created" if engine is None and not done else
                 f" during task {done + 1}/{total}" if done < total else " after the last task")
    kept_at = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else resume_path
    if done and kept_at is not None:
        kept = f"the checkpoint after task {done}/{total} is kept at {kept_at}"
        if hint:
            kept += f"; {fix}resume with: {resume_command(run, kept_at, tracker.run_id)}"
    else:
        kept = "no task had finished, so there is no checkpoint to resume from"
    if not tracker.run_id:
        marked = "no MLflow run was opened"
    elif status is None:  # the store could not be written either
        marked = (f"MLflow run {tracker.run_id} could not be marked FAILED (its store cannot be written), a resume "
                  f"closes it")
    else:
        marked = f"MLflow run {tracker.run_id} marked {status}"
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
