"""Seeds and the field's metrics: --seeds runs and their parent's aggregates, acc_seen/acc_inc_avg on
unequal test sets, eval_classes, the references' class orders, sweep-file field types, the UI tag."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from clframe.cli import cli
from clframe.config import ResolvedConfig, RunConfig
from clframe.engine import Engine
from clframe.errors import ClframeError
from clframe.scenarios.base import CLASS_IL, Experience, Stream, class_order
from clframe.strategies.base import ForwardOutput, Strategy, StrategyConfig, StreamInfo
from clframe.sweep import plan_sweep
from clframe.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from conftest import TINY_SETS

# ----- acc_seen, acc_inc_avg and eval_classes on a stream with unequal test sets -----
# Logits are a_c * x + b_c of an image's mean brightness x in [0, 1]. Among classes 0/1 the
# prediction is 0 below x = 0.5 and 1 above; over all four classes, class 3 (constant 1.0) wins
# on 0.25 < x < 0.75 although it is not seen until task 1.
SLOPES = np.array([-4.0, 4.0, 0.0, 0.0])
BIASES = np.array([2.0, -2.0, 0.5, 1.0])
TEST = {0: ([0.1, 0.4, 0.6, 0.9], [0, 0, 1, 1]),  # task 0: 4 test images
        1: ([0.5] * 10, [3] * 6 + [2] * 4)}  # task 1: 10 test images


class FixedLogits(Strategy):
    """Nothing to train: the engine skips the loop, and evaluation is a known function of the image."""

    def forward(self, batch):
        x = batch.images.float().mean(dim=(1, 2, 3)).double()
        return ForwardOutput(x[:, None] * torch.from_numpy(SLOPES) + torch.from_numpy(BIASES))

    def input_spec(self):
        return 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def constant_images(brightness: list[float]) -> torch.Tensor:
    values = torch.tensor([round(b * 255) for b in brightness], dtype=torch.uint8)
    return values[:, None, None, None].expand(-1, 3, 4, 4).contiguous()


def unequal_stream() -> Stream:
    experiences = []
    for task, classes in ((0, [0, 1]), (1, [2, 3])):
        brightness, labels = TEST[task]
        experiences.append(Experience(task, classes, constant_images([0.5]), torch.tensor([classes[0]]),
                                      constant_images(brightness), torch.tensor(labels)))
    return Stream("unequal", CLASS_IL, ["a", "b", "c", "d"], experiences)


def hand_accuracy(task: int, seen: list[int] | None) -> float:
    """The argmax of the same logits in numpy, over ``seen`` classes (None: every class)."""
    brightness, labels = TEST[task]
    x = np.array([round(b * 255) / 255 for b in brightness])
    logits = x[:, None] * SLOPES + BIASES
    if seen is not None:
        logits[:, [c for c in range(4) if c not in seen]] = -np.inf
    return 100.0 * np.mean(logits.argmax(axis=1) == np.array(labels))


@pytest.mark.parametrize("eval_classes", ["seen", "all"])
def test_acc_seen_weighs_samples_and_eval_classes_all_predicts_unseen_classes(eval_classes):
    run = RunConfig(eval_classes=eval_classes, progress=False, compile="off", amp="off", device="cpu")
    config = ResolvedConfig(run, None, StrategyConfig())
    stream = unequal_stream()
    strategy = FixedLogits(config.strategy, run, StreamInfo(CLASS_IL, 4, stream.class_names, None, 2))
    logged = {}
    engine = Engine(config, stream, strategy, torch.device("cpu"), lambda values, step: logged.setdefault(step, values))
    matrix = engine.run_all()

    after_0 = hand_accuracy(0, [0, 1] if eval_classes == "seen" else None)
    assert matrix[0, 0] == pytest.approx(after_0)
    assert matrix[1, 0] == pytest.approx(hand_accuracy(0, None))
    assert matrix[1, 1] == pytest.approx(hand_accuracy(1, None))
    # By hand: seen -> task 0 is 100% (x < .5 is 0, else 1); all -> class 3 takes 0.4 and 0.6: 50%.
    assert after_0 == (100.0 if eval_classes == "seen" else 50.0)
    assert (matrix[1, 0], matrix[1, 1]) == (50.0, 60.0)
    final = logged[1]
    assert final["acc_avg"] == pytest.approx((50 + 60) / 2)
    assert final["acc_seen"] == pytest.approx(100 * (2 + 6) / (4 + 10))  # 8 of the 14 test images
    assert final["acc_seen"] != pytest.approx(final["acc_avg"])
    assert logged[0]["acc_seen"] == pytest.approx(after_0)
    assert final["acc_inc_avg"] == pytest.approx((after_0 + 100 * 8 / 14) / 2)


# ----- class orders -----
def test_named_class_orders_match_the_references():
    # PyCIL/LAMDA-PILOT utils/data_manager.py: np.random.seed(1993); np.random.permutation(100): the
    # CIFAR-100 order their logs print, starting as below.
    assert class_order(100, seed=0, named="pycil")[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    # l2p-pytorch datasets.py split_single_dataset: range(nb_classes), shuffled only with --shuffle (default False).
    assert class_order(100, seed=5, named="l2p")[:10] == list(range(10))
    assert class_order(10, seed=3) == class_order(10, seed=3, named="seed") != class_order(10, seed=4)
    assert class_order(4, 0, named=[3, 1, 0, 2]) == [3, 1, 0, 2]


def test_explicit_class_orders_are_checked(tmp_path):
    (tmp_path / "order.txt").write_text("3, 1\n0 2\n")
    assert class_order(4, 0, named=str(tmp_path / "order.txt")) == [3, 1, 0, 2]
    for bad, message in (([3, 1, 1, 2], r"repeated \[1\]; missing \[0\]"), ("nope", "neither seed, pycil, l2p"),
                         ([0, 1, 2, 7], r"out of range \[7\]")):
        with pytest.raises(ClframeError, match=message):
            class_order(4, 0, named=bad)
    with pytest.raises(ClframeError, match="shuffle_classes=false"):
        class_order(4, 0, shuffle=False, named="pycil")


# ----- sweep files and --seeds -----
def test_sweep_fields_are_typed_and_seeds_expand_every_child(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: paper\nfail_fast: no\nseeds: [0, 1]\nruns: [{strategy: linear}, {strategy: bitfit}]\n")
    plan = plan_sweep(["linear"], str(sweep))
    assert plan.fail_fast is False and plan.name == "paper" and plan.seeds == [0, 1]
    assert [(c.strategy, c.seed, c.sets) for c in plan.children] == [
        ("linear", 0, ["seed=0"]), ("linear", 1, ["seed=1"]), ("bitfit", 0, ["seed=0"]), ("bitfit", 1, ["seed=1"])]
    assert [c.seed for c in plan_sweep(["linear"], str(sweep), seeds=[7]).children] == [7, 7]  # --seeds wins
    for text, message in (("name: 3\nruns: [{}]\n", "'name' must be a non-empty string"),
                          ("fail_fast: maybe\nruns: [{}]\n", "wants true or false"),
                          ("seeds: [0, 0]\nruns: [{}]\n", "distinct seeds"),
                          ("seeds: [1]\nruns: [{set: {seed: 2}}]\n", "set twice"),
                          ("runs: [{strategy: 3}]\n", "'strategy' must be a string")):
        sweep.write_text(text)
        with pytest.raises(ClframeError, match=message):
            plan_sweep(["linear"], str(sweep))
    with pytest.raises(ClframeError, match="--seed and --seeds"):
        CliRunner().invoke(cli, ["run", "--seeds", "0,1", "--seed", "3"], catch_exceptions=False)
    for item in ("seed=3", "run.seed=3"):  # not silently overridden by each child's seed
        with pytest.raises(ClframeError, match="--set seed=N and --seeds"):
            CliRunner().invoke(cli, ["run", "--seeds", "0,1", "--set", item], catch_exceptions=False)


def test_seeds_run_children_under_a_parent_that_logs_their_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a sample well within a short run
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(cli, ["run", "--seeds", "0,1", *TINY_SETS, "--set", "split_digits.n_tasks=2",
                                      "--set", "class_order=pycil", "--tracking-uri", uri, "--run-name", "seeds",
                                      "--set", f"checkpoint_dir={tmp_path}/ckpt"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clframe")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens on runs, not GenAI traces
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "seeds")
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.params["run.seed"]))
    assert [r.data.params["run.seed"] for r in children] == ["0", "1"] and parent.data.tags["clframe.seeds"] == "0,1"
    for key in ("acc_avg", "acc_seen", "forgetting"):
        per_child = np.array([[m.value for m in sorted(client.get_metric_history(c.info.run_id, key),
                                                       key=lambda m: m.step)] for c in children])
        mean = sorted(client.get_metric_history(parent.info.run_id, key), key=lambda m: m.step)
        std = sorted(client.get_metric_history(parent.info.run_id, f"{key}_std"), key=lambda m: m.step)
        assert [m.step for m in mean] == [0, 1]
        assert [m.value for m in mean] == pytest.approx(per_child.mean(axis=0).tolist())
        assert [m.value for m in std] == pytest.approx(per_child.std(axis=0, ddof=1).tolist())

    child = children[0].info.run_id
    assert any(key.startswith("system/cpu") for key in client.get_run(child).data.metrics)
    order = json.loads(Path(client.download_artifacts(child, "class_order.json", str(tmp_path))).read_text())
    assert order["class_order"] == "pycil" and order["order"] == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    assert order["tasks"] == [[4, 2, 7, 6, 0], [3, 5, 8, 9, 1]]

    grouped = json.loads(CliRunner().invoke(cli, ["compare", "--tracking-uri", uri, "--group-by", "strategy",
                                                  "--format", "json"], catch_exceptions=False).stdout)
    assert len(grouped) == 1 and grouped[0]["n"] == 2 and grouped[0]["seeds"] == "0,1" and grouped[0]["note"] == ""
    assert grouped[0]["acc_avg_mean"] == pytest.approx(parent.data.metrics["acc_avg"])
