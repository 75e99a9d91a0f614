"""Sweeps: several runs in turn, as child runs of one MLflow parent run so the UI groups them.

``clframe run --strategy linear --strategy finetune`` runs one child per strategy;
``clframe run --sweep FILE.yaml`` runs the children a file lists::

    name: digits-strategies        # the parent run's name (default: sweep-<time>, or --run-name)
    fail_fast: false               # stop at the first failing child (default: go on; --fail-fast)
    runs:                          # one child per entry, each with any of: strategy, scenario,
      - strategy: linear           #   config (a YAML file, relative to this file), set
      - strategy: finetune
        set: {lr: 0.001, epochs: 2}
    grid:                          # and/or every combination of these values (keys as for --set,
      lr: [0.01, 0.001]            #   plus strategy and scenario); crossed with each runs: entry
    seeds: [0, 1, 2]               # every child once per seed (or --seeds 0,1,2, which wins)

The command line's options and ``--set`` apply to every child, a child's own ``set`` on top. A
child that names no strategy gets each ``--strategy`` of the command line in turn. Every child's
config is resolved before the first one starts, so a typo stops the sweep before any work, and
every field of the file is checked for its type (``fail_fast: no`` is false; a ``name`` must be a
string). ``clframe run --seeds 0,1,2`` alone is a sweep of one config over three seeds.

Aggregates: when the children are done, the parent run logs their per-task means and standard
deviations over seeds (``clframe.runsets.log_group_curves``) at step = task, so the MLflow UI shows
a sweep's results on its parent row and charts without expanding it.

Failure policy: a failing child is recorded FAILED (a child that failed before its run opened gets
a FAILED run holding only its config), with the message in the tag ``clframe.error``, and the
sweep goes on with the next child; ``--fail-fast`` (or ``fail_fast: true``) stops it instead.
Ctrl-C or SIGTERM stops the sweep. The parent ends FINISHED when every child finished, FAILED
when one failed, KILLED when interrupted; the command exits non-zero unless all finished.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

import clframe
from clframe.config import ResolvedConfig, _coerce, load_yaml, resolve_config
from clframe.errors import ClframeError
from clframe.tracking import FallbackTracker, git_commit, resolve_uri

FILE_KEYS = {"name", "fail_fast", "runs", "grid", "search", "seeds"}
ENTRY_KEYS = {"strategy", "scenario", "config", "set"}


@dataclass
class Child:
    strategy: str | None = None
    scenario: str | None = None
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    seed: int | None = None  # set by seeds: / --seeds (its --set is in sets)

    def label(self) -> str:
        return " ".join([self.strategy or "", self.scenario or ""] + self.sets).strip()


@dataclass
class SweepPlan:
    children: list[Child]
    name: str | None = None
    fail_fast: bool = False
    search: dict | None = None  # a search: block (clframe.search); the one runs: entry is its base config
    seeds: list[int] | None = None  # seeds: / --seeds: every child runs once per seed


def _as_sets(value: Any, where: str) -> list[str]:
    """A ``set:`` mapping ({lr: 0.1}) or list (["lr=0.1"]) as --set strings (values as JSON, which is YAML)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{key}={json.dumps(v)}" for key, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ClframeError(f"{where}: 'set' must be a mapping like {{lr: 0.01}} or a list like ['lr=0.01']")


