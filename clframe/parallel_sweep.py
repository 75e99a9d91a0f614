"""A sweep's runs on Ray: several at once on this machine (``--parallel N``) or on a cluster
(``--ray-address ADDR``, or ``RAY_ADDRESS``), instead of one after another.

Every child is an ordinary clframe run: the config the sweep resolved, ``run_experiment``, an
MLflow child run under the sweep's parent, checkpoints at task boundaries. It runs as a Ray task
asking for ``--cpus-per-run`` CPUs and ``--gpus-per-run`` GPUs; Ray sets CUDA_VISIBLE_DEVICES,
so a run sees its own GPUs. The worker moves to the driver's folder (where that folder exists on
its node), so relative paths (data, checkpoints, a ``module:Class`` strategy) mean what they mean
for a run alone, and uses ``cpus_per_run`` torch threads: the results are those of the run alone
with the same seed and thread count.

Tracking: several processes log at once. With a local sqlite store (the default
``sqlite:///mlflow.db``) a local ``mlflow server`` on that store (``clframe.mlflow_server``) runs
for the sweep's duration and every run logs through it (artifacts stay where the embedded store
puts them). The run gets the server apart from its config (``tracking.logging_through``): its
config and checkpoint name the sqlite store, so ``clframe run --resume CHILD`` after the sweep
reaches the store, not a dead server. An http(s) ``--tracking-uri`` is used as it is. A cluster
of more than one node needs a server that every node reaches, and says so in one line otherwise.

Failure: a run that raises is FAILED with its error (its runner marks it); a run whose worker
died is marked FAILED here, with Ray's reason. ``--fail-fast`` stops the sweep at the first
failure: runs still going are stopped and marked KILLED. Ctrl-C or SIGTERM cancels every run in
flight (a worker that does not stop within CANCEL_GRACE_S is killed, and its run marked KILLED
here). ``--resume PARENT`` with the same sweep command re-runs only the children without a
FINISHED run; a KILLED child with a task-boundary checkpoint continues from it, in its own run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from clframe.config import RESUME_FREE_KEYS, ResolvedConfig
from clframe.errors import ClframeError
from clframe.mlflow_server import local_mlflow_server
from clframe.tracking import absolute_uri

INSTALL_HINT = "pip install 'clframe[sweep]'  (that is: pip install 'ray[tune]>=2.9' 'optuna>=3')"
CANCEL_GRACE_S = 20.0  # how long a cancelled run may take to mark itself KILLED before its worker is killed
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def import_ray(what: str = "--parallel"):
    try:
        import ray
    except ImportError:
        raise ClframeError(f"{what} runs on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass
class RayOptions:
    """How a sweep uses Ray: the run command's --parallel, --ray-address, --gpus-per-run, --cpus-per-run."""

    parallel: int | None = None  # most runs at once; None: as many as the cluster's resources take
    address: str | None = None  # an existing cluster (else RAY_ADDRESS, else Ray starts here)
    gpus_per_run: float | None = None  # None: 1 if the cluster has GPUs and the device is not cpu, else 0
    cpus_per_run: float = 1.0

    @property
    def requested(self) -> bool:
        return self.parallel is not None or self.address is not None


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray for the sweep: the caller's session if one is open, else a cluster at the given address,
    else a local one started in this process (and shut down afterwards)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # a run's warnings reach the terminal as they are
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: all mean the same here
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ClframeError(f"cannot start or reach {where} ({str(exc).splitlines()[0][:200]}); on a cluster run "
                           f"'ray start --head' on the head node, or fix --ray-address") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_nodes(ray) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def gpus_for_each_run(ray, options: RayOptions, device: str) -> float:
    if options.gpus_per_run is not None:
        return options.gpus_per_run
    return 1.0 if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def device_for(device: str, gpus: float) -> str:
    """A run given no GPU runs on the CPU (``auto`` would otherwise find the node's GPUs, used by other runs)."""
    return "cpu" if gpus == 0 and device == "auto" else device


