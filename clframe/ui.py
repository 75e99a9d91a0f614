"""``clframe ui``: the MLflow UI on a local store, opened on the experiment's runs, and run lean.

The server is ``clframe.mlflow_server``'s lean one (``--workers 1``, no job runner: 2 processes and
0.48 GiB RSS where ``mlflow ui`` starts 15 and 1.91 GiB; ``--workers N`` gives more). The URL
printed opens the runs table of the experiment in the UI's machine-learning view
(``workflowType=machine_learning``): MLflow 3's UI otherwise starts on its GenAI pages (traces),
whatever the experiment holds.
"""
from __future__ import annotations

import contextlib
import signal

from clframe.mlflow_server import local_mlflow_server
from clframe.tracking import store_failure, tag_experiment_kind


def runs_view_url(base: str, experiment_id: str | None) -> str:
    """The UI page of an experiment's runs (the experiment list when there is none yet)."""
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def find_experiment(uri: str, experiment: str) -> str | None:
    """The experiment's id, tagging it for the UI's runs view if an older clframe made it. A missing
    or damaged store is one line, as for ``clframe compare``."""
    from clframe.compare import open_store

    client = open_store(uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:
        failure = store_failure(uri, exc)
        if failure is None:
            raise
        raise failure from None
    if found is None:
        return None
    with contextlib.suppress(Exception):  # a read-only store still browses
        tag_experiment_kind(client, found)
    return found.experiment_id


def serve(uri: str, experiment: str, host: str, port: int, workers: int, open_browser: bool, echo) -> None:
    """Run the UI until Ctrl-C; prints (and with ``open_browser`` opens) the runs view's URL."""
    experiment_id = find_experiment(uri, experiment)
    previous = signal.signal(signal.SIGTERM, _stop)  # a SIGTERM stops the server too, as Ctrl-C does
    try:
        with local_mlflow_server(uri, host, port, workers, quiet=False) as server:
            url = runs_view_url(server.url, experiment_id)
            where = f"experiment '{experiment}'" if experiment_id else f"no experiment '{experiment}' yet: the list"
            echo(f"MLflow UI for {uri} ({where}): {url}   (Ctrl-C stops it)")
            if open_browser:
                import webbrowser

                webbrowser.open(url)
            server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt
