"""MLflow tracking: one run per ``clframe run``, params = the flattened resolved config (and the
stream's order), metrics at ``step = task index``, artifacts for the config and the accuracy
matrix (CSV + heatmap). The task-boundary checkpoint is not copied into the run (one copy, in
``checkpoint_dir``).

Stores: sqlite files (the default ``sqlite:///mlflow.db``; several runs may start at once in a new
folder: the tables are made under a lock) and http(s) servers. Folder ("file") stores are refused:
MLflow 3 keeps them in maintenance mode. A damaged or unwritable sqlite file is refused in one line
before a run opens.

mlflow is imported inside the tracker (it is slow to import and absent on some GPU hosts).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from clframe.errors import ClframeError
from clframe.runfiles import check_writable_dir, check_writable_file, folder_lock, kill_point

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The MLflow UI (3.x) reads this experiment tag to choose between its GenAI pages (traces) and the
# machine-learning ones (runs, charts); its values are in the UI's ExperimentKind enum
# (mlflow/server/js: "genai_development", "custom_model_development", ...).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tag_experiment_kind(client, experiment) -> None:
    """Tag an experiment an older clframe made, so the MLflow UI opens it on its runs."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
FALLBACK_DB = "mlflow-fallback.db"
SQLITE_PREFIX = "sqlite:///"
# What sqlite says about a damaged file, and about a store another process holds a moment too long.
DAMAGED = ("file is not a database", "database disk image is malformed", "file is encrypted")
BUSY = ("database is locked", "database table is locked")
# "STORE_URI SERVER_URL": a local server that this process logs to the store through (clframe.parallel_sweep).
STORE_SERVER_ENV = "CLFRAME_STORE_SERVER"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def endpoint(uri: str) -> str:
    """What a client of the store ``uri`` talks to: the local server that serves it, while
    ``logging_through`` says so, else the store itself."""
    store, _, server = os.environ.get(STORE_SERVER_ENV, "").rpartition(" ")
    return server if store and absolute_uri(uri) == store else uri


@contextlib.contextmanager
def logging_through(store: str, server: str | None) -> Iterator[None]:
    """In the block, clients of ``store`` talk to the http ``server`` on it (a parallel sweep's: a
    sqlite file takes one writer process at a time); None: to the store itself. A run's config,
    checkpoint and result keep naming ``store``, so the run resumes there once the server is gone."""
    saved = os.environ.get(STORE_SERVER_ENV)
    if server is not None:
        os.environ[STORE_SERVER_ENV] = f"{absolute_uri(store)} {server}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(STORE_SERVER_ENV, None)
        else:
            os.environ[STORE_SERVER_ENV] = saved


# ----- local stores: where they are, whether they can be used -----
def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///FILE`` URI (relative to the working directory), else None."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    name = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return Path(name) if name and name != ":memory:" else None


def absolute_uri(uri: str) -> str:
    """The URI with a sqlite file made absolute, so a checkpoint names the store from any folder."""
    path = sqlite_file(uri)
    if path is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else None
    return f"{SQLITE_PREFIX}{path.expanduser().absolute()}" + (f"?{query}" if query else "")


