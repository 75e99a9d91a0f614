"""Runs read back from an MLflow store, and grouped the way a paper reports them.

A *group* holds the runs that differ only in their seed: every config key they logged as a param
(``run.*`` and the scenario's and strategy's sections) is equal, except the seed and the keys that
cannot change a result (``NEUTRAL``: names, paths, progress bars, devices). A group's numbers are
the mean and the sample standard deviation (``metrics.STD_DDOF`` = 1, numpy's ``std(ddof=1)``)
over its *complete* runs: FINISHED with every task done. Runs that failed, were killed, still run
or stopped short are named in the group's note, never averaged.

Used by ``clframe compare`` (tables, plots) and by sweeps, whose parent run logs its groups'
per-task means and stds (``log_group_curves``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clframe.config import RESUME_FREE_KEYS
from clframe.metrics import mean_std

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "clframe.sweep"  # "parent" on a sweep's (or seed group's) parent run
TASK_METRICS = ("acc_avg", "acc_seen", "acc_inc_avg", "forgetting", "bwt")  # logged at step = task
RUN_METRICS = {"trainable_params": "trainable_params", "wall_time_s": "wall_time_s",
               "train_img_s": "perf/train_img_s", "eval_img_s": "perf/eval_img_s"}
HIGHER_IS_BETTER = {"acc_avg": True, "acc_seen": True, "acc_inc_avg": True, "forgetting": False, "bwt": True}
# Params that cannot change a result: they never split a group nor show as a column. What a resume may
# change (one list, in clframe.config), plus the seed and where the results and the data live.
NEUTRAL = RESUME_FREE_KEYS | {"run.seed", "run.experiment", "run.data_root"}
# Config keys shown in columns or section titles of their own, not among the "differing keys".
OWN_COLUMN = {"run.strategy", "run.scenario", "run.model", "run.model_kwargs", "run.epochs", "run.joint",
              "run.eval_classes"}
# Config keys every group label already says (its strategy, and "-joint").
IN_LABEL = {"run.strategy", "run.joint"}


@dataclass
class RunRecord:
    """One MLflow run as the comparison needs it (final metric values; histories on demand)."""

    run_id: str
    run_name: str
    status: str
    strategy: str
    scenario: str
    model: str
    seed: int | None
    epochs: int | None
    joint: bool
    eval_classes: str
    kind: str  # class_il or domain_il (the tag scenario_kind)
    n_tasks: int | None  # the stream's tasks
    tasks_done: int | None  # training tasks finished (1 for a joint run)
    final: dict[str, float | None]  # TASK_METRICS and RUN_METRICS' names at the last step
    config: dict[str, str] = field(default_factory=dict)  # the result-changing config params
    model_kwargs: str = ""
    image_size: str = ""

    @property
    def train_tasks(self) -> int | None:
        return 1 if self.joint else self.n_tasks

    @property
    def complete(self) -> bool:
        return self.status == "FINISHED" and self.tasks_done is not None and self.tasks_done == self.train_tasks

    @property
    def section(self) -> tuple:
        """Runs are only ranked against runs of the same scenario, task count and evaluation."""
        return self.scenario, self.n_tasks, self.eval_classes


def number(value: Any, cast=float):
    if value is None:
        return None
    try:
        result = cast(float(value))
    except (TypeError, ValueError):
        return None
    return None if isinstance(result, float) and math.isnan(result) else result


def is_parent(run) -> bool:
    return run.data.tags.get(SWEEP_TAG) == "parent"


def to_record(client, run) -> RunRecord:
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    history = client.get_metric_history(run.info.run_id, "acc_avg") if "acc_avg" in metrics else []
    final = {key: number(metrics.get(key)) for key in TASK_METRICS}
    final.update({name: number(metrics.get(key)) for name, key in RUN_METRICS.items()})
    if final["trainable_params"] is None:
        final["trainable_params"] = number(params.get("n_trainable_params"))
    if final["trainable_params"] is not None:
        final["trainable_params"] = int(final["trainable_params"])
    config = {key: value for key, value in params.items()
              if "." in key and not key.startswith("stream.") and key not in NEUTRAL}
    return RunRecord(
        run_id=run.info.run_id, run_name=run.info.run_name or "", status=run.info.status,
        strategy=tags.get("strategy", params.get("run.strategy", "")),
        scenario=tags.get("scenario", params.get("run.scenario", "")),
        model=tags.get("model", params.get("run.model", "")),
        seed=number(params.get("run.seed"), int), epochs=number(params.get("run.epochs"), int),
        joint=params.get("run.joint", "False") == "True", eval_classes=params.get("run.eval_classes", "seen"),
        kind=tags.get("scenario_kind", ""),
        n_tasks=number(params.get("n_tasks"), int),
        tasks_done=max(m.step for m in history) + 1 if history else None,
        final=final, config=config, model_kwargs=params.get("run.model_kwargs", "{}"),
        image_size=params.get("run.image_size", "None"))


def differing_keys(records: list[RunRecord], shown_apart: set[str] = OWN_COLUMN) -> list[str]:
    """Config keys whose values differ among the runs that have them (the seed excluded), sorted;
    ``shown_apart``: keys left out because a column or title of their own shows them."""
    values: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.config.items():
            values.setdefault(key, set()).add(value)
    return sorted(key for key, seen in values.items() if len(seen) > 1 and key not in shown_apart)


def short_key(key: str) -> str:
    """``run.lr`` -> ``lr``; other sections keep their name (``l2p.pool_size``)."""
    return key[4:] if key.startswith("run.") else key


@dataclass
class Group:
    """Runs that differ only in seed, with mean/std over the complete ones."""

    records: list[RunRecord]

    @property
    def first(self) -> RunRecord:
        return self.records[0]

    @property
    def complete(self) -> list[RunRecord]:
        return [r for r in self.records if r.complete]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.complete if r.seed is not None})

    def stats(self, name: str) -> tuple[float, float | None, int]:
        return mean_std([r.final.get(name) for r in self.complete])

    def note(self, expected_seeds: set[int]) -> str:
        """Why a seed is absent from the mean: FAILED/KILLED/RUNNING/short runs, seeds never run."""
        parts = []
        for record in sorted(self.records, key=lambda r: (r.seed is None, r.seed or 0)):
            if not record.complete:
                state = record.status if record.status != "FINISHED" else "INCOMPLETE"
                parts.append(f"{state} seed {record.seed}")
        present = {r.seed for r in self.records}
        missing = sorted(expected_seeds - present)
        if missing:
            parts.append(f"missing seed{'s' if len(missing) > 1 else ''} {','.join(map(str, missing))}")
        return "; ".join(parts)


def group_records(records: list[RunRecord]) -> list[Group]:
    """Runs that differ only in seed, in first-seen order."""
    keys = sorted({key for r in records for key in r.config} - {"run.seed"})
    groups: dict[tuple, list[RunRecord]] = {}
    for record in records:
        identity = (record.section, record.strategy, record.model, record.joint,
                    tuple(record.config.get(key) for key in keys))
        groups.setdefault(identity, []).append(record)
    return [Group(sorted(members, key=lambda r: (r.seed is None, r.seed or 0))) for members in groups.values()]


def group_label(group: Group, keys: list[str]) -> str:
    """A short, metric-name-safe label: strategy, then the differing keys' values."""
    first = group.first
    parts = [first.strategy + ("-joint" if first.joint else "")]
    parts += [f"{short_key(key)}:{first.config.get(key, '')}" for key in keys]
    return re.sub(r"[^0-9A-Za-z_\-. :]", "_", " ".join(parts))[:200]  # what MLflow allows in a metric name