def check_resources(ray, cpus: float, gpus: float, device: str) -> None:
    """Refuse, in one line, a request no node of the cluster can ever meet (Ray would wait forever)."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        most = max(((node.get("CPU", 0), node.get("GPU", 0)) for node in nodes), default=(0, 0))
        raise ClframeError(f"each run asks for {cpus:g} CPUs and {gpus:g} GPUs, but no Ray node has that much (the "
                           f"largest has {most[0]:g} CPUs, {most[1]:g} GPUs); lower --cpus-per-run / --gpus-per-run")
    if device == "cuda" and gpus == 0:
        raise ClframeError("--device cuda with --gpus-per-run 0: Ray would hide every GPU from the runs; "
                           "give --gpus-per-run 1 (or a fraction such as 0.5 to share a GPU)")


# ----- tracking: one MLflow store that several processes can write at once -----
@contextlib.contextmanager
def mlflow_server(store_uri: str, echo: Callable[[str], None]) -> Iterator[str]:
    """A local ``mlflow server`` on ``store_uri`` for the block's duration; yields its URL.

    Artifacts are not proxied: a run writes them where the embedded store would (``./mlruns``
    here), so the store reads the same with or without the server afterwards."""
    with local_mlflow_server(store_uri, artifact_root=Path.cwd() / "mlruns",
                             hint="pass --tracking-uri http://HOST:PORT of a running server") as server:
        echo(f"parallel runs log through a local MLflow server at {server.url} on {absolute_uri(store_uri)} "
             f"(stopped when the sweep ends)")
        with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):  # links to this server die with it
            yield server.url


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def shared_tracking(uri: str, nodes: int, echo: Callable[[str], None]) -> Iterator[str]:
    """The tracking URI that every run of the sweep logs to (see the module docstring)."""
    remote = uri.startswith(("http://", "https://"))
    host = urllib.parse.urlparse(uri).hostname if remote else None
    if nodes > 1 and (not remote or host in LOCAL_HOSTS):
        raise ClframeError(f"this Ray cluster has {nodes} nodes, and they cannot all log to {uri}: on the head node "
                           f"start 'mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db' "
                           f"and pass --tracking-uri http://<head node address>:5000")
    if remote or not uri.startswith("sqlite:"):  # a server, or a database made for several writers
        yield uri
        return
    with mlflow_server(uri, echo) as url:
        yield url


def server_for_runs(store: str, uri: str) -> str | None:
    """The server a child logs to ``store`` through (what ``shared_tracking(store)`` yielded, unless
    it is the store itself). It goes to the run apart from its config (``tracking.logging_through``):
    the config and checkpoint keep the store, so a run resumed by hand after the sweep reaches it."""
    return None if uri == store else uri


# ----- what runs in a Ray worker -----
def enter_driver_folder(folder: str) -> None:
    """Relative paths and ``module:Class`` names mean in a worker what they mean where the sweep started.
    (MLflow's "View run at" lines are left out: the driver reports each run.)"""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if os.path.isdir(folder):
        os.chdir(folder)
        if folder not in sys.path[:1]:
            sys.path.insert(0, folder)


def run_child(config: ResolvedConfig, parent_run_id: str, resume: str | None, folder: str, threads: int,
              server: str | None = None, task_end=None):
    """One child run in a Ray worker (a sweep's child or a search's trial), logging through ``server``
    if given, ``task_end`` as in ``run_experiment``; returns the runner's RunResult (errors travel back
    to the driver)."""
    import torch

    from clframe.runner import run_experiment
    from clframe.tracking import logging_through, resolve_uri

    enter_driver_folder(folder)
    torch.set_num_threads(threads)
    with logging_through(resolve_uri(config.run.tracking_uri), server):
        return run_experiment(config, resume=resume, parent_run_id=parent_run_id, echo=lambda text: None,
                              task_end=task_end)


def failure_message(exc: BaseException) -> str:
    """What went wrong in a worker, in one line: the run's own error, or how the worker died."""
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the run raised
    if isinstance(cause, ClframeError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else 'the worker died'}"


def finished_runs(client, parent_run_id: str, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=5000)


def compared_keys(config: ResolvedConfig) -> set[str]:
    """The config keys that make two children the same run (all but where and how fast it runs)."""
    return set(config.flatten()) - RESUME_FREE_KEYS


def config_key(config: ResolvedConfig) -> tuple:
    keys = compared_keys(config)
    return tuple(sorted((k, str(v)[:6000]) for k, v in config.flatten().items() if k in keys))


def run_key(run, keys: set[str]) -> tuple:
    """A logged run's params, as ``config_key`` of its config."""
    return tuple(sorted((k, v) for k, v in run.data.params.items() if k in keys))


@dataclass
class Pending:
    index: int  # 1-based position in the sweep
    config: ResolvedConfig
    resume: str | None = None  # run id of a KILLED child that continues from its checkpoint


def unfinished(todo: list[Pending], runs: list, has_checkpoint: Callable[[Pending, str], bool]) -> list[Pending]:
    """The children of ``todo`` that no FINISHED run of ``runs`` matches; one that a KILLED run with a
    checkpoint matches continues from it, under that run's name. Each child is compared on its own
    keys: children of other strategies or scenarios have other config sections."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    remaining = []
    for item in todo:
        keys, key = compared_keys(item.config), config_key(item.config)
        done = next((r for r in finished if run_key(r, keys) == key), None)
        if done is not None:
            finished.remove(done)
            continue
        stopped = next((r for r in killed if run_key(r, keys) == key), None)
        if stopped is not None:
            killed.remove(stopped)
            if has_checkpoint(item, stopped.info.run_id):
                item.resume = stopped.info.run_id
                item.config.run = dataclasses.replace(item.config.run, run_name=stopped.info.run_name)
        remaining.append(item)
    return remaining


class RaySweep:
    """Runs a sweep's children on Ray (``run_sweep(..., execution=RaySweep(...))``)."""

    def __init__(self, options: RayOptions, resume_parent: str | None = None) -> None:
        self.options = options
        self.resume_parent = resume_parent

    def plan(self, parent, configs: list[ResolvedConfig], echo: Callable[[str], None]) -> list[Pending]:
        """Every child, or, resuming, those without a FINISHED run under the parent."""
        todo = [Pending(k, config) for k, config in enumerate(configs, start=1)]
        if not self.resume_parent:
            return todo
        from clframe import checkpoint

        experiment = parent.client.get_experiment_by_name(configs[0].run.experiment)
        runs = finished_runs(parent.client, parent.run_id, experiment.experiment_id)
        remaining = unfinished(todo, runs, lambda item, run_id: checkpoint.checkpoint_path(
            item.config.run.checkpoint_dir, run_id).is_file())
        echo(f"resuming sweep {parent.run_id}: {len(todo) - len(remaining)} of {len(todo)} runs already finished, "
             f"{sum(1 for p in remaining if p.resume)} continue from a checkpoint")
        return remaining

    def run_children(self, parent, children, configs: list[ResolvedConfig], fail_fast: bool, failures: list[str],
                     echo: Callable[[str], None]) -> int:
        """Run the children on Ray; append "name: error" to ``failures``; return how many were started."""
        from clframe.tracking import resolve_uri

        todo = self.plan(parent, configs, echo)
        if not todo:
            return len(configs)
        stamp = time.strftime("%m%d-%H%M%S")
        store = resolve_uri(configs[0].run.tracking_uri)
        with ray_session(self.options) as ray:
            device = configs[0].run.device
            gpus = gpus_for_each_run(ray, self.options, device)
            check_resources(ray, self.options.cpus_per_run, gpus, device)
            with shared_tracking(store, alive_nodes(ray), echo) as uri:
                for item in todo:  # the store stays in the config (and checkpoint); the server goes to run_child
                    item.config.run = dataclasses.replace(
                        item.config.run, progress=False, device=device_for(device, gpus),
                        run_name=item.config.run.run_name or f"{item.config.run.strategy}-{item.config.run.scenario}"
                                                             f"-{stamp}-{item.index}")
                task = ray.remote(run_child).options(num_cpus=self.options.cpus_per_run, num_gpus=gpus, max_retries=0)
                return _Flight(ray, task, parent, uri, server_for_runs(store, uri), len(configs), fail_fast, failures,
                               echo, self.options.parallel or len(todo),
                               max(1, int(self.options.cpus_per_run))).run(todo, self.resume_parent)


class _Flight:
    """The driver's loop: keep up to ``limit`` runs in flight, collect results, stop on request."""

    def __init__(self, ray, task, parent, uri: str, server: str | None, total: int, fail_fast: bool,
                 failures: list[str], echo: Callable[[str], None], limit: int, threads: int) -> None:
        self.ray, self.task, self.parent, self.uri, self.server, self.total = ray, task, parent, uri, server, total
        self.fail_fast, self.failures, self.echo, self.limit, self.threads = fail_fast, failures, echo, limit, threads
        self.in_flight: dict[Any, Pending] = {}

    def run(self, todo: list[Pending], resumed: str | None) -> int:
        from clframe.runner import RunInterrupted

        queue, started = list(todo), self.total - len(todo)
        folder = os.getcwd()
        try:
            while queue or self.in_flight:
                while queue and len(self.in_flight) < self.limit and not (self.failures and self.fail_fast):
                    item = queue.pop(0)
                    ref = self.task.remote(item.config, self.parent.run_id, item.resume, folder, self.threads,
                                           self.server)
                    self.in_flight[ref] = item
                    started += 1
                    self.echo(f"[{item.index}/{self.total}] {item.config.run.run_name} started"
                              + (f" (continues run {item.resume})" if item.resume else ""))
                if not self.in_flight:
                    break
                done, _ = self.ray.wait(list(self.in_flight), num_returns=1)
                item = self.in_flight.pop(done[0])
                try:
                    result = self.ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - the run's error or the worker's death, recorded
                    self.failed(item, failure_message(exc))
                    if self.fail_fast:
                        self.stop("KILLED", f"--fail-fast after {item.config.run.run_name} failed")
                    continue
                summary = result.summary
                self.echo(f"[{item.index}/{self.total}] {item.config.run.run_name} finished: average accuracy "
                          f"{summary['acc_avg']:.2f}   forgetting {summary['forgetting']:.2f}   wall "
                          f"{result.wall_s:.1f} s   (run {result.run_id})")
        except (KeyboardInterrupt, RunInterrupted):
            self.stop("KILLED", "interrupted")
            self.echo(f"the sweep's unfinished runs are KILLED; re-run only those with the same command and "
                      f"--resume {self.parent.run_id}")
            raise
        return started

    def failed(self, item: Pending, message: str) -> None:
        name = item.config.run.run_name
        self.echo(f"[{item.index}/{self.total}] {name} FAILED: {message}")
        self.failures.append(f"{name}: {message}")
        self.mark(item, "FAILED", message)

    def mark(self, item: Pending, status: str, message: str) -> None:
        """Close a child that its worker could not close (worker died or killed); create a FAILED one
        holding its config if it never opened, as a sequential sweep does."""
        from mlflow.tracking import MlflowClient

        from clframe.sweep import _record_failure

        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(item.config.run.experiment)
        found = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent.run_id}' and "
            f"attributes.run_name = '{item.config.run.run_name}'")) if experiment else []
        if found:
            run = found[0]
            client.set_tag(run.info.run_id, "clframe.error" if status == "FAILED" else "clframe.stopped",
                           message[:5000])
            # A neighbour run in the same checkpoint folder may have closed it first: it saw only a dead
            # process (KILLED, tag clframe.closed_by); the sweep knows the worker failed, which wins.
            closed_blind = run.info.status == "KILLED" and "clframe.closed_by" in run.data.tags
            if run.info.status == "RUNNING" or (status == "FAILED" and closed_blind):
                client.set_terminated(run.info.run_id, status=status)
        elif status == "FAILED":
            try:
                _record_failure(self.parent, item.config, item.config.run.run_name, message)
            except Exception as exc:  # noqa: BLE001 - the sweep matters more than the record
                self.echo(f"warning: could not record the failure in MLflow ({exc})")

    def stop(self, status: str, why: str) -> None:
        """Cancel every run in flight: each marks itself KILLED; one that does not stop in time is
        killed with its worker, and marked here."""
        if not self.in_flight:
            return
        for ref in self.in_flight:
            self.ray.cancel(ref, force=False)
        _, stuck = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=CANCEL_GRACE_S)
        for ref in stuck:
            self.ray.cancel(ref, force=True)
        for item in self.in_flight.values():
            self.mark(item, status, f"stopped: {why}")
        self.in_flight.clear()