def refuse_file_store(uri: str) -> None:
    """MLflow 3 refuses folder ("file") stores unless told otherwise, and they get no fixes: say so in one line."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ("file" if uri.lower().startswith("file:") else "")
    if "://" in uri and scheme != "file":
        return
    stem = Path(uri.split(":", 1)[1] if scheme == "file" else uri).name or "mlflow"
    raise ClframeError(f"tracking URI {uri}: folder (file) stores are not supported (MLflow 3 keeps them in "
                       f"maintenance mode); use --tracking-uri sqlite:///{stem.removesuffix('.db')}.db (one file) or "
                       f"an http(s):// MLflow server; 'mlflow migrate-filestore' moves an existing folder's runs")


def damaged_store(path: Path, why: str) -> ClframeError:
    return ClframeError(f"the MLflow store {path.absolute()} is damaged ({why}); move it aside "
                        f"(mv {path} {path}.damaged) to start a new store there, restore it from a backup, or "
                        f"pass --tracking-uri sqlite:///OTHER.db")


def check_sqlite_intact(uri: str) -> None:
    """Refuse, in one line, a sqlite store that is not a database or was cut short (cheap: the
    header and the schema are read, not the whole file)."""
    path = sqlite_file(uri)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise damaged_store(path, "not an SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_size_valid = header[24:28] == header[92:96]  # the in-header size is current (no WAL pending)
    if header_size_valid and not Path(f"{path}-wal").exists() and size < pages * page_size:
        raise damaged_store(path, f"cut short: {size} of its {pages * page_size} bytes")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path.absolute()}?mode=ro", uri=True, timeout=30)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if any(text in str(exc) for text in DAMAGED):
            raise damaged_store(path, str(exc)) from None
        raise


def check_store(uri: str, resuming: bool = False) -> None:
    """Before a run opens: the store is of a kind clframe can log to, and a sqlite store's file
    and folder are writable and intact. A resumed run's sqlite store must still exist (else a new
    empty store would be made and the run's earlier tasks would be nowhere). A store that a local
    server serves is checked as its server (``check_reachable``): the server writes the file."""
    refuse_file_store(uri)
    path = sqlite_file(uri)
    if path is None or endpoint(uri) != uri:
        return
    fix = "pass --tracking-uri sqlite:///WRITABLE/PATH.db, or run from a writable folder"
    if resuming and not path.is_file():
        raise ClframeError(f"--resume: the MLflow store {path.absolute()} that holds this run is gone; put it back "
                           f"(or pass --tracking-uri to where it moved) and resume again")
    check_writable_file(path.absolute(), "the MLflow store", fix)
    check_sqlite_intact(uri)


@contextlib.contextmanager
def quiet_store_setup() -> Iterator[None]:
    """MLflow logs its table creation ('Creating initial MLflow database tables...') at INFO on
    stderr; a new store is no news to a user."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def store_failure(uri: str, exc: BaseException) -> ClframeError | None:
    """The one-line error for a store that is damaged or unwritable, or None for anything else."""
    text = str(exc)
    path = sqlite_file(uri)
    if path is not None and any(damage in text for damage in DAMAGED):
        return damaged_store(path, next(damage for damage in DAMAGED if damage in text))
    if path is not None and ("readonly database" in text or "unable to open database" in text):
        return ClframeError(f"the MLflow store {path.absolute()} cannot be written ({text.splitlines()[0][:120]}); "
                            f"pass --tracking-uri sqlite:///WRITABLE/PATH.db")
    return None


