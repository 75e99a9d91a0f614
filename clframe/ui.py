"""``clframe ui``: the MLflow UI on a local store, opened on the experiment's runs, and run lean.

``mlflow ui`` starts uvicorn with 4 workers plus MLflow's job runner (huey consumers for GenAI
jobs): measured on a busy 2-core development machine, 15 processes and 1.91 GiB RSS, 78 s until
it answered. Browsing a local store needs none of that: ``mlflow server --workers 1`` with
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` is 2 processes and 0.48 GiB RSS, answering in 16 s
(``--workers N`` gives more). The URL printed opens the runs table of the experiment in the UI's
machine-learning view (``workflowType=machine_learning``): MLflow 3's UI otherwise starts on its
GenAI pages (traces), whatever the experiment holds.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request

from clframe.errors import ClframeError
from clframe.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG


def runs_view_url(base: str, experiment_id: str | None) -> str:
    """The UI page of an experiment's runs (the experiment list when there is none yet)."""
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def find_experiment(uri: str, experiment: str) -> str | None:
    """The experiment's id, tagging it for the UI's runs view if an older clframe made it."""
    from clframe.compare import open_store

    client = open_store(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    if EXPERIMENT_KIND_TAG not in found.tags:
        with contextlib.suppress(Exception):  # a read-only store still browses
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def server_command(uri: str, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", str(workers), "--uvicorn-opts", "--no-access-log"]
    return command, dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


def wait_until_up(process: subprocess.Popen, base: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClframeError(f"the MLflow server exited with code {process.returncode} before answering at {base} "
                               f"(is the port taken? try --port)")
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.3)
    raise ClframeError(f"the MLflow server did not answer at {base} within {timeout:.0f} s")


def serve(uri: str, experiment: str, host: str, port: int, workers: int, open_browser: bool, echo) -> None:
    """Run the UI until Ctrl-C; prints (and with ``open_browser`` opens) the runs view's URL."""
    experiment_id = find_experiment(uri, experiment)
    command, env = server_command(uri, host, port, workers)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    base = f"http://{host}:{port}"
    previous = signal.signal(signal.SIGTERM, _stop)  # a SIGTERM stops the server too, as Ctrl-C does
    try:
        wait_until_up(process, base)
        url = runs_view_url(base, experiment_id)
        where = f"experiment '{experiment}'" if experiment_id else f"no experiment '{experiment}' yet: the list"
        echo(f"MLflow UI for {uri} ({where}): {url}   (Ctrl-C stops it)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt
