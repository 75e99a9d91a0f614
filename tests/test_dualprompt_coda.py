"""DualPrompt and CODA-Prompt: prefix attention against a hand computation (one block, and whole
prompted forwards with the intended key/value split), zero-length prompts, prompt-tuning, the
Gram–Schmidt initialisation, frozen earlier components, gradients, an untouched backbone, and
offline runs (continual and --joint) that learn and log task-identification accuracy."""
import math

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from clframe import runner
from clframe import vit as vit_ops
from clframe.config import ResolvedConfig, RunConfig, build_section, resolve_config
from clframe.engine import Engine
from clframe.errors import ClframeError
from clframe.models import frozen_features
from clframe.prefix_prompts import split_heads
from clframe.registry import STRATEGIES
from conftest import clframe_subprocess, tiny_run_options
from clframe.scenarios.base import CLASS_IL, Experience, Stream
from clframe.scenarios.split_cifar100 import SplitCifar100Config
from clframe.scenarios.split_digits import SplitDigitsConfig
from clframe.strategies.base import Batch, StreamInfo
from clframe.strategies.coda_prompt import CodaPrompt, component_weights, ortho_penalty, orthogonal_rows
from clframe.strategies.dualprompt import DualPrompt
from clframe.strategies.l2p import L2P

# The tests' tiny ViT with five blocks, so that the references' block layouts (G 0-1, E 2-4; CODA 0-4) fit.
DEEP_KWARGS = "{patch_size: 8, depth: 5, embed_dim: 32, num_heads: 2, weight_init: moco}"
DEEP = dict(patch_size=8, depth=5, embed_dim=32, num_heads=2, weight_init="moco")


def make(cls, n_classes=4, n_tasks=2, joint=False, **overrides):
    torch.manual_seed(0)
    config = build_section(cls.config_cls, overrides, cls.name)
    run = RunConfig(model_kwargs=DEEP, image_size=16, normalize=False, joint=joint)
    return cls(config, run, StreamInfo(CLASS_IL, n_classes, [f"c{i}" for i in range(n_classes)], None, n_tasks))


