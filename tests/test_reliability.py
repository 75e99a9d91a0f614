"""Issue 8: resume at task boundaries, failures recorded, every bad input answered in one line.

The long tests run the real CLI in subprocesses on a tiny ViT: an uninterrupted reference run,
a run killed with SIGKILL during task 3 and resumed, a run stopped by SIGTERM during task 2 and
resumed with the command it printed; all three must end with the same accuracy matrix and the
same trainable weights. Bad input runs as one batch of forked CLI processes (tests/cli_batch.py).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_MODEL_KWARGS, clframe_subprocess, wait_for_text, write_fake_cifar100

TESTS = Path(__file__).resolve().parent
TINY = ["--set", f"model_kwargs={TINY_MODEL_KWARGS}", "--set", "image_size=16"]
# Five tasks of finetuning (every weight trains, so the whole trainable state must come back),
# with training augmentation on (the per-task augmentation RNG must line up after a resume).
LONG_RUN = ["run", "--strategy", "finetune", "--seed", "3", *TINY, "--set", "epochs=2", "--set", "batch_size=16",
            "--set", "train_aug=true"]
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made: creating them costs each fresh run ~2 s of CPU."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def where(folder: Path, empty_store: Path) -> list[str]:
    shutil.copyfile(empty_store, folder / "mlflow.db")
    return ["--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--set", f"checkpoint_dir={folder}/ckpt"]


def popen(args: list[str], cwd: Path, stderr_path: Path) -> subprocess.Popen:
    env = dict(os.environ, **ENV)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "clframe", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=stderr_path.open("w"), text=True)


def only_checkpoint(folder: Path) -> Path:
    found = list((folder / "ckpt").glob("*/last.pt"))
    assert len(found) == 1, found
    return found[0]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def mlflow_run(folder: Path, run_id: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    return client, client.get_run(run_id)


def metric_values(client: MlflowClient, run_id: str, key: str) -> dict[int, set[float]]:
    values: dict[int, set[float]] = {}
    for metric in client.get_metric_history(run_id, key):
        values.setdefault(metric.step, set()).add(metric.value)
    return values


def assert_same_results(resumed: dict, reference: dict) -> None:
    """Bit-identical accuracy matrix and trainable weights."""
    assert np.array_equal(resumed["acc_matrix"].numpy(), reference["acc_matrix"].numpy(), equal_nan=True)
    assert resumed["tasks_done"] == reference["tasks_done"] == 5
    assert resumed["epochs_done"] == reference["epochs_done"]
    assert resumed["strategy_state"].keys() == reference["strategy_state"].keys()
    for key, tensor in reference["strategy_state"].items():
        assert torch.equal(resumed["strategy_state"][key], tensor), key


def assert_same_metrics(client, run_id, ref_client, ref_run_id) -> None:
    """Every metric step holds the reference's value (a task redone after a kill logs it again)."""
    keys = ["acc_avg", "forgetting", "bwt", "train/loss"] + [f"acc/task_{j}" for j in range(5)]
    for key in keys:
        ours, theirs = metric_values(client, run_id, key), metric_values(ref_client, ref_run_id, key)
        assert ours == theirs, key
    assert sorted(metric_values(client, run_id, "acc_avg")) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, empty_store):
    """The uninterrupted run, started in the background so it overlaps the first interrupted one."""
    folder = tmp_path_factory.mktemp("reference")
    process = popen([*LONG_RUN, "--no-progress", *where(folder, empty_store)], folder, folder / "stderr.txt")

    def result() -> tuple[Path, dict]:
        stdout, _ = process.communicate(timeout=300)
        assert process.returncode == 0, (folder / "stderr.txt").read_text()[-3000:]
        return folder, load_checkpoint(only_checkpoint(folder))

    return result


