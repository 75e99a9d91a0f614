"""Rehearsal and regularisation baselines: the buffer's selection rules, each method's loss terms
against a hand computation, resume with a non-empty buffer, and offline runs logged to MLflow."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from clframe import checkpoint, runner, tracking
from clframe.config import resolve_config
from clframe.engine import Engine
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES
from clframe.rehearsal import RehearsalBuffer, herding_order
from clframe.scenarios.base import DOMAIN_IL
from clframe.scenarios.split_digits import DIGIT_NAMES
from clframe.strategies.base import Batch, ForwardOutput, Replay, StreamInfo
from clframe.strategies.icarl import nme_logits
from clframe.strategies.lwf import distillation
from conftest import TINY_MODEL_KWARGS

NEW = ["er", "der", "derpp", "icarl", "gdumb", "ewc", "lwf"]
REHEARSAL = {"er", "der", "derpp", "icarl", "gdumb"}
# Two tasks, and most digits held out for testing: few training images keep EWC's per-image Fisher cheap.
SCENARIO_SETS = {"split_digits": ["split_digits.n_tasks=2", "split_digits.test_fraction=0.8"],
                 "rotated_digits": ["rotated_digits.angles=[0, 90]", "rotated_digits.test_fraction=0.8"]}


def resolve(name: str, scenario: str = "split_digits", *sets: str):
    values = [f"model_kwargs={TINY_MODEL_KWARGS}", "image_size=16", "epochs=1", "progress=false", "device=cpu",
              *SCENARIO_SETS[scenario], *sets]
    return resolve_config({"scenario": scenario, "strategy": name}, None, values, SCENARIOS.get(scenario).config_cls,
                          STRATEGIES.get(name).config_cls)


def build(name: str, *sets: str, kind: str = DOMAIN_IL):
    config = resolve(name, "split_digits", *sets)
    torch.manual_seed(0)
    return STRATEGIES.get(name).obj(config.strategy, config.run, StreamInfo(kind, 10, list(DIGIT_NAMES), None, 2))


def toy_images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 1, 1).contiguous()


# ----- the buffer -----
def test_reservoir_keeps_every_sample_with_probability_budget_over_seen():
    capacity, seen, trials = 10, 50, 1500
    kept = torch.zeros(seen)
    first_wins_check = torch.zeros(20)
    for trial in range(trials):
        buffer = RehearsalBuffer(capacity)
        buffer.reseed(trial, torch.device("cpu"))
        for first in range(0, seen, 7):  # batches of 7: slots drawn twice within a batch
            ids = torch.arange(first, min(first + 7, seen))
            buffer.add_reservoir(toy_images(len(ids)), ids, 0)
        assert buffer.size == capacity and len(set(buffer.labels[:capacity].tolist())) == capacity
        kept[buffer.labels[:capacity]] += 1
        single = RehearsalBuffer(4)  # one batch of 20 into 4 slots: the later sample of a slot must win
        single.reseed(10_000 + trial, torch.device("cpu"))
        single.add_reservoir(toy_images(20), torch.arange(20), 0)
        first_wins_check[single.labels[:4]] += 1
    rate, sd = kept / trials, math.sqrt(0.2 * 0.8 / trials)
    assert (rate - capacity / seen).abs().max() < 4.5 * sd
    assert ((first_wins_check / trials) - 4 / 20).abs().max() < 4.5 * math.sqrt(0.2 * 0.8 / trials)


def test_herding_picks_equal_a_hand_computation():
    # mean 3. pick 1: |3 - f| = 3, 2, 0, 5 -> index 2 (value 3). pick 2: |3 - (3 + f)/2| = 1.5, 1, -, 2.5 -> index 1.
    # pick 3: |3 - (4 + f)/3| = 1.67, -, -, 1 -> index 3. Then index 0.
    features = torch.tensor([[0.0], [1.0], [3.0], [8.0]])
    assert herding_order(features, 3).tolist() == [2, 1, 3]
    assert herding_order(features, 10).tolist() == [2, 1, 3, 0]


def test_class_balanced_sampler_evicts_from_the_largest_class():
    buffer = RehearsalBuffer(6)
    buffer.reseed(0, torch.device("cpu"))
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    buffer.add_balanced(toy_images(len(labels)), labels, 0)
    assert buffer.histogram(3) == [2, 2, 2]
    state = buffer.state_dict()
    again = RehearsalBuffer(6)
    again.load_state_dict(state, torch.device("cpu"))
    assert torch.equal(again.contents()[0], buffer.contents()[0]) and again.histogram(3) == [2, 2, 2]


def test_a_budget_must_be_given_once():
    with pytest.raises(ClframeError, match="exactly one of er.buffer_size"):
        build("er", "er.buffer_size=100")  # per_class is 10 by default
    assert build("er", "er.buffer_size=100", "er.per_class=0").buffer.capacity == 100
    assert build("er").buffer.capacity == 100  # 10 per class x 10 classes


# ----- loss terms by hand -----
def test_derpp_loss_terms_equal_a_hand_computation():
    strategy = build("derpp", "derpp.alpha=0.3", "derpp.beta=0.7")
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0],          # current rows
                           [1.0, 2.0, 3.0], [0.0, 0.0, 0.0],           # replay batch 1 (MSE)
                           [3.0, 1.0, 0.0], [0.0, 4.0, 1.0]])          # replay batch 2 (CE)
    stored = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, -1.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    labels = torch.tensor([0, 2, 1, 1, 0, 1])
    batch = Batch(torch.zeros(6, 3, 1, 1), labels, 0, True, n_current=2,
                  replay=Replay(torch.zeros(4, 3, 1, 1, dtype=torch.uint8), labels[2:], stored))
    terms = strategy.loss_terms(ForwardOutput(logits), batch, None)

    def ce(row, y):
        return -(row[y] - row.exp().sum().log())

    assert torch.allclose(terms["ce"], (ce(logits[0], 0) + ce(logits[1], 2)) / 2)
    assert torch.allclose(terms["mse"], ((0 ** 2 + 1 + 2 ** 2) + (0 + 1 + 1)) / 6 * torch.ones(()))
    assert torch.allclose(terms["replay_ce"], (ce(logits[4], 0) + ce(logits[5], 1)) / 2)
    der = build("der")  # beta 0: one replay batch, all of it in the MSE
    batch.replay = Replay(batch.replay.images[:2], labels[2:4], stored[:2])
    batch.labels, logits = labels[:4], logits[:4]
    der_terms = der.loss_terms(ForwardOutput(logits), batch, None)
    assert torch.allclose(der_terms["mse"], terms["mse"]) and der_terms["replay_ce"] == 0


def test_lwf_distillation_equals_a_hand_computation_on_the_old_classes():
    student, teacher, t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]]), 2.0
    expected = 0.0
    for s, q in zip(student, teacher):
        p = [math.exp(v / t) / sum(math.exp(w / t) for w in q) for v in q]
        log_r = [v / t - math.log(sum(math.exp(w / t) for w in s)) for v in s]
        expected -= sum(pi * li for pi, li in zip(p, log_r)) / 2
    assert math.isclose(float(distillation(student, teacher, t)), expected, rel_tol=1e-6)

    lwf = build("lwf", "lwf.trainable=head", "lwf.alpha=0.5", kind="class_il")
    lwf.old_classes, lwf._seen = torch.tensor([1, 3]), [1, 3, 5]
    lwf.keep_teacher()
    batch = Batch(torch.rand(3, 3, 16, 16), torch.tensor([1, 5, 3]), 1, True)
    old_logits = lwf(batch).logits.detach()
    with torch.no_grad():
        lwf.net.head.weight.add_(0.5)
    out = lwf(batch)
    mask = lwf.train_class_mask()
    ce = F.cross_entropy(out.logits.masked_fill(~mask, float("-inf")), batch.labels)
    hand = ce + 0.5 * distillation(out.logits[:, [1, 3]], old_logits[:, [1, 3]], 2.0)
    assert torch.allclose(lwf.loss(out, batch, mask), hand)


def test_ewc_fisher_and_penalty_equal_a_hand_computation():
    ewc = build("ewc", "ewc.trainable=head", "ewc.e_lambda=3")
    batch = Batch(torch.rand(4, 3, 16, 16), torch.tensor([0, 3, 3, 9]), 0, False)
    with torch.no_grad():
        features = ewc.features(batch)
        p = F.softmax(ewc.net.head(features), dim=1)
    residual = F.one_hot(batch.labels, 10).float() - p  # d log p_y / d logits
    weight = p[torch.arange(4), batch.labels]
    hand_w = (weight[:, None, None] * (residual[:, :, None] * features[:, None, :]) ** 2).mean(0)
    hand_b = (weight[:, None] * residual ** 2).mean(0)
    fisher = ewc.fisher_diagonal([batch])
    assert torch.allclose(fisher["net.head.weight"], hand_w, atol=1e-6)
    assert torch.allclose(fisher["net.head.bias"], hand_b, atol=1e-6)
    ewc.fisher, ewc.anchor = fisher, {k: v.detach().clone() for k, v in ewc.trainable_named().items()}
    with torch.no_grad():
        ewc.net.head.weight.add_(0.1)
        ewc.net.head.bias.sub_(0.2)
    hand_penalty = 3 * (hand_w.sum() * 0.01 + hand_b.sum() * 0.04)
    assert torch.allclose(ewc.penalty(), hand_penalty, rtol=1e-4)


def test_icarl_predicts_the_nearest_mean_of_exemplars():
    # features (3, 4) -> (0.6, 0.8): squared distances 0.8 to (1, 0) and 0.4 to (0, 1)
    logits = nme_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[-0.8, -0.4]]))
    icarl = build("icarl", "icarl.trainable=head")
    batch = Batch(torch.rand(5, 3, 16, 16), torch.zeros(5, dtype=torch.long), 0, False)
    icarl.class_means = F.normalize(torch.randn(10, icarl.net.head.in_features), dim=1)
    with torch.no_grad():
        features = F.normalize(icarl.features(batch), dim=1)
        hand = -((features[:, None, :] - icarl.class_means[None]) ** 2).sum(-1)
        assert torch.allclose(icarl(batch).logits, hand, atol=1e-5)
        batch.training = True  # training still reads the network's head
        assert torch.allclose(icarl(batch).logits, icarl.net(batch).logits)


def test_a_peft_trainable_set_leaves_the_backbone_frozen_and_out_of_the_checkpoint():
    er = build("er", "er.trainable=adapter", "er.network={dim: 4}")
    trainable = {n for n, p in er.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("net.mlp_adapters.", "net.head.")) for n in trainable)
    assert er.net.mlp_adapters[0].down.out_features == 4
    assert not any(k.startswith("backbone.") for k in er.trainable_state())
    assert any(k.startswith("backbone.") for k in build("er").trainable_state())  # trainable: all


def test_rehearsal_refuses_several_processes_before_torchrun_starts_and_in_each_rank(monkeypatch):
    """Under torchrun each rank would fill its own buffer from its shard (see strategies/baseline.py)."""
    from click.testing import CliRunner

    from clframe import cli, distributed
    from conftest import TINY_SETS

    def launched(nproc):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr(cli, "_launch_torchrun", launched)
    result = CliRunner().invoke(cli.cli, ["run", "--strategy", "derpp", "--gpus", "2", "--device", "cpu", *TINY_SETS])
    assert result.exit_code == 1 and str(result.exception) == (
        "strategy derpp: rehearsal strategies run on one process: drop --gpus (or run it without torchrun)")
    monkeypatch.setattr(distributed, "world", lambda: 2)  # a rank of torchrun started by hand
    with pytest.raises(ClframeError, match="strategy gdumb: rehearsal strategies run on one process"):
        build("gdumb")
    assert build("lwf").count_trainable() > 0  # no buffer: not refused


# ----- resume -----
class StopAfterFirstTask(Exception):
    pass


def engine_for(name: str, on_task_end=None, scenario: str = "split_digits") -> Engine:
    config = resolve(name, scenario)
    stream = runner.build_stream(config)
    return Engine(config, stream, runner.build_strategy(config, stream), torch.device("cpu"), lambda *_: None,
                  on_task_end)


@pytest.mark.parametrize("name, scenario", [("derpp", "split_digits"), ("icarl", "split_digits"),
                                            ("gdumb", "split_digits"), ("ewc", "rotated_digits"),
                                            ("lwf", "split_digits")])
def test_resume_after_a_task_with_a_full_buffer_equals_the_uninterrupted_run(name, scenario, tmp_path):
    whole = engine_for(name, scenario=scenario)
    expected = whole.run_all()
    path = tmp_path / "last.pt"

    def save_and_stop(i: int, engine: Engine) -> None:
        strategy = engine.strategy
        checkpoint.save_atomic({"version": checkpoint.FORMAT_VERSION, "tasks_done": engine.state.tasks_done,
                                "epochs_done": engine.state.epochs_done,
                                "acc_matrix": torch.from_numpy(engine.state.acc_matrix.copy()),
                                "strategy_state": strategy.trainable_state(), "cl_state": strategy.cl_state(),
                                "extra_state": strategy.extra_state(), "rng": checkpoint.rng_state()}, path)
        raise StopAfterFirstTask

    with pytest.raises(StopAfterFirstTask):
        engine_for(name, save_and_stop, scenario).run_all()
    saved = checkpoint.load(path)  # weights_only: the buffer is plain tensors
    if name in REHEARSAL:
        assert saved["extra_state"]["buffer"]["size"] > 0
    resumed = engine_for(name, scenario=scenario)
    runner.restore(resumed, saved, path)
    np.testing.assert_array_equal(resumed.run_all(), expected)  # NaN above the diagonal in both
    if name in REHEARSAL:
        assert torch.equal(resumed.strategy.buffer.contents()[0], whole.strategy.buffer.contents()[0])


# ----- offline runs, logged -----
def test_every_new_strategy_runs_on_a_domain_il_stream():
    for name in NEW:
        engine = engine_for(name, scenario="rotated_digits")
        matrix = engine.run_all()
        assert np.isfinite(matrix[1]).all()
        if name in REHEARSAL:
            assert sum(engine.strategy.buffer.histogram(10)) == 100  # every class, 10 per class of the stream
            assert min(engine.strategy.buffer.histogram(10)) > 0


def test_every_new_strategy_runs_offline_with_its_defaults_and_logs_to_mlflow(tmp_path, monkeypatch):
    scenario = "split_digits"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.MlflowTracker, "log_heatmap", lambda *args, **kwargs: None)  # matplotlib's time
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    for name in NEW:
        config = resolve(name, scenario, f"tracking_uri={uri}", f"checkpoint_dir={tmp_path}/ckpt")
        result = runner.run_experiment(config, echo=lambda _: None)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and math.isfinite(result.summary["acc_avg"])
        if name in REHEARSAL:
            params, capacity = run.data.params, 100
            assert params["buffer_capacity"] == str(capacity)
            row = 3 * 8 * 8  # the stored uint8 digits
            assert int(params["buffer_bytes"]) == capacity * (row + 24 + (40 if name in {"der", "derpp"} else 0))
            histogram = Path(client.download_artifacts(result.run_id, "task_1/buffer_histogram.csv", str(tmp_path)))
            counts = [int(line.split(",")[2]) for line in histogram.read_text().splitlines()[1:]]
            assert 0 < sum(counts) <= capacity
