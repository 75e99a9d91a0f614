"""Hyper-parameter search: a ``search:`` block in a sweep file, run by Ray Tune under the sweep's parent run.

    name: linear-lr
    runs: [{strategy: linear, set: {epochs: 2}}]   # the base config: one entry (optional)
    search:
      space:                                       # --set keys -> distributions
        lr: {loguniform: [1.0e-4, 1.0]}
        weight_decay: {uniform: [0.0, 0.1]}
        batch_size: {int: [16, 128]}               # both ends included
        optimizer: {choice: [adam, sgd]}
      metric: acc_avg                              # a task metric: acc_avg, forgetting, bwt, ...
      mode: max
      trials: 20
      algorithm: optuna                            # TPE (Ray Tune's OptunaSearch), or random
      scheduler: asha                              # or none
      seed: 0

Every trial is an ordinary child run (clframe.parallel_sweep runs it: same resources, tracking
and folder rules). It reports its task metrics at every task boundary (the runner's ``task_end``),
one Tune iteration per task, so ASHA compares trials after the same number of tasks and stops
those that trail: a continual-learning search pays for the first tasks of a hopeless setting, not
for all of them. A stopped trial's run is KILLED with the tag ``clframe.stopped_early``. The best
trial is chosen among the trials that ran every task, by the metric after the last task; it is
printed as a ``clframe run`` command line and saved as ``best_config.yaml`` in the parent run.
``--resume PARENT`` counts the trials that ran to their end (or were stopped early) as done, gives
the finished ones to Optuna as known points, and runs the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from clframe.config import ResolvedConfig, build_section, option
from clframe.errors import ClframeError
from clframe.parallel_sweep import (RayOptions, enter_driver_folder, failure_message, ray_session, run_child,
                                    server_for_runs, shared_tracking)
from clframe.tracking import resolve_uri

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
OPTIONS_NOT_IN_COMMAND = {"scenario", "strategy", "run_name", "progress"}


@dataclass
class SearchConfig:
    """The ``search:`` block of a sweep file, besides ``space``."""

    metric: str = option("acc_avg", "the task metric to optimise (acc_avg, forgetting, bwt, ...)")
    mode: str = option("max", "maximise or minimise the metric", choices=("max", "min"))
    trials: int = option(10, "how many configurations to try", min=1)
    algorithm: str = option("optuna", "optuna (TPE) or random sampling", choices=("optuna", "random"))
    scheduler: str = option("none", "asha stops trials that trail at a task boundary", choices=("asha", "none"))
    grace_tasks: int = option(1, "ASHA: tasks every trial runs before it can be stopped", min=1)
    reduction_factor: int = option(2, "ASHA: the share 1/reduction_factor of trials kept at each rung", min=2)
    seed: int = option(0, "seed of the sampler")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClframeError(f"{where}: wants numbers, got {value!r}")
    return value


def parse_space(raw: Any, where: str) -> dict[str, tuple[str, list]]:
    """``{key: {kind: args}}`` -> ``{key: (kind, args)}``, each checked."""
    example = "space: {lr: {loguniform: [1.0e-4, 0.1]}, optimizer: {choice: [adam, sgd]}}"
    if not isinstance(raw, dict) or not raw:
        raise ClframeError(f"{where}: 'space' must map --set keys to distributions, e.g. {example}")
    space = {}
    for key, spec in raw.items():
        at = f"{where}, space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ClframeError(f"{at}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {example}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ClframeError(f"{at}: choice wants a non-empty list of values")
        else:
            if not isinstance(args, list) or len(args) != 2:
                raise ClframeError(f"{at}: {kind} wants [low, high]")
            low, high = (_number(v, at) for v in args)
            if kind == "int" and not all(float(v).is_integer() for v in args):
                raise ClframeError(f"{at}: int wants whole numbers [low, high]")
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ClframeError(f"{at}: {kind} wants low < high" + (" and low > 0" if kind == "loguniform" else ""))
        space[str(key)] = (kind, list(args))
    return space


def tune_space(space: dict[str, tuple[str, list]]) -> dict:
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "int": lambda a: tune.randint(int(a[0]), int(a[1]) + 1), "choice": tune.choice}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def as_sets(params: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value.item() if hasattr(value, 'item') else value)}" for key, value in params.items()]


def apply_params(base: ResolvedConfig, params: dict[str, Any]) -> ResolvedConfig:
    """The base config with a trial's values on top, as if given with --set."""
    from clframe.config import resolve_config
    from clframe.registry import SCENARIOS, STRATEGIES

    run = base.run
    return resolve_config({"scenario": run.scenario, "strategy": run.strategy}, None, as_sets(params),
                          SCENARIOS.get(run.scenario).config_cls, STRATEGIES.get(run.strategy).config_cls,
                          base=yaml.safe_load(base.to_yaml()))