def run_on_ray(options: dict, config_file: str | None, sets: list[str], plan, fail_fast: bool,
               ray_options: RayOptions, resume: str | None, echo: Callable[[str], None] = print) -> str:
    """``clframe run --sweep FILE --parallel N`` (or ``--ray-address``, or a search: block)."""
    from clframe.sweep import resolve_children, run_sweep

    import_ray("--parallel" if ray_options.parallel else "--ray-address" if ray_options.address else "search:")
    if plan.search:
        from clframe.search import RaySearch

        execution = RaySearch.from_plan(plan, ray_options, resume, options, config_file, sets)
    else:
        execution = RaySweep(ray_options, resume)
    if resume:
        check_parent(resolve_children(options, config_file, sets, plan)[0], resume)
    return run_sweep(options, config_file, sets, plan, fail_fast, echo=echo, execution=execution,
                     resume_parent=resume)


def check_parent(config: ResolvedConfig, run_id: str) -> None:
    """``--resume`` of a sweep names its parent run, in the store the sweep logs to."""
    from mlflow.tracking import MlflowClient

    from clframe.tracking import resolve_uri

    uri = resolve_uri(config.run.tracking_uri)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException: no such run
        run = None
    if run is None or run.data.tags.get("clframe.sweep") != "parent":
        raise ClframeError(f"--resume {run_id}: no sweep parent run with that id at {uri}; give the parent's run id "
                           f"(the sweep printed it first) and the same --tracking-uri")
