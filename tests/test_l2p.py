"""L2P: selection, masking, pull term and prompted forward against hand-worked values; only
prompts/keys/head train; the backbone is untouched; an offline CLI run learns and logs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from clframe.config import ResolvedConfig, RunConfig, build_section, resolve_config
from clframe.engine import Engine
from clframe.errors import ClframeError
from clframe.prompt_pool import PromptPool, SelectionStats, batch_majority, task_credit
from conftest import clframe_subprocess, tiny_run_options
from clframe.scenarios.base import CLASS_IL, Experience, Stream
from clframe.scenarios.split_cifar100 import SplitCifar100Config
from clframe.strategies.base import Batch, ForwardOutput, StreamInfo
from clframe.strategies.l2p import L2P, L2PConfig

TINY = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, weight_init="moco")


def make_l2p(n_classes=4, n_tasks=2, **overrides) -> L2P:
    torch.manual_seed(0)
    config = build_section(L2PConfig, dict({"pool_size": 4, "prompt_length": 3, "top_n": 2}, **overrides), "l2p")
    run = RunConfig(model_kwargs=TINY, image_size=16, normalize=False)
    info = StreamInfo(CLASS_IL, n_classes, [f"c{i}" for i in range(n_classes)], None, n_tasks)
    return L2P(config, run, info)


def experience(task_id, classes, n=8, seed=0):
    g = torch.Generator().manual_seed(seed + task_id)
    labels = torch.tensor(classes).repeat(n // len(classes))
    images = torch.randint(0, 256, (len(labels), 3, 16, 16), dtype=torch.uint8, generator=g)
    return Experience(task_id, list(classes), images, labels, images.clone(), labels.clone())


def pool_with_keys(keys, top_n):
    pool = PromptPool(len(keys), len(keys[0]), top_n, (1, len(keys[0])), key_index="torch")
    with torch.no_grad():
        pool.keys.copy_(torch.tensor(keys, dtype=torch.float32))
    return pool


# ----- selection, hand-worked -----
def test_top_n_per_image_by_cosine():
    # keys point at 0, 90, 180, 45 degrees (lengths differ: only the direction counts)
    pool = pool_with_keys([[1, 0], [0, 3], [-2, 0], [1, 1]], top_n=2)
    queries = torch.tensor([[1.0, 0.1], [0.0, 5.0], [-1.0, -0.2]])
    assert pool.select(queries, "image").tolist() == [[0, 3], [1, 3], [2, 1]]
    # query 0 · keys: cos to [1,1] is (1.1/sqrt(1.01))/sqrt(2) = 0.774; to [1,0] 0.995
    sims = pool.similarity(queries)
    assert sims[0, 0].item() == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    assert sims[0, 3].item() == pytest.approx(1.1 / math.sqrt(1.01) / math.sqrt(2), abs=1e-6)


def test_batchwise_selection_takes_the_most_chosen():
    ids = torch.tensor([[0, 1], [1, 2], [1, 0], [3, 1]])  # counts: 0:2, 1:4, 2:1, 3:1
    assert batch_majority(ids, pool_size=5, n=2).tolist() == [1, 0]
    pool = pool_with_keys([[1, 0], [0, 3], [-2, 0], [1, 1]], top_n=2)
    queries = torch.tensor([[1.0, 0.1], [0.0, 5.0], [0.9, 0.5]])  # per image: [0,3], [1,3], [3,0]
    assert pool.select(queries, "batch").tolist() == [[3, 0]] * 3  # 3 chosen 3 times, 0 twice


def reference_majority(ids, pool_size, n):
    """l2p-pytorch's batchwise vote: topk over unique counts padded with zeros to the pool size."""
    prompt_id, id_counts = torch.unique(ids, return_counts=True, sorted=True)
    if prompt_id.shape[0] < pool_size:
        prompt_id = torch.cat([prompt_id, torch.full((pool_size - len(prompt_id),), int(ids.min()))])
        id_counts = torch.cat([id_counts, torch.zeros(pool_size - len(id_counts), dtype=torch.long)])
    return prompt_id[torch.topk(id_counts, k=n).indices]


def test_batchwise_ties_break_as_the_reference_does():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        pool_size, n = 10, 5
        batch = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.stack([torch.randperm(pool_size, generator=g)[:n] for _ in range(batch)])
        assert batch_majority(ids, pool_size, n).tolist() == reference_majority(ids, pool_size, n).tolist()


