"""``clframe compare``: the runs of an experiment side by side, best average accuracy first.

One row per run: strategy, scenario, model, tasks done, final average accuracy, forgetting and
BWT (the values at the last task step), trainable parameters, wall time and throughput; as a
terminal table, CSV, JSON or Markdown. ``--plot`` draws average accuracy and forgetting against
the task index for the same runs. Any MLflow store works: the local sqlite file or a server.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from clframe.errors import ClframeError
from clframe.tracking import check_reachable

FORMATS = ("table", "csv", "json", "markdown")
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class RunRow:
    run_id: str
    run_name: str
    status: str
    strategy: str
    scenario: str
    model: str
    tasks_done: int | None
    n_tasks: int | None
    acc_avg: float | None
    forgetting: float | None
    bwt: float | None
    trainable_params: int | None
    wall_time_s: float | None
    train_img_s: float | None
    eval_img_s: float | None


# (field, header, format) for the table and Markdown; CSV and JSON carry every field, unrounded.
SHOWN = [("run_id", "run", "id"), ("strategy", "strategy", "s"), ("scenario", "scenario", "s"),
         ("model", "model", "s"), ("tasks_done", "tasks", "tasks"), ("acc_avg", "acc_avg", ".2f"),
         ("forgetting", "forgetting", ".2f"), ("bwt", "bwt", ".2f"), ("trainable_params", "params", ",d"),
         ("wall_time_s", "wall_s", ".1f"), ("train_img_s", "train_img/s", ".0f"),
         ("eval_img_s", "eval_img/s", ".0f"), ("status", "status", "s")]


def open_store(uri: str):
    """An MlflowClient on ``uri``; refuses to create an empty local store by reading a missing one."""
    match = re.match(r"sqlite:///(.+)", uri)
    if match and not Path(match.group(1)).exists():
        raise ClframeError(f"no MLflow store at {uri} (run clframe run here first, or pass --tracking-uri)")
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select_runs(client, experiment: str, refs: list[str]) -> list:
    """The runs named by ``refs`` (run id, unique id prefix, run name, or a sweep's parent run for
    its children); with no refs, every run of the experiment that logged results."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ClframeError(f"no experiment '{experiment}' in this store (experiments: {names}); "
                           f"pick one with --experiment")
    runs = _all_runs(client, found.experiment_id)
    has_results = [run for run in runs if "acc_avg" in run.data.metrics]
    if not refs:
        if not has_results:
            raise ClframeError(f"no run in experiment '{experiment}' has results yet")
        return has_results
    chosen: dict[str, object] = {}
    for ref in refs:
        matches = [r for r in runs if r.info.run_id == ref or r.info.run_name == ref]
        matches = matches or [r for r in runs if r.info.run_id.startswith(ref)]
        if not matches and re.fullmatch(r"[0-9a-f]{32}", ref):
            matches = [client.get_run(ref)]  # a run of another experiment, by its full id
        if not matches:
            raise ClframeError(f"no run '{ref}' in experiment '{experiment}' (give a run id, a unique prefix of "
                               f"one, or a run name; clframe compare lists the runs)")
        if len({r.info.run_id for r in matches}) > 1:
            listed = ", ".join(f"{r.info.run_id[:8]} ({r.info.run_name})" for r in matches[:5])
            raise ClframeError(f"'{ref}' matches {len(matches)} runs: {listed}; give more of the run id")
        run = matches[0]
        children = [r for r in runs if r.data.tags.get(PARENT_TAG) == run.info.run_id]
        for picked in children if children and "acc_avg" not in run.data.metrics else [run]:
            chosen.setdefault(picked.info.run_id, picked)
    return list(chosen.values())


def _number(value, cast=float):
    if value is None:
        return None
    try:
        number = cast(float(value))
    except (TypeError, ValueError):
        return None
    return None if isinstance(number, float) and math.isnan(number) else number


def to_row(client, run) -> RunRow:
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    history = client.get_metric_history(run.info.run_id, "acc_avg") if "acc_avg" in metrics else []
    return RunRow(
        run_id=run.info.run_id, run_name=run.info.run_name or "", status=run.info.status,
        strategy=tags.get("strategy", params.get("run.strategy", "")),
        scenario=tags.get("scenario", params.get("run.scenario", "")),
        model=tags.get("model", params.get("run.model", "")),
        tasks_done=max(m.step for m in history) + 1 if history else None,
        n_tasks=_number(params.get("n_tasks"), int),
        acc_avg=_number(metrics.get("acc_avg")), forgetting=_number(metrics.get("forgetting")),
        bwt=_number(metrics.get("bwt")),
        trainable_params=_number(metrics.get("trainable_params", params.get("n_trainable_params")), int),
        wall_time_s=_number(metrics.get("wall_time_s")), train_img_s=_number(metrics.get("perf/train_img_s")),
        eval_img_s=_number(metrics.get("perf/eval_img_s")))


def sort_rows(rows: list[RunRow]) -> list[RunRow]:
    """Best final average accuracy first; then less forgetting; runs without results last."""
    return sorted(rows, key=lambda r: (r.acc_avg is None, -(r.acc_avg or 0.0),
                                       r.forgetting if r.forgetting is not None else math.inf,
                                       r.run_name, r.run_id))


def _cell(row: RunRow, name: str, fmt: str) -> str:
    value = getattr(row, name)
    if fmt == "id":
        return value[:8]
    if fmt == "tasks":
        return "" if value is None else f"{value}/{row.n_tasks}" if row.n_tasks else str(value)
    if value is None:
        return ""
    return format(value, fmt) if fmt != "s" else str(value)


def format_rows(rows: list[RunRow], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps([asdict(row) for row in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(RunRow.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
        return out.getvalue().rstrip("\n")
    headers = [header for _, header, _ in SHOWN]
    cells = [[_cell(row, name, f) for name, _, f in SHOWN] for row in rows]
    left = [f in ("s", "id") for _, _, f in SHOWN]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join(":---" if is_left else "---:" for is_left in left) + "|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])
    if fmt != "table":
        raise ClframeError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    widths = [max(len(h), *(len(line[k]) for line in cells)) for k, h in enumerate(headers)]

    def join(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if is_left else v.rjust(w) for v, w, is_left in zip(values, widths, left)).rstrip()

    return "\n".join([join(headers)] + [join(line) for line in cells])


def plot_runs(client, rows: list[RunRow], path: str | Path) -> Path:
    """Average accuracy and forgetting against the task index, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        label = f"{row.strategy} ({row.run_id[:8]})"
        for ax, key in zip(axes, ("acc_avg", "forgetting")):
            history = sorted(client.get_metric_history(row.run_id, key), key=lambda m: (m.step, m.timestamp))
            by_step = {m.step: m.value for m in history}  # the last value logged at a step wins
            ax.plot(list(by_step), list(by_step.values()), marker="o", label=label)
    for ax, title in zip(axes, ("average accuracy (%)", "forgetting (%)")):
        ax.set_title(title)
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_runs(uri: str, experiment: str, refs: list[str] | None = None, fmt: str = "table",
                 plot: str | Path | None = None) -> str:
    """The formatted comparison (and the plot, when asked) of the chosen runs."""
    if fmt not in FORMATS:
        raise ClframeError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    client = open_store(uri)
    rows = sort_rows([to_row(client, run) for run in select_runs(client, experiment, list(refs or []))])
    if plot:
        plot_runs(client, rows, plot)
    return format_rows(rows, fmt)
