"""End-to-end runs through the real CLI and MLflow."""
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
    assert {"config.yaml", "acc_matrix.csv", "acc_matrix.png"} <= artifacts
    assert "checkpoints" not in artifacts  # one checkpoint copy, in checkpoint_dir (issue 19.11)


def test_fake_cifar_run(tmp_path, fake_cifar):
    args = ["run", "--scenario", "split_cifar100", "--strategy", "linear", "--data-root", str(fake_cifar),
            "--model", "vit_tiny_patch16_224", "--no-pretrained", "--set", "split_cifar100.n_tasks=2",
            *tiny_run_options(tmp_path)]
    result = clframe_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client, run = read_run(tmp_path)
    assert run.data.params["split_cifar100.n_tasks"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc_avg")] == [0, 1]


# Bad input (one error line, exit code != 0, nothing written) is tested in test_reliability.py.


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
