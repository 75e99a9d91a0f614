"""Sweeps on Ray (clframe.parallel_sweep) and hyper-parameter search (clframe.search).

One local Ray instance (2 CPUs, no dashboard) serves every test; the runs are tiny 2-task
split_digits runs. One ``mlflow server`` started here serves the tests that log over http; the
first test logs to a sqlite file, for which the sweep starts (and stops) its own server.
"""
from __future__ import annotations

import logging
import shlex
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

from mlflow.tracking import MlflowClient  # noqa: E402

from clframe import checkpoint  # noqa: E402
from clframe.cli import cli  # noqa: E402
from clframe.mlflow_server import healthy, local_mlflow_server  # noqa: E402
from conftest import TINY_SETS  # noqa: E402

TINY = [*TINY_SETS, "--set", "split_digits.n_tasks=2", "--set", "batch_size=64"]

# A strategy that fails on purpose: seed 1 raises in its first task; seed 2 kills its process
# (a dead worker); any seed runs normally once "repaired" exists in the folder.
FAULTY = '''
import os
from pathlib import Path
from clframe.strategies.linear import Linear

class Faulty(Linear):
    def before_task(self, experience):
        if not Path("repaired").exists() and self.run_config.seed == 1:
            raise RuntimeError("faulty strategy raised")
        if not Path("repaired").exists() and self.run_config.seed == 2:
            os._exit(3)
        super().before_task(experience)
'''


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with local_mlflow_server(f"sqlite:///{root}/server.db", artifact_root=root / "artifacts") as running:
        yield running.url


def clframe_run(args: list[str]):
    return CliRunner().invoke(cli, ["run", *args])


def children(uri: str, parent_id: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clframe")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_of(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clframe")
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")[0]


def final(run, key: str = "acc_avg") -> float:
    return run.data.metrics[key]


def test_parallel_sweep_gives_the_sequential_results_under_one_parent(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("sweep.yaml").write_text("runs: [{strategy: linear}]\ngrid: {lr: [0.01, 0.001], seed: [0, 1]}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--sweep", "sweep.yaml", *TINY, "--tracking-uri", uri]
    sequential = clframe_run([*common, "--run-name", "sequential"])
    assert sequential.exit_code == 0, sequential.output
    parallel = clframe_run([*common, "--run-name", "parallel", "--parallel", "2"])
    assert parallel.exit_code == 0, parallel.output

    # The sqlite store got a local mlflow server for the sweep's duration, stopped afterwards.
    line = next(text for text in parallel.output.splitlines() if "local MLflow server at" in text)
    server_url = line.split(" at ", 1)[1].split()[0]
    assert not healthy(server_url)
    # ... and reached the runs apart from their config: config and checkpoint name the sqlite store, so
    # `clframe run --resume CHILD` by hand, after the sweep, finds it (not the server, gone by then).
    for run in children(uri, parent_of(uri, "parallel").info.run_id):
        assert run.data.params["run.tracking_uri"] == uri
        saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / ".clframe/checkpoints", run.info.run_id))
        assert (saved["config"]["run.tracking_uri"], saved["tracking_uri"]) == (uri, uri)

    def by_setting(name):
        runs = children(uri, parent_of(uri, name).info.run_id)
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        return {(r.data.params["run.lr"], r.data.params["run.seed"]): (final(r), final(r, "forgetting")) for r in runs}

    assert by_setting("parallel") == by_setting("sequential")
    assert parent_of(uri, "parallel").info.status == "FINISHED"
    assert "4 runs under parent run" in parallel.output and "[4/4]" in parallel.output


