"""A local ``mlflow server`` on a store, run lean, for as long as a block needs it.

Two commands need one: ``clframe ui`` (browsing a local store) and a parallel sweep (several
processes logging to one sqlite store, through one server). ``mlflow ui`` starts uvicorn with 4
workers plus MLflow's job runner (huey consumers for GenAI jobs): measured on a busy 2-core
development machine, 15 processes and 1.91 GiB RSS, 78 s until it answered. Neither use needs
that: ``mlflow server --workers 1`` with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and no
access log is 2 processes and 0.48 GiB RSS, answering in 16 s (``workers`` gives more).

The server has its own session, so a Ctrl-C meant for the command does not stop it before the
command has finished with it (a sweep marks its runs KILLED through it); it is stopped, with the
processes it started, when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clframe.errors import ClframeError
from clframe.tracking import absolute_uri, health_failure

START_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0  # how long the server may take to stop on SIGTERM before it is killed


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    """The server at ``url`` answers ``/health``."""
    return health_failure(url, timeout=2.0) is None


def server_command(store_uri: str, host: str, port: int, workers: int,
                   artifact_root: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The lean ``mlflow server`` command and its environment. With ``artifact_root``, artifacts are
    not proxied: clients write them where the embedded store would, so the store reads the same with
    or without the server."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--host", host,
               "--port", str(port), "--workers", str(workers), "--uvicorn-opts", "--no-access-log"]
    if artifact_root is not None:
        command += ["--default-artifact-root", str(artifact_root), "--no-serve-artifacts"]
    return command, dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def local_mlflow_server(store_uri: str, host: str = "127.0.0.1", port: int | None = None, workers: int = 1,
                        artifact_root: Path | None = None, quiet: bool = True,
                        hint: str = "is the port taken? try --port") -> Iterator[LocalServer]:
    """A lean ``mlflow server`` on ``store_uri`` (a free port unless ``port``) for the block; it has
    answered ``/health`` when the block starts. ``quiet``: its output goes to a temporary log whose
    last line, if it does not start, is in the one-line error (with ``hint``); else to the terminal."""
    store_uri = absolute_uri(store_uri)
    port = port or free_port()
    url = f"http://{host}:{port}"
    command, env = server_command(store_uri, host, port, workers, artifact_root)
    log = tempfile.NamedTemporaryFile("w+", prefix="clframe-mlflow-server-", suffix=".log", delete=False) \
        if quiet else None
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                how = f"exited with code {process.returncode}" if process.returncode is not None else \
                    f"did not answer within {START_TIMEOUT_S:.0f} s"
                tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] if log else []
                raise ClframeError(f"the MLflow server on {store_uri} {how} at {url}"
                                   f"{f' ({tail[0][:200]})' if tail else ''}; {hint}")
            time.sleep(0.25)
        yield LocalServer(url, process)
    finally:
        stop(process)
        if log is not None:
            log.close()
            Path(log.name).unlink(missing_ok=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn's workers too); SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):  # also after the server exited: its workers may linger
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
