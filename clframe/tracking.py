"""MLflow tracking in the layout of DESIGN.md: one run per ``clframe run``, params = the
flattened resolved config, metrics at ``step = task index``, artifacts for the config, the
accuracy matrix (CSV + heatmap) and the trainable state.

mlflow is imported inside the tracker (it is slow to import and absent on some GPU hosts).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from clframe.errors import ClframeError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at start, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClframeError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                           f"--tracking-uri, or leave it out to log to sqlite:///mlflow.db here") from None


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

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any],
              run_id: str | None = None, parent_run_id: str | None = None) -> str:
        """Create the run (or reopen ``run_id`` to resume) and log tags and params."""
        check_reachable(self.uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        experiment = self._client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(self.experiment)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[start:start + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

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

    def end(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self._client = None