def test_pull_term_hand_worked():
    pool = pool_with_keys([[3, 4], [0, 2], [1, 0]], top_n=2)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([[0, 2], [0, 1]])
    # cosines: img0 -> key0 0.6, key2 1.0; img1 -> key0 0.8, key1 1.0; reduce_sim = 3.4 / 2
    torch.testing.assert_close(pool.key_similarity(query, ids), torch.tensor([[0.6, 1.0], [0.8, 1.0]]))
    assert pool.reduce_sim(query, ids).item() == pytest.approx(1.7)


def test_class_mask_and_loss_hand_worked():
    strategy = make_l2p(n_classes=4, train_mask="current")
    strategy.before_task(experience(0, [1, 3]))
    strategy.before_task(experience(1, [0, 2]))
    mask = strategy.train_class_mask()  # the current task's classes only, not all seen
    assert mask.tolist() == [True, False, True, False]
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0]])
    batch = Batch(torch.zeros(1, 3, 16, 16), torch.tensor([0]), 0, True)
    expected_ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.5)))  # classes 1 and 3 are -inf
    loss = strategy.loss(ForwardOutput(logits, torch.tensor(-0.1 * 1.7)), batch, mask)
    assert loss.item() == pytest.approx(expected_ce - 0.17, abs=1e-6)


def test_diversity_penalty_steers_away_from_used_prompts():
    pool = pool_with_keys([[1, 0], [0.9, 0.1], [0, 1]], top_n=1)
    stats = SelectionStats(n_tasks=2, pool_size=3)
    stats.observe_train(0, torch.tensor([[0], [0], [0]]))
    query = torch.tensor([[1.0, 0.0]])
    assert pool.select(query).tolist() == [[0]]
    assert pool.select(query, bias=-0.5 * stats.train_frequency(1)).tolist() == [[1]]


def test_task_credit_and_histogram():
    counts = torch.tensor([[5, 5, 0, 0], [0, 0, 5, 5], [5, 5, 0, 0]])  # tasks 0 and 2 use the same prompts
    ids = torch.tensor([[0, 1], [2, 3], [0, 2]])
    assert task_credit(ids, counts, 1).tolist() == pytest.approx([0.0, 1.0, 1 / 3])  # [0, 2] fits all tasks alike
    assert task_credit(ids, counts, 0).tolist() == pytest.approx([0.5, 0.0, 1 / 3])  # ties share the credit
    stats = SelectionStats(n_tasks=2, pool_size=3)
    stats.observe_train(0, torch.tensor([[0, 1], [0, 1]]))
    stats.observe_eval(0, torch.tensor([[0, 1], [1, 2]]), n_trained=1)
    assert stats.histogram_csv(1) == "prompt,train_task_0,eval_task_0\n0,2,1\n1,2,2\n2,0,1\n"
    assert stats.summary(0) == {"distinct_prompts": 2.0, "distinct_prompts_eval": 3.0}
    assert stats.task_id_accuracy() == {"task_id_acc": 100.0, "task_id_acc/task_0": 100.0}


def test_task_id_accuracy_per_test_set_and_unused_prompts_identify_nothing():
    stats = SelectionStats(n_tasks=2, pool_size=4)  # task 0 trained prompt 0, task 1 prompt 1; 2, 3 never
    stats.observe_train(0, torch.tensor([[0]] * 3))
    stats.observe_train(1, torch.tensor([[1]] * 3))
    assert task_credit(torch.tensor([[2], [3]]), stats.train_counts, 0).tolist() == [0.0, 0.0]  # not 1/2 each
    stats.observe_eval(0, torch.tensor([[0], [0], [0], [1]]), n_trained=2)  # 3 of 4 right
    stats.observe_eval(1, torch.tensor([[0], [2]]), n_trained=2)  # wrong, untrained prompt: none right
    assert stats.task_id_accuracy() == {"task_id_acc": 50.0, "task_id_acc/task_0": 75.0, "task_id_acc/task_1": 0.0}
    metrics, _ = stats.report(1, "l2p")
    assert metrics["task_id_acc/task_0"] == 75.0 and metrics["l2p/distinct_prompts"] == 1.0
    assert stats.task_id_accuracy() == {}  # report starts a fresh evaluation round