def retry_busy(call: Callable[[], Any], attempts: int = 8, also: tuple[str, ...] = ()) -> Any:
    """Run ``call``, retrying while sqlite says another process holds the store (parallel runs),
    or on the messages in ``also``."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - MlflowException or SQLAlchemy's OperationalError
            if attempt == attempts - 1 or not any(text in str(exc) for text in BUSY + also):
                raise
            time.sleep(0.05 * 2 ** attempt)


def health_failure(url: str, timeout: float) -> str | None:
    """Why the MLflow server at ``url`` does not answer ``/health``; None when it does."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).read()
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at start, in one line, when an HTTP tracking server (or the one serving ``uri``) does not answer."""
    uri = endpoint(uri)
    if not uri.startswith(("http://", "https://")):
        return
    reason = health_failure(uri, timeout)
    if reason is not None:
        raise ClframeError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                           f"--tracking-uri, or leave it out to log to sqlite:///mlflow.db here")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowTracker:
    """Owns one MLflow run; every call is a no-op after ``end``."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None
        self._system_monitor = None  # mlflow's SystemMetricsMonitor while watch_system is on

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any],
              run_id: str | None = None, parent_run_id: str | None = None, complete: bool = False) -> str:
        """Create the run (or reopen ``run_id`` to resume) and log tags and params. ``complete``: the
        resumed run's checkpoint holds every task; refused only if the run is already FINISHED."""
        check_reachable(self.uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        from mlflow.tracking import MlflowClient

        database = sqlite_file(endpoint(self.uri))
        # Two runs starting at once in a new folder would both create the store's tables: one at a time.
        lock = folder_lock(database.absolute().parent) if database is not None else contextlib.nullcontext()
        try:
            with lock, quiet_store_setup():
                # 'already exists': another program made the tables meanwhile, without this lock
                self._client = retry_busy(lambda: MlflowClient(tracking_uri=endpoint(self.uri)),
                                          also=("already exists",))
                if run_id is not None:
                    previous = retry_busy(lambda: self._client.get_run(run_id)).info.status
                    if complete and previous == "FINISHED":
                        raise ClframeError(f"--resume: run {run_id} already finished all its tasks; nothing to "
                                           f"resume (clframe compare {run_id} shows its results)")
                    retry_busy(lambda: self._client.update_run(run_id, status="RUNNING"))
                    self.run_id = run_id
                    return run_id
                experiment_id = retry_busy(self._experiment_id)
        except Exception as exc:
            failure = store_failure(self.uri, exc)
            if failure is None:
                raise
            raise failure from None
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = retry_busy(lambda: self._client.create_run(experiment_id, tags=all_tags, run_name=run_name))
        self.run_id = run.info.run_id
        kill_point("run_creating")
        self.log_params(params)
        return self.run_id

    def _experiment_id(self) -> str:
        """The experiment's id (created if new), once its local artifact folder is known to be writable."""
        experiment = self._client.get_experiment_by_name(self.experiment)
        location = experiment.artifact_location if experiment is not None else None
        if location is None and sqlite_file(self.uri) is not None:
            location = str(Path.cwd() / "mlruns")  # MLflow's default artifact root for a new experiment
        if location and (location.startswith("file:") or "://" not in location):
            check_writable_dir(Path(location.removeprefix("file://").removeprefix("file:")),
                               f"the artifact folder of MLflow experiment '{self.experiment}'",
                               "run from a writable folder, or use another --experiment")
        if experiment is not None:
            tag_experiment_kind(self._client, experiment)
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # noqa: BLE001 - another run created it meanwhile (two runs started at once)
            experiment = self._client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            retry_busy(lambda: self._client.log_batch(self.run_id, params=items[start:start + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 500):
            retry_busy(lambda: self._client.log_batch(self.run_id, metrics=items[start:start + 500]))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            retry_busy(lambda: self._client.set_tag(self.run_id, key, value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_heatmap(self, acc_matrix: np.ndarray, rows_done: int, artifact_file: str = "acc_matrix.png") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = acc_matrix.shape[1]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.5 * max(rows_done, 1)))
        shown = np.ma.masked_invalid(acc_matrix[:rows_done])
        image = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
        for i in range(rows_done):
            for j in range(n):
                if not np.isnan(acc_matrix[i, j]):
                    ax.text(j, i, f"{acc_matrix[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        fig.colorbar(image, ax=ax, label="accuracy %")
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / artifact_file
            fig.savefig(path, dpi=100)
            plt.close(fig)
            self.log_file(path)

    def watch_system(self, resumed: bool) -> None:
        """Log MLflow's system metrics (``system/*``: CPU, memory, disk, network; GPU with pynvml)
        for this run from a background thread, every 10 s, until ``end``; silently nothing without
        psutil."""
        import importlib.util

        if importlib.util.find_spec("psutil") is None or self.run_id is None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO lines on stderr
        self._system_monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                                    tracking_uri=endpoint(self.uri))
        self._system_monitor.start()

    def end(self, status: str = "FINISHED") -> None:
        monitor, self._system_monitor = self._system_monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):  # the run's status matters more than its last sample
                monitor.finish()
                if getattr(monitor, "_logging_step", 1) == 0:  # shorter than one sampling interval: one sample
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()
        if self._client is not None and self.run_id is not None:
            retry_busy(lambda: self._client.set_terminated(self.run_id, status=status))
            self._client = None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def fallback_uri() -> str:
    """The local store a run moves to when its server goes away: ``mlflow-fallback.db`` here."""
    return f"sqlite:///{Path.cwd() / FALLBACK_DB}"


class FallbackTracker:
    """The tracker a run uses: an :class:`MlflowTracker` that survives its server going away.

    Every call is also written to a journal (metrics with their timestamps, texts, heatmaps,
    file paths: kilobytes). When a call to an http(s) server fails and the server no longer
    answers ``/health``, the tracker opens a run of the same name, tags and params in the local
    store ``sqlite:///<cwd>/mlflow-fallback.db``, replays the journal into it, says so on stderr,
    and carries on there; nothing the run logged is lost. An error from a server that still
    answers, or from a local store, is raised as before. A server that is down when the run
    starts still fails at start (``check_reachable``). Once the server is back, the abandoned
    run there is marked FAILED with a ``clframe.moved_to`` tag.

    A sweep's children follow their parent: a child that falls back moves the parent (if it runs
    in this process) to the same local store first, so the group stays together there.
    """

    _open: dict[str, "FallbackTracker"] = {}  # run id on the server -> tracker, for sweeps

    def __init__(self, uri: str | None, experiment: str, notify=_warn, system_metrics: bool = False) -> None:
        self.primary = MlflowTracker(uri, experiment)
        self.system_metrics = system_metrics  # run.system_metrics: MLflow's system/* metrics for this run
        self.active = self.primary
        self.experiment = experiment
        self.notify = notify
        self.journal: list[tuple[str, tuple]] = []
        self._start: tuple | None = None

    @property
    def uri(self) -> str:
        return self.active.uri

    @property
    def run_id(self) -> str | None:
        return self.active.run_id

    @property
    def fell_back(self) -> bool:
        return self.active is not self.primary

    @property
    def client(self):
        return self.active._client

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any],
              run_id: str | None = None, parent_run_id: str | None = None, complete: bool = False) -> str:
        try:
            started = self.primary.start(run_name, tags, params, run_id=run_id, parent_run_id=parent_run_id,
                                         complete=complete)
        except Exception as exc:
            if self.primary.run_id is not None and run_id is None:  # created, then failed: not left RUNNING
                with contextlib.suppress(Exception):
                    self.primary.end("FAILED")
            if isinstance(exc, ClframeError):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            if run_id is not None:
                raise ClframeError(f"--resume: cannot reopen MLflow run {run_id} at {self.primary.uri} "
                                   f"({type(exc).__name__}: {first}); pass the --tracking-uri it was logged "
                                   f"to") from None
            if self._server_gone():
                raise ClframeError(f"MLflow tracking server {self.primary.uri} stopped answering as the run started "
                                   f"({type(exc).__name__}); start it again, or leave --tracking-uri out to log to "
                                   f"{DEFAULT_TRACKING_URI} here") from None
            if self.primary.uri.startswith(("http://", "https://")):
                raise ClframeError(f"{self.primary.uri} answers /health but not as an MLflow tracking server "
                                   f"({type(exc).__name__}: {first}); check --tracking-uri") from None
            raise ClframeError(f"cannot open an MLflow run in {self.primary.uri} ({type(exc).__name__}: "
                               f"{first})") from None
        self._start = (run_name, dict(tags), dict(params), parent_run_id, run_id)
        self._open[started] = self
        if self.system_metrics:
            try:
                self.primary.watch_system(resumed=run_id is not None)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop a run
                self.notify(f"system metrics are off for this run ({type(exc).__name__}: {exc})")
        return started

    def _call(self, method: str, *args) -> None:
        self.journal.append((method, args))
        if self.fell_back:
            getattr(self.active, method)(*args)
            return
        try:
            getattr(self.primary, method)(*args)
        except Exception as exc:
            if not self._server_gone():
                raise
            self.switch(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")

    def _server_gone(self) -> bool:
        if not endpoint(self.primary.uri).startswith(("http://", "https://")):
            return False
        try:
            check_reachable(self.primary.uri)
            return False
        except ClframeError:
            return True

    def follow_server(self) -> None:
        """Move to the local store now if the server has gone away (a sweep asks between runs)."""
        if not self.fell_back and self._start is not None and self._server_gone():
            self.switch("its /health does not answer")

    def switch(self, reason: str) -> None:
        """Move this run to the local fallback store and replay everything logged so far."""
        if self.fell_back or self._start is None:
            return
        run_name, tags, params, parent_run_id, resumed_id = self._start
        server_run = self.primary.run_id
        tags = dict(tags, **{"clframe.fallback_from": f"{self.primary.uri} run {server_run}"})
        if resumed_id:
            tags["clframe.resumed_from"] = resumed_id  # earlier tasks' metrics stay on the server
        parent = self._open.get(parent_run_id) if parent_run_id else None
        if parent is not None:
            parent.switch(reason)
            parent_run_id = parent.run_id
        elif parent_run_id:
            tags["clframe.server_parent_run_id"], parent_run_id = parent_run_id, None
        fallback = MlflowTracker(fallback_uri(), self.experiment)
        try:
            fallback.start(run_name, tags, params, parent_run_id=parent_run_id)
            for method, args in self.journal:
                if method != "log_file" or Path(args[0]).exists():
                    getattr(fallback, method)(*args)
        except Exception as exc:
            raise ClframeError(f"MLflow server {self.primary.uri} went away ({reason}) and the local fallback "
                               f"store {fallback.uri} failed too ({type(exc).__name__}: {exc}); the task-boundary "
                               f"checkpoint is kept") from exc
        self.active = fallback
        self.notify(f"MLflow server {self.primary.uri} stopped answering ({reason}). Run '{run_name}' continues in "
                    f"the local store {fallback.uri} as run {fallback.run_id} (experiment '{self.experiment}'); "
                    f"everything logged so far was copied there. Browse it with: clframe compare --tracking-uri "
                    f"{fallback.uri}   or   clframe ui --backend-store-uri {fallback.uri}")

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        self._call("log_metrics", dict(metrics), step, timestamp_ms or int(time.time() * 1000))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", dict(tags))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_file", str(path), artifact_path)

    def log_heatmap(self, acc_matrix: np.ndarray, rows_done: int, artifact_file: str = "acc_matrix.png") -> None:
        self._call("log_heatmap", acc_matrix.copy(), rows_done, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self._start is None or self.active._client is None:
            return
        server_run = self.primary.run_id
        if not self.fell_back:
            try:
                self.primary.end(status)
            except Exception as exc:
                if not self._server_gone():
                    raise
                self.switch(f"{type(exc).__name__} at the end of the run")
        self._open.pop(server_run, None)
        if not self.fell_back:
            return
        self.active.end(status)
        self.notify(f"run '{self._start[0]}' ended {status} in the local store {self.active.uri} (run "
                    f"{self.active.run_id}), not on {self.primary.uri}")
        if not self._server_gone():  # the server is back: point its abandoned run at the copy
            try:
                self.primary._client.set_tag(server_run, "clframe.moved_to", f"{self.active.uri} run {self.active.run_id}")
                self.primary._client.set_terminated(server_run, status="FAILED")
            except Exception:  # noqa: BLE001 - best effort; the results are safe locally
                pass


class NullTracker:
    """The tracker of ranks other than 0 in a torchrun run: only rank 0 logs to MLflow. It takes
    every call and keeps nothing; ``run_id`` is rank 0's (set by the runner)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri
        self.run_id: str | None = None
        self.fell_back = False

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any], run_id: str | None = None,
              parent_run_id: str | None = None, complete: bool = False) -> str | None:
        return run_id

    def __getattr__(self, name: str):  # log_metrics, log_text, log_file, log_heatmap, set_tags, end, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
