"""Issue 22: the pre-trained-model baselines (SimpleCIL, APER, RanPAC, EASE, SLCA) and their shared
class statistics. Prototypes are class means and SimpleCIL predicts by a hand-computed cosine;
RanPAC's head is torch.linalg.lstsq's ridge solution and its lambda a brute-force search's; SLCA
samples from its stored Gaussians (fixed seed) and keeps old head rows frozen; APER's module is
bit-identical after task 0; every strategy runs on split_digits and rotated_digits with its
defaults and logs to MLflow; a run resumed mid-stream equals the uninterrupted one."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from clframe import checkpoint, runner
from clframe.class_stats import ClassStatistics
from clframe.config import resolve_config
from clframe.engine import Engine
from clframe.fastpath import compile_blocks
from clframe.models import frozen_features
from clframe.ptm import RIDGE_GRID, choose_ridge, ridge_weights
from clframe.registry import SCENARIOS, STRATEGIES
from conftest import TINY_MODEL_KWARGS

PTM = ["simplecil", "aper", "ranpac", "ease", "slca"]
TINY = [f"model_kwargs={TINY_MODEL_KWARGS}", "image_size=16", "epochs=1", "progress=false"]
SHORT = {"split_digits": ["split_digits.n_tasks=2"], "rotated_digits": ["rotated_digits.angles=[0, 90]"]}


def resolve(name: str, scenario: str = "split_digits", *sets: str, tmp: Path | None = None):
    where = [f"tracking_uri=sqlite:///{tmp}/mlflow.db", f"checkpoint_dir={tmp}/ckpt"] if tmp else []
    return resolve_config({"scenario": scenario, "strategy": name}, None, [*TINY, *SHORT[scenario], *where, *sets],
                          SCENARIOS.get(scenario).config_cls, STRATEGIES.get(name).config_cls)


def engine_for(name: str, *sets: str, scenario: str = "split_digits", on_task_end=None) -> Engine:
    config = resolve(name, scenario, *sets)
    stream = runner.build_stream(config)
    strategy = runner.build_strategy(config, stream)
    return Engine(config, stream, strategy, torch.device("cpu"), lambda values, step: None, on_task_end)


def features_of(engine: Engine, experience, fn) -> torch.Tensor:
    engine.strategy.eval()
    with torch.no_grad():
        return torch.cat([fn(b.images) for b in engine.strategy.task_batches(experience)])


# ----- the shared class statistics -----
def test_class_statistics_equal_direct_computation_and_survive_a_state_round_trip():
    x, y = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 3
    stats = ClassStatistics(4, 6, covariance=True, ridge=True)
    for rows in (slice(0, 17), slice(17, 50)):
        stats.update(x[rows], y[rows])
    x64 = x.double()
    assert stats.counts.tolist() == [17, 17, 16, 0]
    for c in range(3):
        assert torch.allclose(stats.means()[c], x64[y == c].mean(0))
        assert torch.allclose(stats.covariance(c), torch.cov(x64[y == c].T))
    assert torch.equal(stats.means()[3], torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(stats.gram, x64.T @ x64)
    assert torch.allclose(stats.class_sums, x64.T @ F.one_hot(y, 4).double())
    copy = ClassStatistics(4, 6, covariance=True, ridge=True)
    copy.load_state_dict(stats.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), stats.state_dict().values()))
    with pytest.raises(ValueError):
        ClassStatistics(4, 6).load_state_dict(stats.state_dict())  # covariances and Gram were not kept there


# ----- SimpleCIL -----
def test_simplecil_prototypes_are_class_means_and_prediction_is_the_cosine_by_hand():
    engine = engine_for("simplecil")
    engine.run_all()
    strategy = engine.strategy
    assert strategy.count_trainable() == 0 and engine.state.epochs_done == 0  # no training loop at all
    for experience in engine.stream.experiences:
        feats = features_of(engine, experience, lambda images: frozen_features(strategy.backbone, images))
        for c in experience.classes:
            assert torch.allclose(strategy.prototypes[c], feats[experience.train_labels == c].mean(0), atol=1e-5)
    batch = next(strategy.prepared_batches(engine.stream.experiences[0].test_images[:20],
                                           engine.stream.experiences[0].test_labels[:20]))
    f = frozen_features(strategy.backbone, batch.images)
    by_hand = (f / f.norm(dim=1, keepdim=True)) @ (strategy.prototypes / strategy.prototypes.norm(dim=1, keepdim=True)).T
    logits = strategy(batch).logits
    assert torch.allclose(logits, by_hand, atol=1e-5) and torch.equal(logits.argmax(1), by_hand.argmax(1))


# ----- RanPAC -----
def test_ranpac_head_is_the_lstsq_ridge_solution_over_both_tasks():
    engine = engine_for("ranpac", "ranpac.projection_dim=40")
    engine.run_all()
    strategy = engine.strategy
    h = torch.cat([features_of(engine, e, strategy.features) for e in engine.stream.experiences]).double()
    y = F.one_hot(torch.cat([e.train_labels for e in engine.stream.experiences]), 10).double()
    lam = strategy.chosen_ridge
    augmented = torch.cat([h, lam ** 0.5 * torch.eye(h.shape[1], dtype=torch.float64)])
    target = torch.cat([y, torch.zeros(h.shape[1], 10, dtype=torch.float64)])
    solution = torch.linalg.lstsq(augmented, target).solution.T
    assert torch.allclose(strategy.head.double(), solution, rtol=1e-4, atol=1e-5 * solution.abs().max())
    assert torch.allclose(ridge_weights(strategy.stats.gram, strategy.stats.class_sums, lam), solution,
                          rtol=1e-6, atol=1e-8 * solution.abs().max())


@pytest.mark.parametrize("rows,width", [(120, 12), (30, 50)])  # the primal and the dual path
def test_ranpac_lambda_choice_equals_a_brute_force_search(rows, width):
    g = torch.Generator().manual_seed(rows)
    h = torch.relu(torch.randn(rows, width, generator=g, dtype=torch.float64))
    y = F.one_hot(torch.randint(0, 4, (rows,), generator=g), 4).double()
    y = y + 0.5 * h[:, :4]  # make the targets partly predictable, so a middle lambda wins
    chosen, losses = choose_ridge(h, y)
    n_fit = int(rows * 0.8)
    brute = []
    for lam in RIDGE_GRID:  # the reference's loop: solve per lambda, MSE on the held-out rows
        w = torch.linalg.solve(h[:n_fit].T @ h[:n_fit] + lam * torch.eye(width, dtype=torch.float64),
                               h[:n_fit].T @ y[:n_fit]).T
        brute.append(float(F.mse_loss(h[n_fit:] @ w.T, y[n_fit:])))
    assert chosen == RIDGE_GRID[int(np.argmin(brute))]
    assert np.allclose(losses[6:], brute[6:], rtol=1e-6)  # lambda >= 0.01: well conditioned


# ----- SLCA -----
def test_slca_alignment_samples_from_the_stored_gaussians_with_a_fixed_seed():
    config = resolve("slca", "split_digits", "slca.samples_per_class=6000")
    strategy = runner.build_strategy(config, runner.build_stream(config))
    g = torch.Generator().manual_seed(1)
    dim = strategy.stats.dim
    mixing = torch.randn(2, dim, dim, generator=g) / dim ** 0.5
    for c in (3, 7):
        strategy.stats.update(torch.randn(400, dim, generator=g) @ mixing[c % 2] + c, torch.full((400,), c))
    strategy.home[3], strategy.home[7], strategy._task_id = 0, 1, 1
    samples, labels = strategy.sample_features([3, 7], torch.Generator().manual_seed(5))
    again, _ = strategy.sample_features([3, 7], torch.Generator().manual_seed(5))
    assert torch.equal(samples, again) and sorted(labels.bincount().nonzero().squeeze(1).tolist()) == [3, 7]
    for c, scale in ((3, 0.9 + 0.1 * 1 / 2), (7, 0.9 + 0.1 * 2 / 2)):
        drawn = samples[labels == c].double()
        assert torch.allclose(drawn.mean(0), strategy.stats.means()[c] * scale, atol=0.06)
        expected = strategy.stats.covariance(c) + 1e-4 * torch.eye(dim, dtype=torch.float64)
        assert torch.allclose(torch.cov(drawn.T), expected, atol=0.08)


def test_slca_keeps_old_head_rows_and_evaluates_with_the_aligned_copy():
    rows = {}
    engine = engine_for("slca", on_task_end=lambda i, e: rows.setdefault(i, e.strategy.head.weight.detach().clone()))
    engine.run_all()
    strategy = engine.strategy
    old = engine.stream.experiences[0].classes
    assert torch.equal(rows[1][old], rows[0][old])  # frozen while task 1 trained
    assert not torch.equal(strategy.aligned_weight, strategy.head.weight)  # aligned after task 1


# ----- APER -----
def test_aper_adapts_during_task_0_only():
    snapshots = {}

    def keep(i, engine):
        snapshots[i] = {k: v.clone() for k, v in engine.strategy.adapters.state_dict().items()}

    engine = engine_for("aper", on_task_end=keep)
    before = {k: v.clone() for k, v in engine.strategy.adapters.state_dict().items()}
    engine.run_all()
    assert any(not torch.equal(before[k], snapshots[0][k]) for k in before)  # it trained on task 0
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in before)  # bit-identical after
    assert engine.strategy.count_trainable() == 0
    assert engine.strategy.prototypes.shape[1] == 2 * engine.strategy.backbone.embed_dim


def test_ssf_at_identity_is_the_frozen_model_and_its_last_shift_moves_the_features():
    config = resolve("aper", "split_digits", "aper.peft=ssf")
    strategy = runner.build_strategy(config, runner.build_stream(config))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for scale, shift in zip(strategy.ssf.scales, strategy.ssf.shifts):
            scale.fill_(1.0), shift.zero_()
        frozen = frozen_features(strategy.backbone, images)
        assert torch.allclose(strategy.ssf.features(strategy.backbone, images), frozen, atol=1e-5)
        strategy.ssf.shifts[-1].fill_(1.0)  # after the final norm: every pooled feature + 1
        assert torch.allclose(strategy.ssf.features(strategy.backbone, images), frozen + 1, atol=1e-5)
    assert torch.allclose(frozen_features(strategy.backbone, images), frozen)  # no hook stays behind


def test_ssf_is_kept_when_the_blocks_are_compiled():
    """The GPU fast path compiles the blocks; a graph traced without SSF's hooks (the frozen features
    APER computes first) must not be reused for SSF's features (torch's skip_nnmodule_hook_guards)."""
    config = resolve("aper", "split_digits", "aper.peft=ssf")
    strategy = runner.build_strategy(config, runner.build_stream(config))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for shift in strategy.ssf.shifts:
            shift.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        eager = strategy.ssf.features(strategy.backbone, images)
        frozen = frozen_features(strategy.backbone, images)
        assert not torch.allclose(eager, frozen, atol=1e-3)
        compile_blocks(strategy.backbone, backend="eager")  # the GPU fast path's compilation, without Inductor
        assert torch.allclose(frozen_features(strategy.backbone, images), frozen, atol=1e-5)  # traced hook-free
        assert torch.allclose(strategy.ssf.features(strategy.backbone, images), eager, atol=1e-5)


# ----- every strategy, end to end -----
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for both scenarios (creating a sqlite store takes seconds)."""
    return tmp_path_factory.mktemp("ptm_mlflow")