def test_builtin_defaults_are_the_reference_settings():
    config = resolve_config({"scenario": "split_cifar100", "strategy": "l2p"}, None, [], SplitCifar100Config, L2PConfig)
    run, l2p = config.run, config.strategy
    assert (run.optimizer, run.lr, run.lr_batch_scale, run.batch_size, run.epochs) == ("adam", 0.03, True, 16, 5)
    assert (run.weight_decay, run.grad_clip, run.normalize, run.model) == (0.0, 1.0, False, "vit_base_patch16_224")
    assert (l2p.pool_size, l2p.prompt_length, l2p.top_n, l2p.pull_coef) == (10, 5, 5, 0.1)
    assert (l2p.train_mask, l2p.train_selection, l2p.eval_selection, l2p.head_input, l2p.diversity) == (
        "current", "batch", "image", "prompts", 0.0)


def test_config_checks():
    with pytest.raises(ClframeError, match="top_n"):
        build_section(L2PConfig, {"pool_size": 3, "top_n": 4}, "l2p")
    with pytest.raises(ClframeError, match="auto, torch, faiss"):
        build_section(L2PConfig, {"key_index": "annoy"}, "l2p")


# ----- the prompted forward -----
def test_prompted_forward_matches_a_hand_computation():
    strategy = make_l2p().eval()
    vit, pool = strategy.backbone, strategy.pool
    images = torch.rand(2, 3, 16, 16)
    ids = torch.tensor([[3, 1], [0, 2]])
    prompts = pool.prompts[ids].reshape(2, 6, 32)  # N·L = 2·3 tokens
    pos = vit.pos_embed  # [1, 1 + 4 patches, D]; every prompt slot carries the [CLS] position
    pos = torch.cat([pos[:, :1], pos[:, :1].expand(-1, 6, -1), pos[:, 1:]], dim=1)
    x = torch.cat([vit.cls_token.expand(2, -1, -1), prompts, vit.patch_embed(images)], dim=1) + pos
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)
    with torch.no_grad():
        torch.testing.assert_close(strategy.prompted_features(images, ids), x[:, 1:7].mean(dim=1))
        strategy.config.head_input = "cls"
        torch.testing.assert_close(strategy.prompted_features(images, ids), x[:, 0])
        strategy.config.head_input = "prompts"
        # forward = query -> selection -> prompted features -> head
        out = strategy(Batch(images, torch.tensor([0, 1]), 0, False))
        query = vit.forward_head(vit.forward_features(images), pre_logits=True)
        assert torch.equal(out.selected, pool.select(query, "image"))
        torch.testing.assert_close(out.logits, strategy.head(strategy.prompted_features(images, out.selected)))


def test_training_loss_matches_a_reference_style_computation():
    """The reference's recipe (docs/design.md) written out step by step: query, top-N, batchwise vote, prompted
    sequence with extended position embedding, prompt-mean head, masked CE - 0.1 * reduce_sim."""
    strategy = make_l2p(n_classes=4, train_mask="current").train()
    strategy.before_task(experience(0, [1, 2]))
    vit, pool = strategy.backbone, strategy.pool
    images, labels = torch.rand(5, 3, 16, 16), torch.tensor([1, 2, 2, 1, 1])
    with torch.no_grad():
        query = vit.forward_head(vit.forward_features(images), pre_logits=True)
    normed_q = query * torch.rsqrt(torch.clamp(query.pow(2).sum(1, keepdim=True), min=1e-12))
    keys = pool.keys
    normed_k = keys * torch.rsqrt(torch.clamp(keys.pow(2).sum(1, keepdim=True), min=1e-12))
    per_image = torch.topk(normed_q @ normed_k.t(), k=2, dim=1).indices
    major = reference_majority(per_image, 4, 2)
    ids = major.expand(5, -1)
    prompts = pool.prompts[ids].reshape(5, 6, 32)
    pos = torch.cat([vit.pos_embed[:, :1], vit.pos_embed[:, :1].expand(-1, 6, -1), vit.pos_embed[:, 1:]], dim=1)
    x = torch.cat([vit.cls_token.expand(5, -1, -1), prompts, vit.patch_embed(images)], dim=1) + pos
    x = vit.norm(vit.blocks(x))
    logits = strategy.head(x[:, 1:7].mean(dim=1))
    logits = logits.index_fill(1, torch.tensor([0, 3]), float("-inf"))
    reduce_sim = (normed_k[ids] * normed_q.unsqueeze(1)).sum() / 5
    expected = F.cross_entropy(logits, labels) - 0.1 * reduce_sim
    batch = Batch(images, labels, 0, True)
    out = strategy(batch)
    assert out.selected.tolist() == ids.tolist()
    torch.testing.assert_close(strategy.loss(out, batch, strategy.train_class_mask()), expected)


