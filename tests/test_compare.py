"""clframe compare, sweeps, and runs against a real ``mlflow server`` (including one that dies mid-run)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from clframe import engine as engine_module
from clframe.cli import cli
from clframe.compare import compare_runs
from clframe.errors import ClframeError
from clframe.sweep import plan_sweep
from conftest import TINY_SETS
from clframe.strategies.linear import Linear

TWO_TASKS = [*TINY_SETS, "--set", "split_digits.n_tasks=2"]


class ExplodingLinear(Linear):
    """A linear probe that breaks when its second task starts (after task 0 was logged)."""

    def before_task(self, experience):
        if experience.task_id == 1:
            raise RuntimeError("boom in task 1")
        super().before_task(experience)


# ----- a real MLflow server -----
class MlflowServer:
    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
                 "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=1).read() == b"OK":
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in 90 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server and its worker processes (they share its process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # uvicorn's worker may outlive the parent by a moment
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


# ----- formatting and sorting, on runs with known metrics -----
def log_run(client, experiment_id, name, tags, history, status="FINISHED", params=None, wall=None):
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    metrics = [Metric(key, value, 1000 + step, step) for key, values in history.items()
               for step, value in enumerate(values)]
    if wall is not None:
        metrics.append(Metric("wall_time_s", wall, 2000, len(history["acc_avg"]) - 1))
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('synthetic')}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("clframe")
    parent = client.create_run(exp, run_name="sweep-1", tags={"clframe.sweep": "parent"}).info.run_id
    client.set_terminated(parent, "FAILED")

    def tags(strategy, child=False):
        base = {"strategy": strategy, "scenario": "split_digits", "model": "vit_tiny_patch16_224"}
        return dict(base, **{"mlflow.parentRunId": parent}) if child else base

    common = {"perf/train_img_s": [500.0, 510.0], "perf/eval_img_s": [900.0, 950.0]}
    ids = {
        "l2p": log_run(client, exp, "l2p-run", tags("l2p"), dict(common, acc_avg=[90.0, 70.5], forgetting=[0, 12.0],
                       bwt=[0, -12.0], trainable_params=[1234.0, 1234.0]), params={"n_tasks": 2}, wall=12.25),
        "linear": log_run(client, exp, "linear-run", tags("linear", child=True),
                          dict(common, acc_avg=[80.0, 75.25], forgetting=[0, 5.0], bwt=[0, -5.0],
                               trainable_params=[330.0, 330.0]), params={"n_tasks": 2}, wall=3.5),
        "finetune": log_run(client, exp, "finetune-run", tags("finetune", child=True),
                            {"acc_avg": [40.0], "forgetting": [0.0], "bwt": [0.0], "trainable_params": [32170.0]},
                            status="FAILED", params={"n_tasks": 2}),
        "vpt": log_run(client, exp, "vpt-run", tags("vpt"), dict(common, acc_avg=[88.0, 70.5], forgetting=[0, 3.0],
                       bwt=[0, -1.0], trainable_params=[5000.0, 5000.0]), params={"n_tasks": 2}, wall=20.0),
    }
    return uri, client, parent, ids


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_compare_sorts_by_accuracy_in_every_format(synthetic_store, tmp_path):
    uri, _, parent, ids = synthetic_store
    table = invoke("compare", "--tracking-uri", uri).stdout.splitlines()
    assert table[0] == "split_digits · 2 tasks · eval classes: seen"  # one section: one scenario, one task count
    assert table[1].split()[:5] == ["run", "strategy", "model", "tasks", "acc_avg"]  # empty columns left out
    # Best accuracy first; equal accuracy: less forgetting first; the sweep parent is not a result.
    assert [line.split()[1] for line in table[2:]] == ["linear", "vpt", "l2p", "finetune"]
    assert table[2].split() == [ids["linear"][:8], "linear", "vit_tiny_patch16_224", "2/2", "75.25",
                                "5.00", "-5.00", "330", "3.5", "510", "950", "FINISHED"]
    assert table[5].split()[3:8] == ["1/2", "40.00", "0.00", "0.00", "32,170"] and table[5].endswith("FAILED")

    rows = json.loads(invoke("compare", "--tracking-uri", uri, "--format", "json").stdout)
    assert [r["strategy"] for r in rows] == ["linear", "vpt", "l2p", "finetune"]
    l2p = rows[2]
    assert {k: l2p[k] for k in ("run_id", "run_name", "status", "strategy", "scenario", "model", "tasks_done",
                                "n_tasks", "acc_avg", "forgetting", "bwt", "trainable_params", "wall_time_s",
                                "train_img_s", "eval_img_s", "seed", "joint")} == {
        "run_id": ids["l2p"], "run_name": "l2p-run", "status": "FINISHED", "strategy": "l2p",
        "scenario": "split_digits", "model": "vit_tiny_patch16_224", "tasks_done": 2, "n_tasks": 2,
        "acc_avg": 70.5, "forgetting": 12.0, "bwt": -12.0, "trainable_params": 1234, "wall_time_s": 12.25,
        "train_img_s": 510.0, "eval_img_s": 950.0, "seed": None, "joint": False}
    assert rows[3]["wall_time_s"] is None and rows[3]["tasks_done"] == 1

    parsed = list(csv.DictReader(io.StringIO(invoke("compare", "--tracking-uri", uri, "--format", "csv").stdout)))
    assert [r["run_id"] for r in parsed] == [r["run_id"] for r in rows]
    assert float(parsed[0]["acc_avg"]) == 75.25 and parsed[3]["wall_time_s"] == ""

    markdown = invoke("compare", "--tracking-uri", uri, "--format", "markdown").stdout.splitlines()
    assert markdown[0] == "**split_digits · 2 tasks · eval classes: seen**"
    assert markdown[2].startswith("| run | strategy |") and set(markdown[3]) <= set("|:-")
    assert len(markdown) == 8 and "| 75.25 |" in markdown[4]

    # RUN selects runs: a unique id prefix, a run name, or a sweep parent for its children.
    picked = json.loads(invoke("compare", "--tracking-uri", uri, "--format", "json", ids["l2p"][:6],
                               "vpt-run").stdout)
    assert [r["strategy"] for r in picked] == ["vpt", "l2p"]
    children = json.loads(invoke("compare", "--tracking-uri", uri, "--format", "json", parent).stdout)
    assert [r["strategy"] for r in children] == ["linear", "finetune"]

    plot = tmp_path / "acc.png"
    result = invoke("compare", "--tracking-uri", uri, "--plot", str(plot), ids["l2p"], ids["linear"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written" in result.stderr


def test_compare_errors_name_the_fix(synthetic_store, tmp_path, monkeypatch):
    uri = synthetic_store[0]
    for args, expected in ((["nope"], "no run 'nope' in experiment 'clframe'"),
                           (["--experiment", "other"], "no experiment 'other' in this store (experiments: Default, "
                                                       "clframe)")):
        with pytest.raises(ClframeError, match=re.escape(expected)):
            CliRunner().invoke(cli, ["compare", "--tracking-uri", uri, *args], catch_exceptions=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ClframeError, match="no MLflow store at sqlite:///mlflow.db"):
        compare_runs("sqlite:///mlflow.db", "clframe")
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # reading never creates an empty store


# ----- seeds: groups, mean ± std, LaTeX, filters -----
SEED_RESULTS = {  # strategy -> final acc_avg per seed; bitfit's seed 2 FAILED, coop never ran seed 2
    "linear": {0: 80.0, 1: 82.5, 2: 86.0}, "bitfit_x": {0: 70.0, 1: 74.0, 2: 10.0}, "coop": {0: 60.0, 1: 61.0}}


@pytest.fixture(scope="module")
def seeds_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('seeds')}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("clframe")
    kwargs = "{'patch_size': 8, 'depth': 2, 'embed_dim': 32, 'num_heads': 2}"
    for strategy, per_seed in SEED_RESULTS.items():
        for seed, final in per_seed.items():
            failed = strategy == "bitfit_x" and seed == 2
            params = {"n_tasks": 2, "run.seed": seed, "run.epochs": 1, "run.lr": 0.01, "run.model_kwargs": kwargs,
                      "run.image_size": 16, "run.run_name": f"name-{seed}", "run.eval_classes": "seen"}
            log_run(client, exp, f"{strategy}-{seed}", {"strategy": strategy, "scenario": "split_digits",
                                                      "model": "vit_tiny_patch16_224", "scenario_kind": "class_il"},
                    {"acc_avg": [90.0] if failed else [90.0, final], "forgetting": [0.0] if failed else [0.0, 100 - final],
                     "bwt": [0.0] if failed else [0.0, final - 100]},
                    status="FAILED" if failed else "FINISHED", params=params, wall=None if failed else 1.0 + seed)
    # Another stream (5 tasks) and another learning rate: never averaged with the runs above.
    log_run(client, exp, "linear-5", {"strategy": "linear", "scenario": "split_digits", "scenario_kind": "class_il"},
            {"acc_avg": [99.0] * 5, "forgetting": [0.0] * 5, "bwt": [0.0] * 5},
            params={"n_tasks": 5, "run.seed": 0, "run.epochs": 1, "run.lr": 0.01})
    log_run(client, exp, "linear-lr", {"strategy": "linear", "scenario": "split_digits", "scenario_kind": "class_il"},
            {"acc_avg": [90.0, 50.0], "forgetting": [0.0, 1.0], "bwt": [0.0, -1.0]},
            params={"n_tasks": 2, "run.seed": 0, "run.epochs": 1, "run.lr": 0.1, "run.model_kwargs": kwargs,
                    "run.image_size": 16, "run.eval_classes": "seen"})
    return uri


def test_group_by_gives_numpy_mean_and_sample_std_and_flags_failed_and_missing_seeds(seeds_store):
    rows = json.loads(invoke("compare", "--tracking-uri", seeds_store, "--group-by", "strategy", "--format",
                             "json").stdout)
    two_tasks = {row["strategy"] + ("-lr" if row.get("run.lr") == "0.1" else ""): row
                 for row in rows if row["n_tasks"] == 2}
    assert [row["n_tasks"] for row in rows].count(5) == 1  # the 5-task stream is a section of its own
    for strategy, per_seed in SEED_RESULTS.items():
        kept = [v for s, v in per_seed.items() if not (strategy == "bitfit_x" and s == 2)]
        row = two_tasks[strategy]
        assert row["acc_avg_mean"] == pytest.approx(np.mean(kept))
        assert row["acc_avg_std"] == pytest.approx(np.std(kept, ddof=1))  # sample std, ddof 1
        assert row["n"] == len(kept) and row["seeds"] == ",".join(map(str, range(len(kept))))
    assert two_tasks["bitfit_x"]["note"] == "FAILED seed 2"
    assert two_tasks["coop"]["note"] == "missing seed 2" and two_tasks["linear"]["note"] == ""
    assert two_tasks["linear-lr"]["n"] == 1 and two_tasks["linear-lr"]["acc_avg_std"] is None  # lr splits groups
    # The model's parameter count replaces the bare name when model_kwargs changed it (timm on the meta device).
    assert two_tasks["linear"]["model"] == "vit_tiny_patch16_224 (31.8k params)"

    table = invoke("compare", "--tracking-uri", seeds_store, "--group-by", "strategy").stdout.splitlines()
    assert table[0] == "split_digits · 2 tasks · eval classes: seen" and table[1].split()[:4] == [
        "strategy", "model", "epochs", "lr"]
    linear = next(line for line in table if line.startswith("linear ") and " 0.01 " in line)
    assert f"{np.mean([80, 82.5, 86]):.2f} ± {np.std([80, 82.5, 86], ddof=1):.2f}" in linear
    assert next(line for line in table if line.startswith("bitfit_x")).endswith("FAILED seed 2")


def test_latex_is_booktabs_with_best_bold_and_escapes(seeds_store):
    latex = invoke("compare", "--tracking-uri", seeds_store, "--group-by", "strategy", "--format", "latex",
                   "--status", "FINISHED", "--strategy", "linear", "--strategy", "bitfit_x").stdout.splitlines()
    assert latex[0].startswith(r"\begin{tabular}{") and latex[1] == r"\toprule" and latex[-2:] == [
        r"\bottomrule", r"\end{tabular}"]
    assert r"acc\_avg" in latex[2] and "bitfit\\_x" in "\n".join(latex) and "bitfit_x" not in "\n".join(latex)
    best = f"{np.mean([80, 82.5, 86]):.2f} $\\pm$ {np.std([80, 82.5, 86], ddof=1):.2f}"
    assert any(rf"\textbf{{{best}}}" in line for line in latex)  # linear's acc_avg is the column's best
    assert not any(r"\textbf{72.00" in line for line in latex)  # bitfit_x's is not
    assert "\\multicolumn" in "\n".join(latex)  # two sections (2 and 5 tasks) in one tabular
    statuses = json.loads(invoke("compare", "--tracking-uri", seeds_store, "--status", "failed", "--format",
                                 "json").stdout)
    assert [row["run_name"] for row in statuses] == ["bitfit_x-2"]
    with pytest.raises(ClframeError, match="no run matches"):
        CliRunner().invoke(cli, ["compare", "--tracking-uri", seeds_store, "--scenario", "nope"],
                           catch_exceptions=False)
    with pytest.raises(ClframeError, match="--group-by pool: not a field"):
        CliRunner().invoke(cli, ["compare", "--tracking-uri", seeds_store, "--group-by", "pool"],
                           catch_exceptions=False)


def test_ui_opens_the_runs_view_of_a_tagged_experiment_and_runs_lean(synthetic_store):
    from clframe.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from clframe.mlflow_server import server_command
    from clframe.ui import find_experiment, runs_view_url

    uri, client = synthetic_store[:2]
    experiment_id = find_experiment(uri, "clframe")  # made without the tag (as an older clframe did): tagged now
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert runs_view_url("http://h:1", experiment_id) == \
        f"http://h:1/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert find_experiment(uri, "nope") is None and runs_view_url("http://h:1", None).endswith("#/experiments?"
                                                                                                "workflowType=machine_learning")
    command, env = server_command(uri, "127.0.0.1", 5000, 1)
    assert command[2:4] == ["mlflow", "server"] and command[command.index("--workers") + 1] == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_ui_refuses_a_damaged_store_in_one_line_and_reads_a_uri_with_a_query(synthetic_store):
    from clframe.ui import find_experiment

    uri, client = synthetic_store[:2]
    expected = client.get_experiment_by_name("clframe").experiment_id
    assert find_experiment(f"{uri}?timeout=20", "clframe") == expected  # the query is not part of the file name
    damaged = Path(uri.removeprefix("sqlite:///")).parent / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\0" + np.random.RandomState(1).bytes(9_000))
    with pytest.raises(ClframeError, match="is damaged .* move it aside"):
        find_experiment(f"sqlite:///{damaged}", "clframe")  # clframe ui: one line, as clframe compare


# ----- sweeps -----
def test_parent_aggregates_name_every_splitting_key_and_are_logged_once(synthetic_store):
    """A grid over epochs x seeds: two groups, labelled by epochs (which splits them); frozen_bf16, which
    a resume may change, does not split them; a second pass (a resumed sweep) logs no point twice."""
    from types import SimpleNamespace

    from clframe.runsets import log_group_curves

    _, client, _, _ = synthetic_store
    exp = client.create_experiment("aggregates")
    parent = client.create_run(exp, run_name="grid", tags={"clframe.sweep": "parent"}).info.run_id
    curves = {}
    for epochs in (1, 5):
        for seed in (0, 1):
            acc = [90.0 - epochs - seed, 70.0 + epochs + 2 * seed]
            curves[(epochs, seed)] = acc
            log_run(client, exp, f"e{epochs}-s{seed}", {"strategy": "finetune", "scenario": "split_digits",
                                                         "model": "vit_tiny_patch16_224", "mlflow.parentRunId": parent},
                    {"acc_avg": acc, "forgetting": [0.0, 1.0]},
                    params={"n_tasks": 2, "run.epochs": epochs, "run.seed": seed, "run.frozen_bf16": seed == 0})

    def log_metrics(values, step):
        client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), step) for k, v in values.items()])

    tracker = SimpleNamespace(client=client, run_id=parent, log_metrics=log_metrics,
                              set_tags=lambda tags: [client.set_tag(parent, k, v) for k, v in tags.items()])
    assert sorted(log_group_curves(tracker, exp)) == ["finetune epochs:1", "finetune epochs:5"]
    for epochs in (1, 5):
        history = sorted(client.get_metric_history(parent, f"finetune epochs:{epochs}/acc_avg"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(np.mean([curves[(epochs, 0)], curves[(epochs, 1)]], axis=0))
        assert [m.value for m in client.get_metric_history(parent, f"finetune epochs:{epochs}/n_seeds")] == [2.0, 2.0]
    points = {key: len(client.get_metric_history(parent, key)) for key in client.get_run(parent).data.metrics}
    assert sorted(log_group_curves(tracker, exp)) == ["finetune epochs:1", "finetune epochs:5"]
    assert {key: len(client.get_metric_history(parent, key)) for key in points} == points


def test_sweep_plan_expands_strategies_runs_and_grid(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("runs:\n  - {}\n  - {strategy: finetune, set: {lr: 0.001}}\ngrid:\n  seed: [0, 1]\n")
    plan = plan_sweep(["linear", "vpt"], str(sweep))
    assert [(c.strategy, c.sets) for c in plan.children] == [
        ("linear", ["seed=0"]), ("vpt", ["seed=0"]), ("linear", ["seed=1"]), ("vpt", ["seed=1"]),
        ("finetune", ["lr=0.001", "seed=0"]), ("finetune", ["lr=0.001", "seed=1"])]
    assert [c.strategy for c in plan_sweep(["linear", "finetune"]).children] == ["linear", "finetune"]
    sweep.write_text("runs: [{strategy: linear, bogus: 1}]\n")
    with pytest.raises(Exception, match="keys among"):
        plan_sweep(["linear"], str(sweep))


def sweep_children(uri, parent_id):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])
    return client, runs


def test_sweep_records_a_failing_child_and_goes_on_or_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(
        "name: mixed\nruns:\n  - strategy: test_compare:ExplodingLinear\n"
        "  - {strategy: linear, set: {weights: missing.pth}}\n  - strategy: linear\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["run", "--sweep", "sweep.yaml", *TWO_TASKS, "--tracking-uri", uri, "--set", f"checkpoint_dir={tmp_path}/ckpt"]
    client = MlflowClient(uri)
    for fail_fast in (False, True):
        result = CliRunner().invoke(cli, base + (["--fail-fast", "--run-name", "mixed-ff"] if fail_fast else []))
        assert result.exit_code == 1 and "runs failed" in str(result.exception)
        parent = client.search_runs([client.get_experiment_by_name("clframe").experiment_id],
                                    filter_string=f"attributes.run_name = '{'mixed-ff' if fail_fast else 'mixed'}'")[0]
        assert parent.info.status == "FAILED" and parent.data.tags["clframe.sweep"] == "parent"
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.yaml"}
        _, children = sweep_children(uri, parent.info.run_id)
        exploded = children[0]
        assert exploded.info.status == "FAILED" and "boom in task 1" in exploded.data.tags["clframe.error"]
        assert [m.step for m in client.get_metric_history(exploded.info.run_id, "acc_avg")] == [0]  # task 0 kept
        if fail_fast:
            assert len(children) == 1 and "(--fail-fast: 2 not started)" in str(result.exception)
            continue
        assert [c.info.status for c in children] == ["FAILED", "FAILED", "FINISHED"]
        assert "no such file" in children[1].data.tags["clframe.error"]  # failed before its run opened
        assert children[1].data.params["run.weights"] == "missing.pth"
        assert [m.step for m in client.get_metric_history(children[2].info.run_id, "acc_avg")] == [0, 1]
        summary = result.stdout[result.stdout.index("sweep 'mixed' ("):].splitlines()
        assert summary[1] == "split_digits · 2 tasks · eval classes: seen"
        rows = summary[3:6]  # complete runs first, then the others; a run without results last
        assert [line.split()[1] for line in rows] == ["linear", "test_compare:ExplodingLinear", "linear"]
        assert [line.split()[-1] for line in rows] == ["FINISHED", "FAILED", "FAILED"]


# ----- against a real server -----
def test_runs_on_a_real_server_arrive_whole(mlflow_server, tmp_path):
    base = ["run", *TWO_TASKS, "--tracking-uri", mlflow_server.url, "--set", f"checkpoint_dir={tmp_path}/ckpt"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # Two runs at once, as two users would start them (this also checks that creating the experiment
    # does not race): one as a separate process, one in this process while the other is running.
    proc = subprocess.Popen([sys.executable, "-m", "clframe", *base, "--strategy", "linear"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    in_process = CliRunner().invoke(cli, [*base, "--strategy", "finetune"], catch_exceptions=False)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert in_process.exit_code == 0, in_process.output
    for out, err in ((out, err), (in_process.stdout, in_process.stderr)):
        assert f"at {mlflow_server.url}" in out and "stopped answering" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlflow-fallback.db").exists()

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])
    assert sorted(r.data.tags["strategy"] for r in runs) == ["finetune", "linear"]
    for run in runs:
        run_id = run.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name.startswith(f"{run.data.tags['strategy']}-split_digits-")
        assert run.data.tags["model"] == "vit_tiny_patch16_224" and "clframe_version" in run.data.tags
        assert run.data.params["split_digits.n_tasks"] == "2" and run.data.params["run.epochs"] == "1"
        assert int(run.data.params["n_trainable_params"]) == int(run.data.metrics["trainable_params"]) > 0
        for key in ("acc_avg", "forgetting", "bwt", "perf/train_img_s"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1]
        assert [m.step for m in client.get_metric_history(run_id, "acc/task_0")] == [0, 1]
        assert "wall_time_s" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "acc_matrix.csv", "acc_matrix.png"}
        assert not client.list_artifacts(run_id, "checkpoints")  # one checkpoint copy, in checkpoint_dir
        matrix = Path(client.download_artifacts(run_id, "acc_matrix.csv", str(tmp_path))).read_text().splitlines()
        assert matrix[0] == "after_task,task_0,task_1" and len(matrix) == 3

    rows = json.loads(invoke("compare", "--tracking-uri", mlflow_server.url, "--format", "json", "--plot",
                             str(tmp_path / "curves.png")).stdout)
    by_id = {r.info.run_id: r for r in runs}
    assert sorted(r["run_id"] for r in rows) == sorted(by_id)
    assert rows[0]["acc_avg"] >= rows[1]["acc_avg"]
    for row in rows:
        run = by_id[row["run_id"]]
        assert row["strategy"] == run.data.tags["strategy"] and row["tasks_done"] == 2 and row["n_tasks"] == 2
        for key in ("acc_avg", "forgetting", "bwt", "wall_time_s"):
            assert row[key] == run.data.metrics[key]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_server_going_away_mid_run_loses_nothing(tmp_path, monkeypatch):
    """A sweep of two runs; the server dies after the first run logged task 0. That run carries on in
    ./mlflow-fallback.db, whole; the parent run moves there too and the second run goes straight there."""
    server = MlflowServer(tmp_path)
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail over in a second, not after back-off
        train_task = engine_module.Engine.train_task

        def dying_server_train_task(self, experience):
            if experience.task_id == 1:
                server.stop()
            return train_task(self, experience)

        monkeypatch.setattr(engine_module.Engine, "train_task", dying_server_train_task)
        result = CliRunner().invoke(cli, ["run", "--strategy", "linear", "--strategy", "finetune", *TWO_TASKS, "--tracking-uri", server.url,
                                          "--set", f"checkpoint_dir={tmp_path}/ckpt"], catch_exceptions=False)
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    fallback = f"sqlite:///{tmp_path / 'mlflow-fallback.db'}"
    assert "stopped answering" in result.stderr and f"continues in the local store {fallback}" in result.stderr
    client = MlflowClient(fallback)
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id],
                              order_by=["attributes.start_time ASC"])
    children = [r for r in runs if "clframe.sweep" not in r.data.tags]
    assert [r.data.tags["strategy"] for r in children] == ["linear", "finetune"]
    assert all(r.info.status == "FINISHED" for r in runs)
    moved = children[0]  # started on the server, finished locally; task 0 was replayed from the journal
    assert moved.data.tags["clframe.fallback_from"].startswith(server.url)
    for key in ("acc_avg", "forgetting", "acc/task_0", "trainable_params"):
        assert [m.step for m in client.get_metric_history(moved.info.run_id, key)] == [0, 1]
    assert moved.data.params["split_digits.n_tasks"] == "2"
    assert {a.path for a in client.list_artifacts(moved.info.run_id)} >= {"config.yaml", "acc_matrix.csv",
                                                                          "acc_matrix.png"}
    printed = result.stdout.split("average accuracy ")[1].split()[0]
    assert f"{moved.data.metrics['acc_avg']:.2f}" == printed  # the finished result is the one reported
    assert f"MLflow run {moved.info.run_id} in experiment 'clframe' at {fallback}" in result.stdout
    parent = next(r for r in runs if "clframe.sweep" in r.data.tags)
    assert parent.data.tags["clframe.fallback_from"].startswith(server.url)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert "clframe.fallback_from" not in children[1].data.tags
    assert [m.step for m in client.get_metric_history(children[1].info.run_id, "acc_avg")] == [0, 1]