def test_failed_and_dead_runs_are_failed_and_resume_reruns_only_those(ray_local, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as the console script puts its folder first
    Path("faulty.py").write_text(FAULTY)
    Path("sweep.yaml").write_text("runs: [{strategy: 'faulty:Faulty'}]\ngrid: {seed: [0, 1, 2, 3]}\n")
    common = ["--sweep", "sweep.yaml", *TINY, "--tracking-uri", server, "--run-name", "faulty-sweep",
              "--parallel", "2", "--set", f"checkpoint_dir={tmp_path}/ckpt"]
    result = clframe_run(common)
    assert result.exit_code == 1 and "2 of 4 runs failed" in str(result.exception), result.output
    parent = parent_of(server, "faulty-sweep")
    assert parent.info.status == "FAILED"
    runs = {r.data.params["run.seed"]: r for r in children(server, parent.info.run_id)}
    assert {seed: r.info.status for seed, r in runs.items()} == {"0": "FINISHED", "1": "FAILED", "2": "FAILED",
                                                                 "3": "FINISHED"}, result.output
    assert "faulty strategy raised" in runs["1"].data.tags["clframe.error"]
    died = runs["2"].data.tags["clframe.error"]  # Ray's words, e.g. "WorkerCrashedError: The worker died ..."
    assert "died" in died.lower() or "crash" in died.lower(), died

    Path("repaired").touch()
    resumed = clframe_run([*common, "--resume", parent.info.run_id])
    assert resumed.exit_code == 0, resumed.output
    assert "2 of 4 runs already finished" in resumed.output and "[1/4]" not in resumed.output, resumed.output
    assert parent_of(server, "faulty-sweep").info.status == "FINISHED"
    statuses = sorted((r.data.params["run.seed"], r.info.status) for r in children(server, parent.info.run_id))
    assert statuses == [("0", "FINISHED"), ("1", "FAILED"), ("1", "FINISHED"), ("2", "FAILED"), ("2", "FINISHED"),
                        ("3", "FINISHED")]


def test_optuna_search_finds_a_best_config_that_reproduces(ray_local, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("search.yaml").write_text(
        "name: lr-search\nruns: [{strategy: linear}]\nsearch:\n  space: {lr: {loguniform: [1.0e-4, 0.1]}}\n"
        "  trials: 6\n  algorithm: optuna\n  seed: 3\n")
    result = clframe_run(["--sweep", "search.yaml", *TINY, "--tracking-uri", server, "--parallel", "2"])
    assert result.exit_code == 0, result.output
    parent = parent_of(server, "lr-search")
    runs = children(server, parent.info.run_id)
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    best = max(runs, key=final)
    assert parent.data.tags["clframe.best_run"] == best.info.run_id
    client = MlflowClient(server)
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    command = shlex.split(result.output.split("best config (also in the parent run as best_config.yaml):\n", 1)[1]
                          .splitlines()[0])
    assert command[:2] == ["clframe", "run"]
    rerun = CliRunner().invoke(cli, [*command[1:], "--run-name", "best-again"])
    assert rerun.exit_code == 0, rerun.output
    assert final(parent_of(server, "best-again")) == final(best)


def test_asha_stops_a_hopeless_trial_after_its_first_task(ray_local, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("search.yaml").write_text(
        "name: asha\nruns: [{strategy: linear}]\nsearch:\n  space: {lr: {choice: [0.01, 1.0e-7]}}\n"
        "  trials: 3\n  algorithm: random\n  scheduler: asha\n  seed: 1\n")  # lr: 0.01, then 1e-7 twice
    result = clframe_run(["--sweep", "search.yaml", *TINY, "--tracking-uri", server, "--parallel", "1"])
    assert result.exit_code == 0, result.output
    runs = children(server, parent_of(server, "asha").info.run_id)
    stopped = [r for r in runs if r.info.status == "KILLED"]
    assert stopped and all(r.data.params["run.lr"] == "1e-07" for r in stopped)
    assert all(r.data.tags["clframe.stopped_early"] == "by asha after task 1" for r in stopped)
    client = MlflowClient(server)
    assert all([m.step for m in client.get_metric_history(r.info.run_id, "acc_avg")] == [0] for r in stopped)
    assert any(r.info.status == "FINISHED" and r.data.params["run.lr"] == "0.01" for r in runs)


def test_parallel_without_a_sweep_or_with_bad_resources_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = clframe_run([*TINY, "--parallel", "2"])
    assert result.exit_code == 1 and "give --sweep FILE" in str(result.exception)
    Path("search.yaml").write_text("runs: [{strategy: linear}]\nsearch:\n  space: {lr: {loguniform: [0, 1]}}\n")
    result = clframe_run(["--sweep", "search.yaml", *TINY])
    assert result.exit_code == 1 and "loguniform wants low < high and low > 0" in str(result.exception)


# ----- without Ray: resume matching, the sweep's server reaching the runs, interrupted exit codes -----
def resolved(strategy: str, *sets: str):
    from clframe.config import resolve_config
    from clframe.registry import SCENARIOS, STRATEGIES

    return resolve_config({"scenario": "split_digits", "strategy": strategy}, None, list(sets),
                          SCENARIOS.get("split_digits").config_cls, STRATEGIES.get(strategy).config_cls)


def logged(config, status: str, run_id: str):
    """A run record as MLflow returns it: the config's params as the tracker logs them, and more."""
    params = {k: str(v)[:6000] for k, v in config.flatten().items()}
    params.update(n_trainable_params="1234", **{"stream.fingerprint": "abc"})
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id, run_name=f"name-{run_id}"),
                           data=SimpleNamespace(params=params))


def test_resume_matches_each_child_on_its_own_config_sections():
    """A sweep over strategies with other config sections (er: buffer_size..., lwf: alpha...): each
    child is matched on its own keys, not on the first child's."""
    from clframe.parallel_sweep import Pending, unfinished

    configs = [resolved("er", "seed=0"), resolved("lwf", "seed=0"), resolved("lwf", "seed=1"), resolved("er", "seed=1")]
    runs = [logged(configs[1], "FINISHED", "lwf0"), logged(configs[3], "KILLED", "er1"),
            logged(configs[2], "KILLED", "lwf1"), logged(resolved("lwf", "seed=2"), "FINISHED", "other")]
    todo = [Pending(k, config) for k, config in enumerate(configs, start=1)]
    remaining = unfinished(todo, runs, lambda item, run_id: run_id != "lwf1")  # lwf1 left no checkpoint
    assert [(p.index, p.resume) for p in remaining] == [(1, None), (3, None), (4, "er1")]
    assert remaining[2].config.run.run_name == "name-er1"  # continues under its own name


def test_a_sweeps_server_reaches_the_run_but_not_its_config(tmp_path, monkeypatch):
    from clframe.tracking import check_store, endpoint, logging_through

    monkeypatch.chdir(tmp_path)
    store, server = "sqlite:///mlflow.db", "http://127.0.0.1:9"
    with logging_through(store, server):
        assert endpoint(store) == endpoint(f"sqlite:///{tmp_path}/mlflow.db") == server
        assert endpoint("sqlite:///other.db") == "sqlite:///other.db"
        check_store(store)  # the server holds the file: it is checked as the server
    assert endpoint(store) == store
    with logging_through(store, None):
        assert endpoint(store) == store


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_sweep_exits_128_plus_the_signal(signum, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM outside a child run (as while Ray runs them): 130 / 143, the parent KILLED."""
    from mlflow.tracking import MlflowClient

    from clframe.errors import ClframeError
    from clframe.runner import RunInterrupted
    from clframe.sweep import plan_sweep, run_sweep

    class Interrupted:
        def run_children(self, *args):
            raise KeyboardInterrupt if signum == signal.SIGINT else RunInterrupted("SIGTERM")

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    options = {"scenario": "split_digits", "strategy": "linear", "tracking_uri": uri, "run_name": "cut"}
    with pytest.raises(ClframeError, match="sweep 'cut' interrupted") as stopped:
        run_sweep(options, None, [], plan_sweep(["linear"]), execution=Interrupted(), echo=lambda text: None)
    assert stopped.value.exit_code == 128 + signum
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])
    assert parent.info.status == "KILLED"


def test_a_dead_workers_run_is_failed_even_if_a_neighbour_closed_it_first(tmp_path):
    """A worker that dies leaves its run RUNNING; the next run started in the same checkpoint folder
    closes it KILLED (it only sees a dead process). The driver, which knows the worker failed, marks it
    FAILED with Ray's reason either way; a run that stopped on request stays KILLED."""
    from clframe.parallel_sweep import Pending, _Flight

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("clframe")
    parent = client.create_run(experiment, run_name="sweep")
    flight = _Flight(None, None, parent.info, uri, None, 2, False, [], lambda line: None, 1, 1)
    statuses = {}
    for name, closed_by, status in (("died", "run abc: the process driving it had died", "FAILED"),
                                    ("stopped", None, "KILLED")):
        tags = {"mlflow.parentRunId": parent.info.run_id, **({"clframe.closed_by": closed_by} if closed_by else {})}
        child = client.create_run(experiment, run_name=name, tags=tags)
        client.set_terminated(child.info.run_id, status="KILLED")
        flight.mark(Pending(1, resolved("linear", f"run_name={name}")), status, "WorkerCrashedError: died")
        statuses[name] = client.get_run(child.info.run_id).info.status
    assert statuses == {"died": "FAILED", "stopped": "KILLED"}