def step_curves(client, group: Group, names: tuple[str, ...] = TASK_METRICS) -> dict[str, dict[int, tuple]]:
    """Per metric, per task step: (mean, std, n) over the group's complete runs."""
    curves: dict[str, dict[int, tuple]] = {}
    for name in names:
        by_step: dict[int, list[float]] = {}
        for record in group.complete:
            history = sorted(client.get_metric_history(record.run_id, name), key=lambda m: (m.step, m.timestamp))
            for step, value in {m.step: m.value for m in history}.items():  # the last value at a step wins
                by_step.setdefault(step, []).append(value)
        curves[name] = {step: mean_std(values) for step, values in sorted(by_step.items())}
    return curves


def child_records(client, parent_run_id: str, experiment_id: str) -> list[RunRecord]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)
    return [to_record(client, run) for run in runs]


def unique_labels(labels: list[str]) -> list[str]:
    """The labels, a repeated one (cut at 200 characters, say) numbered from its second use on."""
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} group:{seen[label]}")
    return unique


def logged_points(client, run_id: str) -> dict[tuple[str, int], float]:
    """(metric, step) -> the value a run holds there (the last one logged at that step)."""
    points = {}
    for key in client.get_run(run_id).data.metrics:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            points[(key, metric.step)] = metric.value
    return points


def log_group_curves(tracker, experiment_id: str) -> list[str]:
    """A sweep's parent logs its children's per-task means and stds at step = task, so the MLflow
    UI's table and charts show them without expanding the children. One group (seeds of one
    config): ``acc_avg``, ``acc_avg_std``, ..., ``n_seeds``; several: ``<group label>/acc_avg``, ...,
    the label naming every key the groups differ in (epochs and model too: those split groups as
    well). A value the parent already holds at that step is not logged again (a resumed sweep), a
    changed one is (more seeds finished). Returns the labels logged (the groups' labels and seeds
    also go to the tag ``clframe.groups``)."""
    client = tracker.client
    records = child_records(client, tracker.run_id, experiment_id)
    groups = [g for g in group_records(records) if g.complete]
    if not groups:
        return []
    by_strategy: dict[str, list[RunRecord]] = {}
    for group in groups:  # keys that differ only between strategies (their defaults) need no label
        by_strategy.setdefault(group.first.strategy, []).extend(group.records)
    keys = sorted({key for members in by_strategy.values() for key in differing_keys(members, IN_LABEL)})
    if len({g.first.section for g in groups}) > 1 or "run.scenario" in keys:
        keys = ["run.scenario"] + [key for key in keys if key != "run.scenario"]
    labels = unique_labels([group_label(g, keys) for g in groups]) if len(groups) > 1 else [""]
    logged = logged_points(client, tracker.run_id)
    for label, group in zip(labels, groups):
        prefix = f"{label}/" if label else ""
        by_step: dict[int, dict[str, float]] = {}
        for name, curve in step_curves(client, group).items():
            for step, (mean, std, n) in curve.items():
                values = by_step.setdefault(step, {})
                values.update({f"{prefix}{name}": mean, f"{prefix}{name}_std": std if std is not None else 0.0})
                values[f"{prefix}n_seeds"] = max(values.get(f"{prefix}n_seeds", 0.0), float(n))
        for step, values in sorted(by_step.items()):
            fresh = {k: v for k, v in values.items()
                     if v is not None and np.isfinite(v) and logged.get((k, step)) != v}
            if fresh:
                tracker.log_metrics(fresh, step)
    names = [label or group.first.strategy for label, group in zip(labels, groups)]
    tracker.set_tags({"clframe.groups": json.dumps({name: g.seeds for name, g in zip(names, groups)})[:5000]})
    return names