def experience(task_id, classes, n=8):
    g = torch.Generator().manual_seed(task_id)
    labels = torch.tensor(classes).repeat(n // len(classes))
    images = torch.randint(0, 256, (len(labels), 3, 16, 16), dtype=torch.uint8, generator=g)
    return Experience(task_id, list(classes), images, labels, images.clone(), labels.clone())


# ----- the forward written out by hand: per-head softmax attention over [prefix keys, token keys] -----
def hand_block(blk, x, prefix_k=None, prefix_v=None):
    attn, width = blk.attn, x.shape[-1]
    head_dim = width // attn.num_heads
    y = blk.norm1(x)
    q, k, v = (y @ attn.qkv.weight[i * width:(i + 1) * width].t() + attn.qkv.bias[i * width:(i + 1) * width]
               for i in range(3))
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1)
    heads = []
    for h in range(attn.num_heads):
        cut = slice(h * head_dim, (h + 1) * head_dim)
        weights = torch.softmax(q[..., cut] @ k[..., cut].transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        heads.append(weights @ v[..., cut])
    x = x + attn.proj(torch.cat(heads, dim=-1))
    return x + blk.mlp(blk.norm2(x))


def hand_logits(strategy, images, prefixes):
    """``prefixes``: {block: (key prefix [B, P, D], value prefix [B, P, D])}; the head reads [CLS]."""
    vit = strategy.backbone
    x = torch.cat([vit.cls_token.expand(len(images), -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed
    for index, blk in enumerate(vit.blocks):
        x = hand_block(blk, x, *prefixes.get(index, (None, None)))
    return strategy.head(vit.norm(x)[:, 0])


def test_prefix_attention_in_one_block_matches_a_hand_computation(monkeypatch):
    strategy = make(DualPrompt).eval()
    blk = strategy.backbone.blocks[3]
    x, prefix_k, prefix_v = torch.randn(2, 5, 32), torch.randn(2, 3, 32), torch.randn(2, 3, 32)  # per-image prefixes
    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        out = vit_ops.block(blk, x, split_heads(blk.attn, prefix_k), split_heads(blk.attn, prefix_v))
        torch.testing.assert_close(out, hand_block(blk, x, prefix_k, prefix_v))
    assert calls == [1]  # on the fused SDPA kernel
    assert out.shape == x.shape  # queries come from the tokens only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fused kernels are CUDA's)")
def test_prefix_attention_runs_on_a_fused_cuda_kernel():
    """With only the flash and memory-efficient kernels allowed, a math-kernel fallback would raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    blk = make(DualPrompt).eval().backbone.blocks[3].cuda()
    x, prefix_k, prefix_v = (torch.randn(2, n, 32, device="cuda") for n in (5, 3, 3))
    expected = hand_block(blk, x, prefix_k, prefix_v)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), \
            sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = vit_ops.block(blk, x, split_heads(blk.attn, prefix_k), split_heads(blk.attn, prefix_v))
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_dualprompt_forward_matches_a_hand_computation_with_the_intended_key_value_split():
    strategy = make(DualPrompt, n_tasks=3).eval()
    for task in range(2):
        strategy.before_task(experience(task, [2 * task, 2 * task + 1]))
    vit, pool, images = strategy.backbone, strategy.pool, torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        pool.prompts[1].normal_()  # task 1 started as a copy of E-prompt 0: make the two differ
        assert not torch.equal(pool.prompts[0], pool.prompts[1])
        query = frozen_features(vit, images)
        pool.keys[:2] = query[[1, 0]]  # image 0 -> E-prompt 1, image 1 -> E-prompt 0; key 2 is never trained yet
        pool.keys[2] = query[2]
        out = strategy(Batch(images, torch.zeros(3, dtype=torch.long), 0, False))
        ids = out.selected[:, 0]
        assert ids[:2].tolist() == [1, 0] and ids[2] in (0, 1)
        g, e = strategy.g_prompt, pool.prompts[ids]  # [2 blocks, 2, L, D], [B, 3 blocks, 2, L, D]
        prefixes = {block: (g[i, 0].expand(3, -1, -1), g[i, 1].expand(3, -1, -1)) for i, block in enumerate((0, 1))}
        # every image gets its E-prompt's key half as key prefix (upstream issue #8 mixes them within a batch)
        prefixes.update({block: (e[:, i, 0], e[:, i, 1]) for i, block in enumerate((2, 3, 4))})
        torch.testing.assert_close(out.logits, hand_logits(strategy, images, prefixes))


def test_dualprompt_trains_the_current_e_prompt_copied_from_the_last_and_pulls_its_key():
    strategy = make(DualPrompt, train_mask="current").train()
    strategy.before_task(experience(0, [0, 1]))
    pool = strategy.pool
    with torch.no_grad():
        pool.prompts[0] += 1.0  # as if task 0 had trained it
    keys = pool.keys.detach().clone()
    strategy.before_task(experience(1, [2, 3]))
    assert torch.equal(pool.prompts[1], pool.prompts[0]) and torch.equal(pool.keys, keys)  # keys are not copied
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 3, 2])
    batch = Batch(images, labels, 1, True)
    out = strategy(batch)
    assert out.selected.tolist() == [[1]] * 4
    cosine = F.cosine_similarity(frozen_features(strategy.backbone, images), pool.keys[1:2].detach())
    torch.testing.assert_close(out.extra_loss, -1.0 * cosine.sum() / 4)
    masked = out.logits.detach().index_fill(1, torch.tensor([0, 1]), float("-inf"))
    loss = strategy.loss(out, batch, strategy.train_class_mask())
    torch.testing.assert_close(loss, F.cross_entropy(masked, labels) + out.extra_loss)
    loss.backward()
    with_grad = {name for name, p in strategy.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in strategy.named_parameters() if p.requires_grad} == {
        "g_prompt", "pool.prompts", "pool.keys", "head.weight", "head.bias"}
    assert [bool(pool.prompts.grad[i].any()) for i in range(2)] == [False, True]
    assert [bool(pool.keys.grad[i].any()) for i in range(2)] == [False, True]
    assert not strategy.head.weight.grad[:2].any()  # other tasks' classes are masked


def test_dualprompt_test_time_selection():
    strategy = make(DualPrompt).eval()
    strategy.before_task(experience(0, [0, 1]))
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        strategy.pool.keys[1] = frozen_features(strategy.backbone, images)[0]  # the untrained key fits image 0 best
        batch = Batch(images, torch.zeros(5, dtype=torch.long), 0, False)
        assert strategy(batch).selected.tolist() == [[0]] * 5  # only task 0's key is searched so far
        strategy.config.eval_keys = "all"  # the reference searches every key
        assert strategy(batch).selected[0].tolist() == [1]
        strategy.config.eval_selection = "batch"
        selected = strategy(batch).selected
        assert (selected == selected[0]).all()


@pytest.mark.parametrize("cls, overrides", [(DualPrompt, dict(g_length=0, e_length=0)),
                                            (DualPrompt, dict(g_length=0, e_length=0, mode="tokens")),
                                            (CodaPrompt, dict(prompt_length=0, pool_size=4))],
                         ids=["dualprompt", "dualprompt-tokens", "coda"])
def test_zero_length_prompts_reproduce_the_frozen_model(cls, overrides):
    strategy = make(cls, **overrides).eval()
    strategy.before_task(experience(0, [0, 1]))
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        out = strategy(Batch(images, torch.zeros(3, dtype=torch.long), 0, False))
        torch.testing.assert_close(out.logits, strategy.head(frozen_features(strategy.backbone, images)))


def test_prompt_tuning_matches_the_reference_prepending_tokens():
    strategy = make(DualPrompt, mode="tokens", g_length=2, e_length=3).eval()
    strategy.before_task(experience(0, [0, 1]))
    vit, images = strategy.backbone, torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = strategy(Batch(images, torch.zeros(2, dtype=torch.long), 0, False))
        prompts = {0: strategy.g_prompt[0], 1: strategy.g_prompt[1]}
        prompts.update({block: strategy.pool.prompts[0, i] for i, block in enumerate((2, 3, 4))})
        x = vit_ops.embed(vit, images)
        for index, blk in enumerate(vit.blocks):  # dualprompt-pytorch: torch.cat([prompt, x], dim=1), no position term
            x = blk(torch.cat([prompts[index].expand(2, -1, -1), x], dim=1))
        torch.testing.assert_close(out.logits, strategy.head(vit.norm(x)[:, 2 * 2 + 3 * 3]))  # [CLS] after 13 tokens


# ----- CODA-Prompt -----
def test_coda_weights_and_prompted_forward_match_the_reference_formulas():
    strategy = make(CodaPrompt, pool_size=6).eval()
    strategy.before_task(experience(0, [0, 1]))
    strategy.before_task(experience(1, [2, 3]))
    vit, images = strategy.backbone, torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        query = frozen_features(vit, images)
        parts = [torch.cat(list(kind), dim=1) for kind in (strategy.components, strategy.keys, strategy.attention)]
        prefixes = {}
        for block, (components, keys, attention) in enumerate(zip(*parts)):  # reference zoo.py, per layer
            attended = F.normalize(torch.einsum("bd,kd->bkd", query, attention), dim=2)
            weights = torch.einsum("bkd,kd->bk", attended, F.normalize(keys, dim=1))
            torch.testing.assert_close(component_weights(query, keys[None], attention[None])[:, 0], weights)
            prompt = torch.einsum("bk,kld->bld", weights, components)
            prefixes[block] = (prompt[:, :4], prompt[:, 4:])  # length 8: 4 key, 4 value prefix tokens
        out = strategy(Batch(images, torch.zeros(3, dtype=torch.long), 1, False))
        torch.testing.assert_close(out.logits, hand_logits(strategy, images, prefixes))
    strategy.config.ortho_coef = 0.5
    out = strategy.train()(Batch(images, torch.zeros(3, dtype=torch.long), 1, True))
    eye = torch.eye(6)
    by_hand = sum(((x @ x.t() - eye) ** 2).mean() for kind in (parts[0].flatten(2), parts[1], parts[2]) for x in kind)
    torch.testing.assert_close(out.extra_loss, 0.5 * by_hand)
    assert ortho_penalty(torch.eye(3)[None]) == 0


def test_gram_schmidt_rows_are_orthogonal_to_every_earlier_one():
    earlier = torch.randn(7, 20)  # not orthogonal to each other, as trained components are not
    new = orthogonal_rows(earlier, 5)
    torch.testing.assert_close(new @ earlier.t(), torch.zeros(5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(new @ new.t(), torch.eye(5), atol=1e-6, rtol=0)
    torch.manual_seed(3)
    first = orthogonal_rows(torch.zeros(0, 6), 3)
    torch.manual_seed(3)
    draws, basis = torch.randn(6, 3, dtype=torch.float64).t(), []
    for v in draws:  # classical Gram-Schmidt, as the reference writes it
        u = v - sum(((v * b).sum() / (b * b).sum()) * b for b in basis)
        basis.append(u)
    torch.testing.assert_close(first, torch.stack([u / u.norm() for u in basis]).float())


def test_coda_new_task_components_are_orthogonal_to_all_earlier_ones():
    strategy = make(CodaPrompt, n_tasks=3, pool_size=9)
    strategy.before_task(experience(0, [0, 1]))
    with torch.no_grad():
        for kind in (strategy.components, strategy.keys, strategy.attention):
            kind[0] += 0.3 * torch.randn_like(kind[0])  # as if task 0 had trained them
    strategy.before_task(experience(1, [2, 3]))
    strategy.before_task(experience(2, [0, 3]))
    for kind in (strategy.components, strategy.keys, strategy.attention):
        for block in range(5):
            earlier = torch.cat([kind[0][block], kind[1][block]]).flatten(1)
            new = kind[2][block].detach().flatten(1)
            torch.testing.assert_close(new @ earlier.t(), torch.zeros(3, 6), atol=1e-5, rtol=0)
            torch.testing.assert_close(new @ new.t(), torch.eye(3), atol=1e-5, rtol=0)


def test_coda_gradients_reach_only_the_current_task_and_the_head():
    strategy = make(CodaPrompt, pool_size=4, ortho_coef=0.1).train()
    strategy.before_task(experience(0, [0, 1]))
    strategy.before_task(experience(1, [2, 3]))
    batch = Batch(torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 2, 3]), 1, True)
    strategy.loss(strategy(batch), batch, strategy.train_class_mask()).backward()
    expected = {"components.1", "keys.1", "attention.1", "head.weight", "head.bias"}
    assert {n for n, p in strategy.named_parameters() if p.grad is not None} == expected
    assert {n for n, p in strategy.named_parameters() if p.requires_grad} == expected
    assert strategy.count_trainable() == 5 * 2 * 8 * 32 + 2 * 5 * 2 * 32 + 32 * 4 + 4  # task 1's 2 components per block


def test_earlier_tasks_stay_bit_identical_and_the_backbone_untouched_over_a_run():
    strategy = make(CodaPrompt, n_classes=6, n_tasks=3, pool_size=6, train_mask="current")
    backbone = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    stream = Stream("tiny", CLASS_IL, [f"c{i}" for i in range(6)],
                    [experience(0, [0, 1]), experience(1, [2, 3]), experience(2, [4, 5])])
    run = RunConfig(model_kwargs=DEEP, image_size=16, normalize=False, epochs=1, batch_size=4, lr=0.05,
                    optimizer="adamw", weight_decay=0.5, progress=False, device="cpu")  # decay moves what it sees
    strategy.run_config = run  # the optimizer is the strategy's, built from its run config
    snapshots, initial = [], []
    before_task = strategy.before_task

    def keep_initial(exp):  # the task's fresh components, before any training step
        before_task(exp)
        initial.append({k: v.clone() for k, v in strategy.state_dict().items() if k.endswith(f".{exp.task_id}")})

    strategy.before_task = keep_initial
    engine = Engine(ResolvedConfig(run, None, strategy.config), stream, strategy, torch.device("cpu"),
                    lambda values, step: None,
                    lambda i, engine: snapshots.append({k: v.clone() for k, v in strategy.state_dict().items()
                                                        if not k.startswith("backbone.")}))
    engine.run_all()
    for task, snapshot in enumerate(snapshots):
        for name in ("components", "keys", "attention"):  # training moved the task's own parameters...
            assert not torch.equal(initial[task][f"{name}.{task}"], snapshot[f"{name}.{task}"])
        for later in snapshots[task + 1:]:  # ...and no later task moved them again
            for name in ("components", "keys", "attention"):
                assert torch.equal(snapshot[f"{name}.{task}"], later[f"{name}.{task}"])
    assert all(torch.equal(v, strategy.backbone.state_dict()[k]) for k, v in backbone.items())


def test_dualprompt_earlier_e_prompts_and_keys_stay_bit_identical_under_weight_decay():
    strategy = make(DualPrompt, n_classes=6, n_tasks=3, train_mask="current")
    stream = Stream("tiny", CLASS_IL, [f"c{i}" for i in range(6)],
                    [experience(0, [0, 1]), experience(1, [2, 3]), experience(2, [4, 5])])
    run = RunConfig(model_kwargs=DEEP, image_size=16, normalize=False, epochs=1, batch_size=4, lr=0.05,
                    optimizer="adamw", weight_decay=0.5, progress=False, device="cpu")
    strategy.run_config = run  # the optimizer is the strategy's, built from its run config
    snapshots = []
    engine = Engine(ResolvedConfig(run, None, strategy.config), stream, strategy, torch.device("cpu"),
                    lambda values, step: None,
                    lambda i, engine: snapshots.append({k: strategy.state_dict()[k].clone()
                                                        for k in ("pool.prompts", "pool.keys", "g_prompt")}))
    engine.run_all()
    for task, snapshot in enumerate(snapshots):
        for later in snapshots[task + 1:]:
            for name in ("pool.prompts", "pool.keys"):
                assert torch.equal(snapshot[name][task], later[name][task]), (name, task)
    assert not torch.equal(snapshots[0]["g_prompt"], snapshots[2]["g_prompt"])  # shared: trains on
    assert not torch.equal(snapshots[1]["pool.keys"][2], snapshots[2]["pool.keys"][2])  # task 2's key trained


def test_dualprompt_task_id_accuracy_follows_the_keys():
    strategy = make(DualPrompt, n_tasks=2)
    images = {t: torch.rand(1, 3, 16, 16).expand(4, -1, -1, -1) for t in range(2)}  # one image per test set
    for task in range(2):
        strategy.before_task(experience(task, [2 * task, 2 * task + 1]))
        with torch.no_grad():
            strategy.train()(Batch(images[task], torch.full((4,), 2 * task), task, True))
    queries = {t: frozen_features(strategy.backbone, images[t][:1])[0] for t in range(2)}

    def evaluate(key_of_task):
        with torch.no_grad():
            for t in range(2):
                strategy.pool.keys[t] = queries[key_of_task[t]]
            for t in range(2):
                strategy.eval()(Batch(images[t], torch.full((4,), 2 * t), t, False))
        return strategy.task_report().metrics

    right = evaluate({0: 0, 1: 1})
    assert (right["task_id_acc"], right["task_id_acc/task_0"], right["task_id_acc/task_1"]) == (100.0, 100.0, 100.0)
    swapped = evaluate({0: 1, 1: 0})  # each test set's nearest key is the other task's
    assert (swapped["task_id_acc"], swapped["task_id_acc/task_0"], swapped["task_id_acc/task_1"]) == (0.0, 0.0, 0.0)


# ----- configuration -----
def test_builtin_defaults_are_the_reference_settings():
    def resolve(name):
        return resolve_config({"scenario": "split_cifar100", "strategy": name}, None, [], SplitCifar100Config,
                              STRATEGIES.get(name).config_cls)

    dual = resolve("dualprompt")
    assert (dual.run.optimizer, dual.run.lr, dual.run.lr_batch_scale, dual.run.batch_size, dual.run.epochs) == (
        "adam", 0.03, True, 24, 5)
    assert (dual.run.grad_clip, dual.run.weight_decay, dual.run.normalize) == (1.0, 0.0, False)
    assert (dual.run.crop_scale_min, dual.run.test_crop) == (0.08, 0.875)
    d = dual.strategy
    assert (d.g_length, d.g_blocks, d.e_length, d.e_blocks, d.pool_size, d.mode, d.pull_coef, d.train_mask) == (
        5, [0, 1], 5, [2, 3, 4], 0, "prefix", 1.0, "current")
    coda = resolve("coda_prompt")
    assert (coda.run.optimizer, coda.run.lr, coda.run.lr_batch_scale, coda.run.batch_size, coda.run.epochs) == (
        "adam", 0.001, False, 128, 20)
    assert (coda.run.grad_clip, coda.run.normalize, coda.run.crop_scale_min, coda.run.test_crop) == (0.0, False, 0.08, 1.0)
    c = coda.strategy
    assert (c.pool_size, c.prompt_length, c.blocks, c.ortho_coef, c.train_mask) == (100, 8, [0, 1, 2, 3, 4], 0.0,
                                                                                   "current")


def test_config_checks_fail_in_one_line():
    with pytest.raises(ClframeError, match=r"blocks 0-4.*e_blocks=\[2, 3\]"):
        make(DualPrompt, e_blocks=[2, 3, 7])
    with pytest.raises(ClframeError, match="at most 32"):
        make(CodaPrompt)  # 100 components cannot be orthogonal in 32 dimensions
    with pytest.raises(ClframeError, match="even"):
        make(CodaPrompt, prompt_length=5)


def test_joint_makes_one_task():
    assert make(DualPrompt, n_tasks=5, joint=True).pool.size == 1
    assert make(DualPrompt, n_tasks=5).pool.size == 5
    coda = make(CodaPrompt, n_tasks=5, joint=True, pool_size=10)
    assert len(coda.components) == 1 and coda.per_task == 10


@pytest.mark.parametrize("cls", [DualPrompt, L2P])
@pytest.mark.parametrize("joint", [False, True])
def test_task_identification_accuracy_is_reported_unless_joint(cls, joint):
    strategy = make(cls, joint=joint, **({"pool_size": 4, "top_n": 2} if cls is L2P else {}))
    strategy.before_task(experience(0, [0, 1]))
    with torch.no_grad():
        strategy.train()(Batch(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), 0, True))
        strategy.eval()(Batch(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), 0, False))
    report = strategy.task_report()
    assert ("task_id_acc" in report.metrics) == (not joint)  # one trained task: nothing to identify
    assert report.metrics[f"{cls.name}/distinct_prompts_eval"] >= 1 and "prompt_selection.csv" in report.artifacts


# ----- end to end -----
@pytest.mark.parametrize("name, sets", [("dualprompt", ()),
                                        ("coda_prompt", ("coda_prompt.pool_size=10", "lr=0.01", "batch_size=32")),
                                        ("l2p", ("lr=0.1", "lr_batch_scale=false"))])
def test_offline_run_learns_and_logs(name, sets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts under ./mlruns
    built = {}

    def build_and_keep(config, stream):
        built["strategy"] = strategy = build_strategy(config, stream)
        built["backbone"] = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
        return strategy

    build_strategy = runner.build_strategy
    monkeypatch.setattr(runner, "build_strategy", build_and_keep)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    values = [f"model_kwargs={DEEP_KWARGS}", "image_size=16", "epochs=3", "progress=false", "device=cpu",
              f"tracking_uri={uri}", f"checkpoint_dir={tmp_path}/ckpt", *sets]
    config = resolve_config({"scenario": "split_digits", "strategy": name}, None, values, SplitDigitsConfig,
                            STRATEGIES.get(name).config_cls)
    result = runner.run_experiment(config, echo=lambda _: None)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == name
    final = client.get_metric_history(result.run_id, "acc_avg")
    assert sorted(m.step for m in final) == [0, 1, 2, 3, 4]
    assert max(final, key=lambda m: m.step).value > 15.0  # chance over the 10 classes seen is 10%
    task_id = client.get_metric_history(result.run_id, "task_id_acc")
    assert len(task_id) == (0 if name == "coda_prompt" else 5)
    assert all(0.0 <= m.value <= 100.0 for m in task_id)
    if name == "dualprompt":
        assert len(client.get_metric_history(result.run_id, "dualprompt/distinct_prompts_eval")) == 5
        assert "task_4/prompt_selection.csv" in {a.path for a in client.list_artifacts(result.run_id, "task_4")}
    after = built["strategy"].backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in built["backbone"].items())


def test_joint_cli_run_is_one_task_evaluated_on_every_task(tmp_path):
    args = ["run", "--strategy", "dualprompt", "--joint", *tiny_run_options(tmp_path),
            "--set", f"model_kwargs={DEEP_KWARGS}", "--set", "epochs=3"]
    result = clframe_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["run.joint"] == "True"
    for j in range(5):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"acc/task_{j}")] == [0]
    final = client.get_metric_history(run.info.run_id, "acc_avg")
    assert [m.step for m in final] == [0] and final[0].value > 15.0
    assert client.get_metric_history(run.info.run_id, "task_id_acc") == []  # one E-prompt: nothing to identify
    assert len(client.get_metric_history(run.info.run_id, "dualprompt/distinct_prompts")) == 1