def _entry(raw: Any, where: str, base: Path) -> Child:
    if not isinstance(raw, dict) or not set(raw) <= ENTRY_KEYS:
        raise ClframeError(f"{where} must be a mapping with keys among {', '.join(sorted(ENTRY_KEYS))}; got {raw!r}")
    for key in ("strategy", "scenario", "config"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ClframeError(f"{where}: '{key}' must be a string; got {raw[key]!r}")
    config = raw.get("config")
    if config is not None:
        config = str(base / config) if (base / config).exists() else str(config)
    return Child(raw.get("strategy"), raw.get("scenario"), config, _as_sets(raw.get("set"), where))


def _grid(raw: Any, where: str) -> list[Child]:
    if not isinstance(raw, dict) or not raw:
        raise ClframeError(f"{where}: 'grid' must map keys to lists of values, e.g. {{lr: [0.01, 0.001]}}")
    axes = []
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ClframeError(f"{where}: grid key '{key}' has no values")
        axes.append([(key, value) for value in values])
    points = []
    for combination in itertools.product(*axes):
        child = Child()
        for key, value in combination:
            if key in ("strategy", "scenario"):
                setattr(child, key, str(value))
            else:
                child.sets.append(f"{key}={json.dumps(value)}")
        points.append(child)
    return points


def parse_seeds(value: Any, where: str) -> list[int]:
    """Seeds as a list [0, 1, 2] or a string "0,1,2": distinct integers >= 0."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    seeds = [_coerce(item.strip() if isinstance(item, str) else item, int, where) for item in items]
    if not seeds or any(seed < 0 or seed > 2**32 - 1 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ClframeError(f"{where}: give distinct seeds between 0 and 2**32-1, like 0,1,2; got {value!r}")
    return seeds


def _file_fields(data: dict, sweep_file: str) -> tuple[str | None, bool, list[int] | None]:
    """The sweep file's scalar fields, typed as config keys are (``fail_fast: no`` is false)."""
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ClframeError(f"sweep file {sweep_file}: 'name' must be a non-empty string (quote it); got {name!r}")
    fail_fast = _coerce(data.get("fail_fast", False), bool, f"fail_fast in sweep file {sweep_file}")
    seeds = parse_seeds(data["seeds"], f"sweep file {sweep_file}, seeds") if "seeds" in data else None
    return name, fail_fast, seeds


def sets_seed(sets: list[str]) -> bool:
    """Whether these --set items choose the seed (``seed=N`` or ``run.seed=N``)."""
    return any(re.match(r"\s*(run\.)?seed\s*=", item) for item in sets)


def _with_seeds(children: list[Child], seeds: list[int]) -> list[Child]:
    """Each child once per seed (seeds vary fastest, so a group's seeds run one after another)."""
    for child in children:
        if sets_seed(child.sets):
            raise ClframeError(f"the seed of '{child.label()}' is set twice: by seeds (--seeds) and by its set:/grid:; "
                               f"keep one")
    return [dataclasses.replace(child, sets=child.sets + [f"seed={seed}"], seed=seed)
            for child in children for seed in seeds]


def plan_sweep(strategies: list[str], sweep_file: str | None = None, seeds: list[int] | None = None) -> SweepPlan:
    """Expand the command line's strategies, the sweep file and the seeds (``seeds`` from --seeds
    wins over the file's) into the list of children."""
    plan = SweepPlan([Child()])
    if sweep_file:
        data = load_yaml(sweep_file, "sweep file")
        unknown = set(data) - FILE_KEYS
        if unknown or not ({"runs", "grid", "search"} & set(data)):
            raise ClframeError(f"sweep file {sweep_file}: keys are {', '.join(sorted(FILE_KEYS))} (runs:, grid: or "
                               f"search: required){'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
        name, file_fail_fast, file_seeds = _file_fields(data, sweep_file)
        seeds = seeds or file_seeds
        base = Path(sweep_file).parent
        runs = data.get("runs", [{}])
        if not isinstance(runs, list) or not runs:
            raise ClframeError(f"sweep file {sweep_file}: 'runs' must be a non-empty list")
        entries = [_entry(raw, f"sweep file {sweep_file}, runs[{k}]", base) for k, raw in enumerate(runs)]
        points = _grid(data["grid"], f"sweep file {sweep_file}") if "grid" in data else [Child()]
        plan = SweepPlan([Child(point.strategy or entry.strategy, point.scenario or entry.scenario, entry.config,
                                entry.sets + point.sets) for entry in entries for point in points],
                         name, file_fail_fast, data.get("search"))
    plan.children = [dataclasses.replace(child, strategy=child.strategy or strategy)
                     for child in plan.children
                     for strategy in ([child.strategy] if child.strategy else strategies)]
    if seeds:
        plan.children, plan.seeds = _with_seeds(plan.children, seeds), list(seeds)
    return plan


def _resolve(options: dict, config_file: str | None, sets: list[str]) -> ResolvedConfig:
    from clframe.registry import SCENARIOS, STRATEGIES

    return resolve_config(options, config_file, sets, SCENARIOS.get(options["scenario"]).config_cls,
                          STRATEGIES.get(options["strategy"]).config_cls)


def _interrupted(exc: BaseException) -> bool:
    from clframe.runner import RunInterrupted

    return isinstance(exc, (KeyboardInterrupt, RunInterrupted)) or isinstance(
        exc.__context__, (KeyboardInterrupt, RunInterrupted))


def _record_failure(parent: FallbackTracker, config: ResolvedConfig, name: str, message: str) -> None:
    """Tag the child's FAILED run with the error; create one if the child failed before its run opened."""
    client = parent.client
    experiment = client.get_experiment_by_name(config.run.experiment)
    found = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.run_name = '{name}'"))
    if found:
        client.set_tag(found[0].info.run_id, "clframe.error", message[:5000])
        return
    run = config.run
    tracker = FallbackTracker(parent.uri, run.experiment)
    tracker.start(name, {"strategy": run.strategy, "scenario": run.scenario, "model": run.model,
                         "clframe_version": clframe.__version__, "clframe.error": message[:5000]},
                  config.flatten(), parent_run_id=parent.run_id)
    tracker.end("FAILED")


def _log_aggregates(parent: FallbackTracker, echo: Callable[[str], None]) -> None:
    """The parent logs its finished children's per-task mean and std (see clframe.runsets)."""
    from clframe.runsets import log_group_curves

    try:
        experiment = parent.client.get_experiment_by_name(parent.experiment)
        log_group_curves(parent, experiment.experiment_id)
    except Exception as exc:  # noqa: BLE001 - the children's results are safe; only the summary is missing
        echo(f"warning: the sweep's parent run could not log its aggregated metrics ({type(exc).__name__}: {exc})")


def resolve_children(options: dict, config_file: str | None, sets: list[str], plan: SweepPlan) -> list[ResolvedConfig]:
    """Every child's config (the command line's options and --set, then the child's own), before any work."""
    configs = []
    for child in plan.children:
        child_options = dict(options, strategy=child.strategy, scenario=child.scenario or options["scenario"],
                             run_name=None)
        configs.append(_resolve(child_options, child.config or config_file, list(sets) + child.sets))
    return configs


def run_sweep(options: dict, config_file: str | None, sets: list[str], plan: SweepPlan, fail_fast: bool = False,
              echo: Callable[[str], None] = print, execution: Any = None, resume_parent: str | None = None) -> str:
    """Run the plan's children in turn under one parent run; returns the parent's run id.

    ``execution`` (clframe.parallel_sweep) runs the children instead, several at once on Ray;
    ``resume_parent`` reopens that parent run, whose execution then runs only what did not finish."""
    from clframe.compare import compare_runs
    from clframe.runner import RunInterrupted, RunKilled, _raise_interrupt, format_result, run_experiment

    fail_fast = fail_fast or plan.fail_fast
    configs = resolve_children(options, config_file, sets, plan)
    first = configs[0].run
    if any((c.run.tracking_uri, c.run.experiment) != (first.tracking_uri, first.experiment) for c in configs):
        raise ClframeError("every run of a sweep must log to the same --tracking-uri and --experiment")
    parent = FallbackTracker(resolve_uri(first.tracking_uri), first.experiment)
    name = options.get("run_name") or plan.name or f"sweep-{time.strftime('%m%d-%H%M%S')}"
    tags = {"clframe.sweep": "parent", "clframe_version": clframe.__version__, "sweep_size": str(len(configs)),
            "strategy": ",".join(dict.fromkeys(c.run.strategy for c in configs)),
            "scenario": ",".join(dict.fromkeys(c.run.scenario for c in configs))}
    if plan.seeds:
        tags["clframe.seeds"] = ",".join(map(str, plan.seeds))
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    parent.start(name, tags, {"sweep_size": len(configs), "fail_fast": fail_fast}, run_id=resume_parent)
    parent.log_text(yaml.safe_dump({"children": [dataclasses.asdict(c) for c in plan.children]}, sort_keys=False),
                    "sweep.yaml")
    echo(f"sweep '{name}': {len(configs)} runs under parent run {parent.run_id}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    failures: list[str] = []
    used_names: set[str] = set()
    status, started = "FINISHED", 0
    try:
        if execution is not None:  # Ray runs the children, several at once (clframe.parallel_sweep)
            started = execution.run_children(parent, plan.children, configs, fail_fast, failures, echo)
        for k, (child, config) in enumerate(zip(plan.children, configs) if execution is None else (), start=1):
            started = k
            run_name = base_name = f"{config.run.strategy}-{config.run.scenario}-{time.strftime('%m%d-%H%M%S')}"
            while run_name in used_names:  # unique within the sweep, so a failure can be found by name
                run_name = f"{base_name}-{len(used_names)}"
            used_names.add(run_name)
            parent.follow_server()  # a server gone between two runs: the rest of the sweep goes local
            config.run = dataclasses.replace(config.run, run_name=run_name,
                                             tracking_uri=parent.uri if parent.fell_back else config.run.tracking_uri)
            echo(f"\n[{k}/{len(configs)}] {run_name}: {child.label()}")
            try:
                result = run_experiment(config, parent_run_id=parent.run_id, echo=echo)
                echo(format_result(result, config, resolve_uri(config.run.tracking_uri)))
            except BaseException as exc:  # noqa: BLE001 - a child's failure is recorded, then we decide
                if _interrupted(exc):
                    status = "KILLED"
                    stop = ClframeError(f"sweep '{name}' interrupted during run {k}/{len(configs)} ({run_name}); "
                                        f"finished runs are kept under parent run {parent.run_id}")
                    stop.exit_code = getattr(exc, "exit_code", 130)  # 130 for Ctrl-C, 143 for SIGTERM
                    raise stop from None
                message = str(exc) if isinstance(exc, ClframeError) else f"{type(exc).__name__}: {exc}"
                echo(f"run {k}/{len(configs)} ({run_name}) FAILED: {message}")
                failures.append(f"{run_name}: {message}")
                try:
                    _record_failure(parent, config, run_name, message)
                except Exception as record_exc:  # noqa: BLE001 - the sweep matters more than the tag
                    echo(f"warning: could not record the failure in MLflow ({record_exc})")
                if fail_fast:
                    break
    except (KeyboardInterrupt, RunInterrupted) as exc:
        status = "KILLED"
        raise RunKilled(f"sweep '{name}' interrupted; finished runs are kept under parent run {parent.run_id}",
                        str(exc) if isinstance(exc, RunInterrupted) else "SIGINT") from None  # exits 130 / 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        status = "FAILED" if failures and status == "FINISHED" else status
        _log_aggregates(parent, echo)
        parent.end(status)
    echo(f"\nsweep '{name}' ({parent.run_id} at {parent.uri}):")
    try:
        echo(compare_runs(parent.uri, first.experiment, [parent.run_id], group_by=["strategy"] if plan.seeds else None))
    except ClframeError as exc:  # e.g. no child has results yet
        echo(str(exc))
    if failures:
        done = f"{len(failures)} of {len(configs)} runs failed"
        if started < len(configs):
            done += f" (--fail-fast: {len(configs) - started} not started)"
        raise ClframeError(f"sweep '{name}': {done}: " + " | ".join(failures))
    return parent.run_id