def search_trial(params: dict, base: ResolvedConfig, parent_run_id: str, server: str | None, prefix: str,
                 folder: str, threads: int) -> None:
    """One trial in a Ray Tune actor: a child run that reports its task metrics at every task boundary
    (logging through ``server`` if given: see ``parallel_sweep.server_for_runs``)."""
    from ray import tune

    from clframe.runner import RunInterrupted, RunKilled

    enter_driver_folder(folder)  # before the config resolves: a module:Class strategy imports from there
    config = apply_params(base, params)
    name = f"{prefix}-{tune.get_context().get_trial_id()}"
    config.run = dataclasses.replace(config.run, run_name=name, progress=False)

    def report(i: int, values: dict[str, float]) -> None:
        try:
            tune.report(dict(values, tasks_done=i + 1))
        except SystemExit:  # Tune stops this trial (its scheduler decided so): the run ends KILLED
            raise RunInterrupted("stopped by the search's scheduler") from None

    try:
        run_child(config, parent_run_id, None, folder, threads, server, task_end=report)
    except RunKilled:
        raise SystemExit(0) from None  # how a Tune function ends when told to stop


class RaySearch:
    """Runs a sweep file's search on Ray Tune (``run_sweep(..., execution=RaySearch(...))``)."""

    def __init__(self, search: SearchConfig, space: dict, ray_options: RayOptions, resume_parent: str | None,
                 base_command: list[str]) -> None:
        self.search, self.space, self.options = search, space, ray_options
        self.resume_parent, self.base_command = resume_parent, base_command

    @classmethod
    def from_plan(cls, plan, ray_options: RayOptions, resume: str | None, options: dict, config_file: str | None,
                  sets: list[str]) -> "RaySearch":
        where = "sweep file, search"
        raw = dict(plan.search) if isinstance(plan.search, dict) else None
        if raw is None:
            raise ClframeError(f"{where}: must be a mapping with space: and optional metric, mode, trials, algorithm, "
                               f"scheduler, seed")
        space = parse_space(raw.pop("space", None), where)
        search = build_section(SearchConfig, raw, "search")
        if len(plan.children) != 1:
            raise ClframeError(f"{where}: searches one base config, but the file and command line give "
                               f"{len(plan.children)} (one runs: entry, no grid:, one --strategy)")
        child = plan.children[0]
        plan.children = [child] * search.trials  # trial slots: the parent's sweep_size is the trial count
        command = ["clframe", "run", "--scenario", child.scenario or options["scenario"], "--strategy", child.strategy]
        if child.config or config_file:
            command += ["--config", child.config or config_file]
        for key, value in options.items():
            if value is not None and key not in OPTIONS_NOT_IN_COMMAND:
                command += ["--set", f"{key}={json.dumps(value)}"]
        for item in [*sets, *child.sets]:
            command += ["--set", item]
        return cls(search, space, ray_options, resume, command)

    def check(self, base: ResolvedConfig) -> None:
        """Every key of the space must be a config key: try the lowest value of each before any trial."""
        from clframe.metrics import summary
        import numpy as np

        probe = {k: (args[0] if kind != "int" else int(args[0])) for k, (kind, args) in self.space.items()}
        apply_params(base, probe)
        names = set(summary(np.full((1, 1), 50.0), 0))
        if self.search.metric not in names and not self.search.metric.startswith(("acc", "forgetting", "bwt")):
            raise ClframeError(f"search: metric '{self.search.metric}' is not a task metric; use one of "
                               f"{', '.join(sorted(names))}")

    def earlier_trials(self, parent, experiment: str) -> tuple[list[dict], list[float], int]:
        """Resuming: the finished trials' values and metric (for Optuna), and how many trials are done."""
        from clframe.parallel_sweep import finished_runs

        if not self.resume_parent:
            return [], [], 0
        exp = parent.client.get_experiment_by_name(experiment)
        points, rewards, done = [], [], 0
        for run in finished_runs(parent.client, parent.run_id, exp.experiment_id):
            stopped = run.info.status == "KILLED" and "clframe.stopped_early" in run.data.tags
            if run.info.status == "FINISHED" and self.search.metric in run.data.metrics:
                params = {k: run.data.params.get(k if "." in k else f"run.{k}") for k in self.space}
                if None not in params.values():
                    points.append({k: _typed(v, self.space[k]) for k, v in params.items()})
                    rewards.append(run.data.metrics[self.search.metric])
                done += 1
            elif stopped:
                done += 1
        return points, rewards, done

    def run_children(self, parent, children, configs: list[ResolvedConfig], fail_fast: bool, failures: list[str],
                     echo: Callable[[str], None]) -> int:
        from clframe.runner import RunInterrupted

        base, search = configs[0], self.search
        self.check(base)
        points, rewards, done = self.earlier_trials(parent, base.run.experiment)
        self.done = done
        remaining = search.trials - done
        if self.resume_parent:
            echo(f"resuming search {parent.run_id}: {done} of {search.trials} trials done, {remaining} to run")
        if remaining <= 0:
            return len(configs)
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches the sweep, which marks the runs
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        from clframe.parallel_sweep import alive_nodes, check_resources, device_for, gpus_for_each_run

        with ray_session(self.options) as ray:
            gpus = gpus_for_each_run(ray, self.options, base.run.device)
            check_resources(ray, self.options.cpus_per_run, gpus, base.run.device)
            with shared_tracking(resolve_uri(base.run.tracking_uri), alive_nodes(ray), echo) as uri:
                prefix = f"{base.run.strategy}-{base.run.scenario}-{time.strftime('%m%d-%H%M%S')}"
                base.run = dataclasses.replace(base.run, device=device_for(base.run.device, gpus))
                try:
                    results = self._fit(ray, base, parent.run_id, uri, prefix, gpus, remaining, points, rewards,
                                        fail_fast, echo)
                except (KeyboardInterrupt, RunInterrupted):
                    stop_running(uri, parent.run_id, base.run.experiment, "interrupted")
                    echo(f"the search's unfinished trials are KILLED; run the rest with the same command and "
                         f"--resume {parent.run_id}")
                    raise
                self._close(results, parent, uri, prefix, base, failures, echo)
                stop_running(uri, parent.run_id, base.run.experiment, "stopped when the search ended")
        return len(configs)

    def _fit(self, ray, base, parent_run_id, uri, prefix, gpus, trials, points, rewards, fail_fast, echo):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        search = self.search
        seed = search.seed + self.done  # resumed: new draws, not the first ones again
        if search.algorithm == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)

            algorithm = OptunaSearch(seed=seed, points_to_evaluate=points or None,
                                     evaluated_rewards=rewards or None)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            algorithm = BasicVariantGenerator(random_state=seed, max_concurrent=self.options.parallel or 0)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=search.grace_tasks,
                                   reduction_factor=search.reduction_factor) if search.scheduler == "asha" else None)
        threads = max(1, int(self.options.cpus_per_run))
        trainable = tune.with_resources(
            tune.with_parameters(search_trial, base=base, parent_run_id=parent_run_id, prefix=prefix,
                                 server=server_for_runs(resolve_uri(base.run.tracking_uri), uri),
                                 folder=os.getcwd(), threads=threads),
            {"cpu": self.options.cpus_per_run, "gpu": gpus})
        storage = tempfile.mkdtemp(prefix="clframe-tune-")
        tuner = tune.Tuner(
            trainable, param_space=tune_space(self.space),
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=trials,
                                        search_alg=algorithm, scheduler=scheduler,
                                        max_concurrent_trials=self.options.parallel if search.algorithm == "optuna"
                                        else None, reuse_actors=True),
            run_config=tune.RunConfig(name=prefix, storage_path=storage, verbose=0,
                                      callbacks=[_echo_callback(echo, prefix, search.metric)],
                                      failure_config=tune.FailureConfig(fail_fast=fail_fast)))
        try:
            return tuner.fit()
        finally:
            with contextlib.suppress(OSError):
                import shutil

                shutil.rmtree(storage)

    def _close(self, results, parent, uri, prefix, base, failures, echo) -> None:
        """Mark each trial's run as Tune left it, then report the best one."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(base.run.experiment)
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id") or _trial_id(result.path)
            name = f"{prefix}-{trial_id}"
            runs = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
                f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.run_name = '{name}'"))
            run = runs[0] if runs else None
            if result.error is not None:
                message = failure_message(result.error)
                failures.append(f"{name}: {message}")
                if run is not None:
                    client.set_tag(run.info.run_id, "clframe.error", message[:5000])
                    if run.info.status == "RUNNING":
                        client.set_terminated(run.info.run_id, status="FAILED")
                continue
            if run is not None and run.info.status in ("RUNNING", "KILLED"):  # stopped by the scheduler
                tasks = (result.metrics or {}).get("tasks_done", "?")
                client.set_tag(run.info.run_id, "clframe.stopped_early", f"by {self.search.scheduler} after task {tasks}")
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, status="KILLED")
        finished = [run for run in client.search_runs([experiment.experiment_id], max_results=5000, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'FINISHED'"))
            if self.search.metric in run.data.metrics]  # this search's trials and, resumed, the earlier ones
        if not finished:
            echo("search: no trial ran to its end, so there is no best configuration")
            return
        sign = 1 if self.search.mode == "max" else -1
        best = max(finished, key=lambda run: sign * run.data.metrics[self.search.metric])
        value, run_id = best.data.metrics[self.search.metric], best.info.run_id
        params = {key: _typed(best.data.params[key if "." in key else f"run.{key}"], spec)
                  for key, spec in self.space.items()}
        command = shlex.join(self.base_command + [a for item in as_sets(params) for a in ("--set", item)])
        config = apply_params(base, params)
        config.run = dataclasses.replace(config.run, run_name=None, tracking_uri=base.run.tracking_uri)
        parent.log_text(config.to_yaml(), "best_config.yaml")
        parent.set_tags({"clframe.best_run": run_id, f"clframe.best_{self.search.metric}": f"{value:.4f}"})
        echo(f"\nbest trial: run {run_id}, {self.search.metric} {value:.2f} with "
             f"{', '.join(f'{k}={v}' for k, v in as_flat(params).items())}")
        echo(f"best config (also in the parent run as best_config.yaml):\n  {command}")


def stop_running(uri: str, parent_run_id: str, experiment: str, why: str) -> None:
    """Mark KILLED the trials whose actor Tune stopped before their run could close itself."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    for run in client.search_runs([found.experiment_id], max_results=5000, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")) if found else []:
        client.set_tag(run.info.run_id, "clframe.stopped", why)
        client.set_terminated(run.info.run_id, status="KILLED")


def as_flat(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _typed(text: str, spec: tuple[str, list]) -> Any:
    """A run's param (a string) back as the space's value."""
    kind, args = spec
    if kind == "int":
        return int(float(text))
    if kind in ("uniform", "loguniform"):
        return float(text)
    return next((a for a in args if str(a) == text), text)


def _trial_id(path: str | None) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})", os.path.basename(path or ""))
    return match.group(1) if match else "unknown"


def _echo_callback(echo: Callable[[str], None], prefix: str, metric: str):
    """One line per trial as it ends (Tune's own progress table is off)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            value = last.get(metric)
            echo(f"trial {prefix}-{trial.trial_id} ended after task {last.get('tasks_done', 0)}"
                 + (f": {metric} {value:.2f}" if value is not None else ""))

        def on_trial_error(self, iteration, trials, trial, **info):
            echo(f"trial {prefix}-{trial.trial_id} FAILED")

    return TrialLines()