# ----- resume -----
def test_kill9_during_task_3_then_resume_matches_uninterrupted_run(tmp_path, reference, empty_store):
    victim = popen([*LONG_RUN, *where(tmp_path, empty_store)], tmp_path, tmp_path / "stderr.txt")
    wait_for_text(tmp_path / "stderr.txt", "task 3/5", victim)  # task 2 checkpointed, task 3 training
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    path = only_checkpoint(tmp_path)
    killed = load_checkpoint(path)
    assert killed["tasks_done"] == 2, "the kill came after task 3 had finished; make task 3 longer"
    assert not list(path.parent.glob(".tmp-*"))
    run_id = path.parent.name
    assert killed["run_id"] == run_id
    assert np.isnan(killed["acc_matrix"].numpy()[2:]).all()

    # The bare command resumes: the config comes back from the checkpoint.
    resumed = clframe_subprocess(["run", "--resume", run_id, "--set", f"checkpoint_dir={tmp_path}/ckpt",
                                  "--no-progress"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id} after task 2/5" in resumed.stdout
    final = load_checkpoint(path)
    ref_folder, ref = reference()
    assert_same_results(final, ref)

    client, run = mlflow_run(tmp_path, run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["clframe.resumed_after_task"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run went on; no second one
    ref_client, ref_run = mlflow_run(ref_folder, ref["run_id"])
    assert_same_metrics(client, run_id, ref_client, ref["run_id"])
    csv = client.download_artifacts(run_id, "acc_matrix.csv", str(tmp_path))
    ref_csv = ref_client.download_artifacts(ref["run_id"], "acc_matrix.csv", str(tmp_path / "ref"))
    assert Path(csv).read_text() == Path(ref_csv).read_text()


def test_sigterm_marks_killed_prints_the_resume_command_and_it_works(tmp_path, reference, empty_store):
    victim = popen([*LONG_RUN, *where(tmp_path, empty_store)], tmp_path, tmp_path / "stderr.txt")
    wait_for_text(tmp_path / "stderr.txt", "task 2/5", victim)
    victim.send_signal(signal.SIGTERM)
    victim.communicate(timeout=60)
    assert victim.returncode == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "interrupted by SIGTERM during task 2/5" in errors[0] and "marked KILLED" in errors[0]
    path = only_checkpoint(tmp_path)
    assert f"the checkpoint after task 1/5 is kept at {path}" in errors[0]
    assert not list(path.parent.glob(".tmp-*"))  # nothing half-written
    assert load_checkpoint(path)["tasks_done"] == 1
    run_id = path.parent.name
    client, run = mlflow_run(tmp_path, run_id)
    assert run.info.status == "KILLED"

    command = errors[0].split("resume with: ")[1].split()
    assert command[:3] == ["clframe", "run", "--resume"]
    resumed = clframe_subprocess(command[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _, run = mlflow_run(tmp_path, run_id)
    assert run.info.status == "FINISHED"
    ref_folder, ref = reference()
    assert_same_results(load_checkpoint(path), ref)


def test_nan_loss_stops_at_once_naming_task_and_step(tmp_path, empty_store, capsys):
    from clframe.cli import main
    from diverging import BAD_STEP, BAD_TASK  # tests/ is on sys.path, as PYTHONPATH=tests would put it

    args = ["run", "--strategy", "diverging:Diverging", *TINY, "--epochs", "2", "--no-progress",
            *where(tmp_path, empty_store)]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert f"training loss became nan in task {BAD_TASK + 1}/5 (task index {BAD_TASK}) at epoch 1/2, " \
           f"step {BAD_STEP + 1}/" in errors[0]
    assert f"(step {BAD_STEP + 1} of the task)" in errors[0]
    assert "marked FAILED" in errors[0] and "the checkpoint after task 1/5 is kept" in errors[0]
    path = only_checkpoint(tmp_path)
    saved = load_checkpoint(path)
    assert saved["tasks_done"] == 1 and not np.isnan(saved["acc_matrix"][0, 0].item())
    assert all(torch.isfinite(t).all() for t in saved["strategy_state"].values() if t.is_floating_point())
    client, run = mlflow_run(tmp_path, path.parent.name)
    assert run.info.status == "FAILED"
    assert "training loss became nan" in run.data.tags["clframe.error"]
    # Stopped at once: no train/loss was logged for the diverged epoch, no task-1 metrics.
    assert sorted(metric_values(client, run.info.run_id, "train/loss")) == [0, 1]
    assert sorted(metric_values(client, run.info.run_id, "acc_avg")) == [0]


def test_same_seed_same_metrics_in_process(tmp_path, empty_store):
    from clframe.config import resolve_config
    from clframe.runner import run_experiment
    from clframe.scenarios.split_digits import SplitDigitsConfig
    from clframe.strategies.linear import LinearConfig

    def run(seed: int, name: str):
        sets = [f"model_kwargs={TINY_MODEL_KWARGS}", "image_size=16", "epochs=1", "progress=false",
                "train_aug=true", "split_digits.n_tasks=2", f"checkpoint_dir={tmp_path}/ckpt",
                f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"seed={seed}", f"run_name={name}"]
        config = resolve_config({"scenario": "split_digits", "strategy": "linear"}, None, sets,
                                SplitDigitsConfig, LinearConfig)
        return run_experiment(config, echo=lambda line: None)

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    first, second, other = run(5, "a"), run(5, "b"), run(6, "c")
    assert np.array_equal(first.acc_matrix, second.acc_matrix, equal_nan=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("acc_avg", "forgetting", "bwt", "acc/task_0", "acc/task_1", "train/loss"):
        assert metric_values(client, first.run_id, key) == metric_values(client, second.run_id, key), key
    assert metric_values(client, first.run_id, "train/loss") != metric_values(client, other.run_id, "train/loss")


# ----- checkpoint mechanics (in-process, fast) -----
def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from clframe import checkpoint

    path = tmp_path / "run" / "last.pt"
    checkpoint.save_atomic({"tasks_done": 1, "weights": torch.ones(3)}, path)

    def dies_halfway(payload, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"tasks_done": 2, "weights": torch.zeros(3)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert torch.load(path, weights_only=True)["tasks_done"] == 1


def test_checkpoint_holds_only_weights_only_safe_values(tmp_path):
    from clframe import checkpoint

    with pytest.raises(TypeError, match=r"checkpoint.extra_state.buffer is a ndarray"):
        checkpoint.save_atomic({"extra_state": {"buffer": np.zeros(2)}}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())


def test_rng_states_round_trip():
    import random

    from clframe import checkpoint

    state = checkpoint.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.restore_rng(torch.load(_round_trip(state), weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _round_trip(value) -> "object":
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_divergence_watch_finds_the_first_bad_step_on_cpu():
    from clframe.engine import DivergenceWatch

    watch = DivergenceWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan")]):
        watch.update(torch.tensor(loss), step)
    assert watch.poll() == 2 and watch.result() == 2 and watch.value.item() == float("inf")


# ----- bad input: one line, exit code != 0, nothing that looks like a result -----
def _resolved_default_config():
    from clframe.config import resolve_config
    from clframe.scenarios.split_digits import SplitDigitsConfig
    from clframe.strategies.linear import LinearConfig

    return resolve_config({"scenario": "split_digits", "strategy": "linear"}, None, [], SplitDigitsConfig,
                          LinearConfig)


def _setup_files(case: Path, files: str) -> None:
    """Create what a bad-input case needs in its working directory."""
    if files == "cifar-truncated-archive":
        write_fake_cifar100(case / "src", per_class_train=1, per_class_test=1)
        archive = case / "data" / "cifar-100-python.tar.gz"
        archive.parent.mkdir()
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(case / "src" / "cifar-100-python", arcname="cifar-100-python")
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif files == "cifar-truncated-file":
        train = write_fake_cifar100(case / "data", per_class_train=1, per_class_test=1) / "train"
        train.write_bytes(train.read_bytes()[:1000])
    elif files == "cifar10-layout":
        folder = case / "data" / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("data_batch_1", "batches.meta", "test_batch"):
            (folder / name).write_bytes(pickle.dumps({b"data": []}))
    elif files == "cifar-wrong-content":
        folder = write_fake_cifar100(case / "data", per_class_train=1, per_class_test=1)
        (folder / "train").write_bytes(pickle.dumps([1, 2, 3]))
    elif files.startswith("weights"):
        import timm

        width = 48 if files == "weights-other-width" else 32
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, depth=2,
                                  embed_dim=width, num_heads=2)
        torch.save(model.state_dict(), case / "weights.pth")
        if files == "weights-garbage":
            (case / "weights.pth").write_bytes(b"\x80\xab" + np.random.RandomState(0).bytes(1998))  # protocol 171: torch warns
    elif files == "yaml":
        (case / "broken.yaml").write_text("run:\n  epochs: [1, 2\n")
        (case / "section.yaml").write_text("runn:\n  epochs: 1\n")
        (case / "typo.yaml").write_text("run:\n  batchsize: 8\n")
    elif files == "checkpoints":
        from fractions import Fraction

        from clframe import checkpoint

        config = _resolved_default_config()
        payload = {"version": checkpoint.FORMAT_VERSION, "run_id": "0" * 32, "tasks_done": 1,
                   "config": {k: str(v) for k, v in config.flatten().items()}, "config_yaml": config.to_yaml()}
        checkpoint.save_atomic(payload, case / "saved" / "last.pt")
        (case / "garbage.pt").write_bytes(b"\x80\xab" + np.random.RandomState(0).bytes(2998))  # protocol 171: torch warns
        torch.save({"tasks_done": 1, "anything": Fraction(1, 3)}, case / "pickled-object.pt")


CIFAR = ["--scenario", "split_cifar100", "--data-root", "data", "--set", "split_cifar100.download=false"]
# (id, arguments after `clframe run`, files to create, what the one error line must say)
BAD_INPUT = [
    ("unknown-scenario", ["--scenario", "split_cifar"], None, "unknown scenario 'split_cifar' (did you mean split_cifar100"),
    ("unknown-strategy", ["--strategy", "lineer"], None, "unknown strategy 'lineer' (did you mean linear"),
    ("unknown-model", ["--model", "vit_tiny_patch16"], None, "unknown timm model 'vit_tiny_patch16' (did you mean vit_tiny_patch16_"),
    ("mistyped-key", ["--set", "epoch=2"], None, "unknown config key 'run.epoch' (did you mean epochs?)"),
    ("mistyped-key-in-file", ["--config", "typo.yaml"], "yaml", "unknown config key 'run.batchsize' (did you mean batch_size"),
    ("unknown-set-section", ["--set", "l2p.pool_size=3"], None, "--set l2p.pool_size: unknown section 'l2p'"),
    ("unknown-file-section", ["--config", "section.yaml"], "yaml", "unknown config section 'runn' in section.yaml"),
    ("malformed-yaml", ["--config", "broken.yaml"], "yaml", "config file broken.yaml is not valid YAML (line 3)"),
    ("missing-config-file", ["--config", "nope.yaml"], None, "cannot read config file nope.yaml"),
    ("wrong-type-set", ["--set", "epochs=three"], None, "config key 'run.epochs' wants an integer, got 'three'"),
    ("wrong-type-option", ["--epochs", "three"], None, "'three' is not a valid integer"),
    ("wrong-type-bool", ["--set", "pretrained=maybe"], None, "config key 'run.pretrained' wants true or false"),
    ("bad-choice", ["--device", "gpu"], None, "'gpu' is not one of 'auto', 'cpu', 'cuda'"),
    ("unknown-option", ["--epoch", "2"], None, "No such option '--epoch'. Did you mean '--epochs'?"),
    ("negative-epochs", ["--epochs", "-1"], None, "config key 'run.epochs' must be >= 0; got -1"),
    ("negative-batch-size", ["--batch-size", "-4"], None, "config key 'run.batch_size' must be >= 1; got -4"),
    ("zero-batch-size", ["--set", "batch_size=0"], None, "config key 'run.batch_size' must be >= 1; got 0"),
    ("malformed-set", ["--set", "nonsense"], None, "malformed --set 'nonsense': write --set key=value"),
    ("malformed-set-no-key", ["--set", "=3"], None, "malformed --set '=3'"),
    ("missing-data", CIFAR, None, "CIFAR-100 not found: data/cifar-100-python lacks train, test, meta"),
    ("truncated-archive", CIFAR, "cifar-truncated-archive", "cifar-100-python.tar.gz is truncated or corrupted"),
    ("truncated-data-file", CIFAR, "cifar-truncated-file", "cifar-100-python/train is corrupted or truncated"),
    ("wrong-layout", CIFAR, "cifar10-layout", "lacks train, test, meta"),
    ("wrong-content", CIFAR, "cifar-wrong-content", "cifar-100-python/train is not a CIFAR-100 file"),
    ("pretrained-offline", ["--pretrained", *TINY], None, "cannot fetch pretrained weights for 'vit_tiny_patch16_224' (offline?)"),
    ("weights-missing", ["--weights", "missing.pth"], None, "--weights missing.pth: no such file"),
    ("weights-misfit", ["--weights", "weights.pth", *TINY], "weights-other-width", "--weights weights.pth does not fit model 'vit_tiny_patch16_224'"),
    ("weights-garbage", ["--weights", "weights.pth", *TINY], "weights-garbage", "--weights weights.pth is not a readable weights file"),
    ("cuda-without-gpu", ["--device", "cuda"], None, "--device cuda was asked for but no CUDA GPU is visible"),
    ("cuda-graph-on-cpu", ["--set", "cuda_graph=on", "--device", "cpu"], None, "cuda_graph=on needs a CUDA device; use --set cuda_graph=auto"),
    ("gpus-without-gpu", ["--gpus", "2"], None, "--gpus 2 asks for 2 GPUs but 0 are visible; use --gpus 1, or --device cpu"),
    ("gpus-cuda-without-gpu", ["--gpus", "2", "--device", "cuda"], None, "--device cuda was asked for but no CUDA GPU is visible"),
    ("tracking-unreachable", ["--tracking-uri", "http://127.0.0.1:9"], None, "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ("tracking-unsupported", ["--tracking-uri", "foo://bar"], None, "--tracking-uri foo://bar: MLflow cannot log to a 'foo://' store"),
    ("resume-missing", ["--resume", "4f1c0ffee"], None, "--resume 4f1c0ffee: no such checkpoint file, and no checkpoint of a run with that id"),
    ("resume-corrupted", ["--resume", "garbage.pt"], "checkpoints", "garbage.pt is not a readable clframe checkpoint"),
    ("resume-pickled-object", ["--resume", "pickled-object.pt"], "checkpoints", "pickled-object.pt is not a readable clframe checkpoint"),
    ("resume-other-config", ["--resume", "saved/last.pt", "--epochs", "7", "--lr", "0.5"], "checkpoints",
     "the checkpoint was made with another config (checkpoint -> this command: run.epochs: 3 -> 7; run.lr: 0.01 -> 0.5)"),
    ("resume-other-strategy", ["--resume", "saved", "--strategy", "finetune"], "checkpoints",
     "--resume saved: that run used --strategy linear, not finetune"),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    cases = []
    for name, args, files, _ in BAD_INPUT:
        case = root / name
        case.mkdir()
        if files:
            _setup_files(case, files)
        cases.append({"argv": ["run", "--no-progress", *args], "cwd": str(case)})
    (root / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, **ENV)
    env.pop("MLFLOW_TRACKING_URI", None)
    driver = subprocess.run([sys.executable, str(TESTS / "cli_batch.py"), "cases.json", "results.json"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr
    assert driver.stderr == "", driver.stderr  # importing everything printed no warnings
    results = json.loads((root / "results.json").read_text())
    return {name: (root / name, result) for (name, *_), result in zip(BAD_INPUT, results)}


@pytest.mark.parametrize("name, expected", [(name, expected) for name, _, _, expected in BAD_INPUT],
                         ids=[name for name, *_ in BAD_INPUT])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(bad_input_results, name, expected):
    case, result = bad_input_results[name]
    assert result["code"] != 0, result
    assert "Traceback" not in result["stderr"] + result["stdout"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert result["stdout"] == ""
    leftovers = {"mlflow.db", "mlruns", "mlflow-fallback.db", ".clframe"} & {p.name for p in case.iterdir()}
    assert not leftovers, f"{name} wrote {leftovers}"
    data = case / "data"
    if data.is_dir():  # a damaged archive leaves nothing half-extracted
        assert not [p.name for p in data.iterdir() if p.name.startswith(".extract-")]
        if name == "truncated-archive":
            assert not (data / "cifar-100-python").exists()
