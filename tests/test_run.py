"""End-to-end runs through the real CLI and MLflow."""
import pytest
from mlflow.tracking import MlflowClient

from conftest import clframe_subprocess, tiny_run_options


def read_run(tmp_path, run_id=None):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("clframe")
    runs = client.search_runs([experiment.experiment_id])
    run = runs[0] if run_id is None else client.get_run(run_id)
    return client, run


def test_offline_run_logs_every_task_step(tmp_path):
    result = clframe_subprocess(["run", *tiny_run_options(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "average accuracy" in result.stdout and "forgetting" in result.stdout
    client, run = read_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["strategy"] == "linear" and run.data.tags["scenario"] == "split_digits"
    assert run.data.params["run.epochs"] == "1"
    for key in ("acc_avg", "forgetting", "bwt"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    for j in range(5):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"acc/task_{j}")]
        assert sorted(steps) == list(range(j, 5))
    final = client.get_metric_history(run.info.run_id, "acc_avg")
    assert 0.0 <= final[-1].value <= 100.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "acc_matrix.csv", "acc_matrix.png", "checkpoints"} <= artifacts


def test_fake_cifar_run(tmp_path, fake_cifar):
    args = ["run", "--scenario", "split_cifar100", "--strategy", "linear", "--data-root", str(fake_cifar),
            "--model", "vit_tiny_patch16_224", "--no-pretrained", "--set", "split_cifar100.n_tasks=2",
            *tiny_run_options(tmp_path)]
    result = clframe_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client, run = read_run(tmp_path)
    assert run.data.params["split_cifar100.n_tasks"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc_avg")] == [0, 1]


@pytest.mark.parametrize("args, expected", [
    (["--scenario", "split_cifar"], "unknown scenario 'split_cifar' (did you mean split_cifar100"),
    (["--strategy", "lineer"], "unknown strategy 'lineer' (did you mean linear"),
    (["--set", "epoch=2"], "unknown config key 'run.epoch'"),
    (["--set", "batch_size=-4"], "must be >= 1"),
    (["--set", "nonsense"], "write --set key=value"),
    (["--scenario", "split_cifar100", "--set", "split_cifar100.download=false"], "--data-root"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--pretrained"], "pass a local checkpoint with --weights FILE"),
    (["--model", "vit_tiny_patch16"], "unknown timm model 'vit_tiny_patch16'"),
    (["--weights", "missing.pth"], "no such file"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, expected):
    result = clframe_subprocess(["run", "--no-progress", "--data-root", str(tmp_path), *args], cwd=tmp_path,
                                env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_list_and_help(tmp_path):
    listing = clframe_subprocess(["list"], cwd=tmp_path)
    assert listing.returncode == 0
    for name in ("split_digits", "split_cifar100", "linear", "finetune"):
        assert name in listing.stdout
    help_text = clframe_subprocess(["run", "--help"], cwd=tmp_path).stdout
    for option in ("--scenario", "--strategy", "--config", "--set", "--model", "--pretrained", "--weights",
                   "--epochs", "--batch-size", "--lr", "--device", "--seed", "--data-root", "--tracking-uri",
                   "--experiment"):
        assert option in help_text


def test_weights_file_loads_and_a_mismatch_is_clear(tmp_path):
    import timm
    import torch

    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2).state_dict(), tmp_path / "good.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, depth=2,
                                 embed_dim=48, num_heads=2).state_dict(), tmp_path / "bad.pth")
    ok = clframe_subprocess(["run", *tiny_run_options(tmp_path), "--weights", "good.pth",
                             "--set", "split_digits.n_tasks=2"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = clframe_subprocess(["run", *tiny_run_options(tmp_path), "--weights", "bad.pth"], cwd=tmp_path)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "does not fit model" in bad.stderr and "size mismatch" in bad.stderr
