"""Issue 10: a run on 2 processes (gloo, CPU) computes what 1 process computes on the same global batch.

The end-to-end tests launch the real CLI: ``clframe run --gpus 2 --device cpu`` execs
``python -m torch.distributed.run`` with 2 CPU processes (on GPUs, one per GPU), and its accuracy matrix, L2P
selection metrics and trainable weights are compared with a 1-process run. The batch sizes make
the shards uneven and leave rank 1 with nothing in some last batches (train and test). The
batchwise-selection unit test runs 2 ranks with ``torch.multiprocessing.spawn``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from conftest import TINY_MODEL_KWARGS, clframe_subprocess, wait_for_text

# Task sizes of split_digits with 2 tasks: train 670 / 677, test 224 / 226. Batch 26 leaves one image
# in task 1's last training batch, eval batch 45 one in its last test batch (rank 1 gets none); 45
# splits 23 / 22.
RUN = ["run", "--device", "cpu", "--no-progress", "--set", f"model_kwargs={TINY_MODEL_KWARGS}",
       "--set", "image_size=16", "--set", "split_digits.n_tasks=2", "--set", "batch_size=26",
       "--set", "eval_batch_size=45", "--set", "epochs=1", "--set", "train_aug=true"]
ENV = {"CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_URI": ""}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (saves each run ~2 s of CPU)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def run_cli(folder: Path, store: Path, strategy: str, extra: list[str]) -> dict:
    folder.mkdir()
    shutil.copyfile(store, folder / "mlflow.db")
    result = clframe_subprocess([*RUN, "--strategy", strategy, "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
                                 "--set", f"checkpoint_dir={folder}/ckpt", *extra], cwd=folder, timeout=240, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list((folder / "ckpt").glob("*/last.pt"))
    assert len(checkpoints) == 1, checkpoints
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])
    values = {key: [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]
              for key in runs[0].data.metrics}
    return {"stdout": result.stdout, "runs": runs, "metrics": values,
            "checkpoint": torch.load(checkpoints[0], map_location="cpu", weights_only=True)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, empty_store):
    """The 1-process run of each strategy, made once for the tests that compare against it."""
    done: dict[str, dict] = {}

    def get(strategy: str) -> dict:
        if strategy not in done:
            done[strategy] = run_cli(tmp_path_factory.mktemp(f"one-{strategy}") / "run", empty_store, strategy, [])
        return done[strategy]

    return get


@pytest.mark.parametrize("strategy", ["linear", "l2p"])
def test_two_processes_match_one(tmp_path, empty_store, one_process, strategy):
    one = one_process(strategy)
    two = run_cli(tmp_path / "two", empty_store, strategy, ["--gpus", "2"])
    # only rank 0 opened an MLflow run, printed the result and wrote the checkpoint (one, above)
    assert len(two["runs"]) == 1 and two["runs"][0].data.tags["world_size"] == "2"
    assert two["stdout"].count("accuracy matrix") == 1
    assert two["checkpoint"]["run_id"] == two["runs"][0].info.run_id
    assert np.array_equal(one["checkpoint"]["acc_matrix"].numpy(), two["checkpoint"]["acc_matrix"].numpy(),
                          equal_nan=True)
    exact = [k for k in one["metrics"] if not k.startswith(("perf/", "train/", "wall", "system/"))]
    assert {"acc_avg", "acc/task_1"} <= set(exact)
    if strategy == "l2p":  # selection statistics are reduced over the ranks
        assert {"task_id_acc", "l2p/distinct_prompts", "l2p/distinct_prompts_eval"} <= set(exact)
        assert torch.equal(one["checkpoint"]["strategy_state"]["stats.train_counts"],
                           two["checkpoint"]["strategy_state"]["stats.train_counts"])
    for key in exact:
        assert one["metrics"][key] == two["metrics"][key], key
    for (step, loss), (step2, loss2) in zip(one["metrics"]["train/loss"], two["metrics"]["train/loss"]):
        assert step == step2 and loss == pytest.approx(loss2, rel=1e-5)
    for key, weights in one["checkpoint"]["strategy_state"].items():  # equal up to float rounding
        torch.testing.assert_close(two["checkpoint"]["strategy_state"][key], weights, rtol=1e-4, atol=1e-5)


def test_one_process_run_killed_then_resumed_on_two(tmp_path, empty_store, one_process):
    """A run killed during its second task and resumed with --gpus 2 ends as the uninterrupted run."""
    folder = tmp_path / "victim"
    folder.mkdir()
    shutil.copyfile(empty_store, folder / "mlflow.db")
    stderr = folder / "stderr.txt"
    args = [a for a in RUN if a != "--no-progress"]  # the progress bar tells when task 2 starts
    victim = subprocess.Popen([sys.executable, "-m", "clframe", *args, "--strategy", "linear", "--tracking-uri",
                               f"sqlite:///{folder}/mlflow.db", "--set", f"checkpoint_dir={folder}/ckpt"],
                              cwd=folder, env=dict(os.environ, OMP_NUM_THREADS="1", **ENV),
                              stdout=subprocess.DEVNULL, stderr=stderr.open("w"))
    wait_for_text(stderr, "task 2/2", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    checkpoint = next((folder / "ckpt").glob("*/last.pt"))
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["tasks_done"] == 1

    resumed = clframe_subprocess(["run", "--resume", checkpoint.parent.name, "--set", f"checkpoint_dir={folder}/ckpt",
                                  "--gpus", "2", "--no-progress"], cwd=folder, timeout=240, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("accuracy matrix") == 1 and "after task 1/2" in resumed.stdout
    final = torch.load(checkpoint, map_location="cpu", weights_only=True)
    one = one_process("linear")["checkpoint"]
    assert final["tasks_done"] == 2
    assert np.array_equal(final["acc_matrix"].numpy(), one["acc_matrix"].numpy(), equal_nan=True)
    for key, weights in one["strategy_state"].items():
        torch.testing.assert_close(final["strategy_state"][key], weights, rtol=1e-4, atol=1e-5)
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed run went on, on 2 processes


# ----- batchwise selection across ranks -----
POOL, TOP_N = 10, 3


def crafted_ids() -> torch.Tensor:
    """[8, 3] ids whose halves vote differently from the whole: rank 0's majority is {0, 1, 2},
    rank 1's {5, 6, 7}, the global one {3, 4, ...} (present in both halves)."""
    first = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, 3], [1, 2, 4]])
    second = torch.tensor([[5, 6, 3], [5, 7, 4], [6, 7, 3], [5, 6, 4]])
    return torch.cat([first, second])