@pytest.mark.parametrize("scenario", ["split_digits", "rotated_digits"])
def test_every_strategy_runs_with_its_defaults_and_logs_to_mlflow(scenario, store):
    tmp_path = store
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for name in PTM:
        result = runner.run_experiment(resolve(name, scenario, tmp=tmp_path), echo=lambda line: None)
        chance = 100 / (5 if scenario == "split_digits" else 10)  # class-IL: 5 classes seen per task on average
        assert result.summary["acc_avg"] > chance, (name, result.acc_matrix)
        metrics = client.get_run(result.run_id).data.metrics
        assert "acc_avg" in metrics
        if name != "slca":
            assert metrics["prototype_norm/mean"] > 0, name
    assert metrics_of(client, tmp_path, "ranpac")["ranpac/projection_dim"] == round(10000 * 32 / 768)


def metrics_of(client: MlflowClient, tmp_path: Path, strategy: str) -> dict:
    runs = client.search_runs([client.get_experiment_by_name("clframe").experiment_id],
                              f"tags.strategy = '{strategy}'", order_by=["start_time DESC"])
    return runs[0].data.metrics


# ----- resume -----
@pytest.mark.parametrize("name", ["ranpac", "ease", "slca"])
def test_resume_after_task_0_equals_the_uninterrupted_run(name, tmp_path):
    payloads = {}

    def save(i, engine):
        payloads[i] = {"tasks_done": engine.state.tasks_done, "epochs_done": engine.state.epochs_done,
                       "acc_matrix": torch.from_numpy(engine.state.acc_matrix.copy()),
                       "strategy_state": engine.strategy.trainable_state(), "cl_state": engine.strategy.cl_state(),
                       "extra_state": engine.strategy.extra_state(), "rng": checkpoint.rng_state()}

    full = engine_for(name, on_task_end=save)
    full.run_all()
    path = tmp_path / "task0.pt"
    checkpoint.save_atomic(payloads[0], path)
    resumed = engine_for(name)
    runner.restore(resumed, torch.load(path, weights_only=True), path)
    resumed.run_all()
    assert np.array_equal(resumed.state.acc_matrix, full.state.acc_matrix, equal_nan=True)
    for key, value in full.strategy.trainable_state().items():
        assert torch.equal(resumed.strategy.trainable_state()[key], value), key
    stats_full, stats_resumed = full.strategy.extra_state()["stats"], resumed.strategy.extra_state()["stats"]
    for a, b in zip(stats_full if isinstance(stats_full, list) else [stats_full],
                    stats_resumed if isinstance(stats_resumed, list) else [stats_resumed]):
        assert all(torch.equal(a[k], b[k]) for k in a)