def test_only_prompts_keys_and_head_get_gradients():
    strategy = make_l2p(train_mask="current").train()
    strategy.before_task(experience(0, [0, 1]))
    batch = Batch(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), 0, True)
    out = strategy(batch)
    assert out.selected.shape == (4, 2) and (out.selected == out.selected[0]).all()  # batchwise at training
    strategy.loss(out, batch, strategy.train_class_mask()).backward()
    with_grad = {name for name, p in strategy.named_parameters() if p.grad is not None}
    assert with_grad == {"pool.prompts", "pool.keys", "head.weight", "head.bias"}
    assert {n for n, p in strategy.named_parameters() if p.requires_grad} == with_grad
    assert strategy.count_trainable() == 4 * 3 * 32 + 4 * 32 + 32 * 4 + 4
    chosen = set(out.selected[0].tolist())
    assert all((strategy.pool.prompts.grad[i].abs().sum() > 0) == (i in chosen) for i in range(4))
    assert strategy.head.weight.grad[2:].abs().sum() == 0  # masked classes get nothing
    # keys learn from the pull term only
    strategy.zero_grad(set_to_none=True)
    strategy.config.pull_coef = 0.0
    out = strategy(batch)
    strategy.loss(out, batch, strategy.train_class_mask()).backward()
    assert strategy.pool.keys.grad is None or strategy.pool.keys.grad.abs().sum() == 0


def test_engine_run_keeps_the_backbone_bit_identical_and_reports_selection():
    strategy = make_l2p(n_classes=4, n_tasks=2, train_mask="current")
    before = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    prompts_before = strategy.pool.prompts.detach().clone()
    stream = Stream("tiny", CLASS_IL, [f"c{i}" for i in range(4)], [experience(0, [0, 1]), experience(1, [2, 3])])
    run = RunConfig(model_kwargs=TINY, image_size=16, normalize=False, epochs=2, batch_size=4, lr=0.05,
                    train_aug=True, progress=False, device="cpu")
    logged = []
    engine = Engine(ResolvedConfig(run, None, strategy.config), stream, strategy, torch.device("cpu"),
                    lambda values, step: logged.append((step, values)))
    engine.run_all()
    after = strategy.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(prompts_before, strategy.pool.prompts.detach())
    task_rows = [values for step, values in logged if "acc_avg" in values]
    assert len(task_rows) == 2
    for values in task_rows:
        assert 1 <= values["l2p/distinct_prompts"] <= 4 and 0 <= values["task_id_acc"] <= 100
    csv = engine.last_report.artifacts["prompt_selection.csv"].splitlines()
    assert csv[0] == "prompt,train_task_0,train_task_1,eval_task_0,eval_task_1" and len(csv) == 5
    train_counts = np.array([[int(v) for v in row.split(",")[1:3]] for row in csv[1:]])
    assert (train_counts.sum(axis=0) == 2 * 8 * 2).all()  # epochs x images x top_n per task
    eval_counts = np.array([[int(v) for v in row.split(",")[3:]] for row in csv[1:]])
    assert (eval_counts.sum(axis=0) == 8 * 2).all()


def test_eval_selection_batch_reproduces_the_reference_protocol():
    strategy = make_l2p(eval_selection="batch").eval()
    strategy.before_task(experience(0, [0, 1]))
    with torch.no_grad():
        out = strategy(Batch(torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.long), 0, False))
    assert (out.selected == out.selected[0]).all()


# ----- end to end -----
def test_offline_cli_run_learns_and_logs_to_mlflow(tmp_path):
    args = ["run", "--strategy", "l2p", *tiny_run_options(tmp_path), "--set", "epochs=3", "--set", "lr=0.1",
            "--set", "lr_batch_scale=false"]
    result = clframe_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "l2p"
    assert run.data.params["l2p.pool_size"] == "10" and run.data.params["l2p.eval_selection"] == "image"
    assert run.data.params["n_trainable_params"] == str(10 * 5 * 32 + 10 * 32 + 32 * 10 + 10)
    final = client.get_metric_history(run.info.run_id, "acc_avg")
    assert sorted(m.step for m in final) == [0, 1, 2, 3, 4]
    assert max(final, key=lambda m: m.step).value > 15.0  # chance over 10 seen classes is 10%
    for key in ("task_id_acc", "l2p/distinct_prompts", "l2p/distinct_prompts_eval"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 5, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "task_4")}
    assert "task_4/prompt_selection.csv" in artifacts