def global_queries() -> tuple[torch.Tensor, "PromptPool"]:  # noqa: F821 - imported lazily
    from clframe.prompt_pool import PromptPool

    torch.manual_seed(0)
    pool = PromptPool(POOL, 16, TOP_N, (2, 16), key_index="torch")
    return torch.randn(33, 16), pool


def _select_rank(rank: int, world: int, init: str, out: str) -> None:
    from clframe import distributed
    from clframe.prompt_pool import batch_majority

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ids = crafted_ids()
        first, end = distributed.shard(0, len(ids))
        crafted = batch_majority(ids[first:end], POOL, TOP_N)
        queries, pool = global_queries()
        first, end = distributed.shard(0, len(queries))
        selected = pool.select(queries[first:end], "batch")
        torch.save({"crafted": crafted, "selected": selected, "rows": (first, end)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batchwise_selection_is_global(tmp_path):
    from clframe.prompt_pool import batch_majority

    ids = crafted_ids()
    expected = batch_majority(ids, POOL, TOP_N)
    assert set(expected.tolist()) >= {3, 4}
    assert not set(batch_majority(ids[:4], POOL, TOP_N).tolist()) & {5, 6, 7}  # a local vote would differ
    queries, pool = global_queries()
    expected_selected = pool.select(queries, "batch")
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_select_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    rows = []
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["crafted"], expected)
        first, end = result["rows"]
        rows.append((first, end))
        assert torch.equal(result["selected"], expected_selected[first:end])
    assert rows == [(0, 17), (17, 33)]


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    from clframe import distributed

    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched() and distributed.world() == 1 and distributed.is_main()
    assert distributed.shard(5, 9) == (5, 9)
    value = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(value) is value and value.tolist() == [1.0, 2.0]
    with distributed.session(torch.device("cpu")) as device:
        assert device == torch.device("cpu") and not distributed.active()
    assert os.environ.get("RANK") is None
