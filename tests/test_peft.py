"""The parameter-efficient strategies: exactly the intended parameters train and the frozen ones
stay bit-identical through a real run logged to MLflow; every strategy runs on another timm ViT
and a domain-IL stream; VPT-Deep replaces its prompts per block; an empty prefix is the frozen
model; a user's class runs through the CLI by dotted path; the README's parameter table computes."""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from clframe import runner
from clframe.config import resolve_config
from clframe.engine import Engine
from clframe.models import frozen_features
from clframe.registry import STRATEGIES
from conftest import TINY_MODEL_KWARGS, clframe_subprocess, tiny_run_options
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience, Stream
from clframe.scenarios.split_digits import DIGIT_NAMES, SplitDigitsConfig, load_digits_uint8
from clframe.strategies.base import Batch, StreamInfo

REPO = Path(__file__).resolve().parents[1]
PEFT = ["vpt_shallow", "vpt_deep", "prefix", "adapter", "bitfit", "partial_k", "mlp_k", "side_tuning"]
# Another ViT than conftest's: register tokens, average pooling (fc_norm), no qkv bias, odd width.
OTHER_VIT = "{patch_size: 8, depth: 3, embed_dim: 48, num_heads: 3, reg_tokens: 2, global_pool: avg, " \
            "qkv_bias: false, weight_init: moco}"

HEAD = {"head.weight", "head.bias"}
BLOCK = {f"{layer}.{kind}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
         for kind in ("weight", "bias")}


def bottlenecks(name: str, depth: int = 2) -> set[str]:
    return {f"{name}.{i}.{layer}.{kind}" for i in range(depth) for layer in ("down", "up") for kind in ("weight", "bias")}


def weights_and_biases(prefix: str, indices) -> set[str]:
    return {f"{prefix}.{i}.{kind}" for i in indices for kind in ("weight", "bias")}


# (strategy, --set overrides) -> the full set of trainable parameter names on the tiny 2-block ViT.
EXPECTED = {
    ("vpt_shallow", ()): {"prompts"} | HEAD,
    ("vpt_deep", ()): {"prompts"} | HEAD,
    ("prefix", ()): {"prefix"} | HEAD,
    ("prefix", ("prefix.reparam_hidden=8",)): {"prefix_embedding"} | weights_and_biases("reparam", (0, 2)) | HEAD,
    ("adapter", ()): bottlenecks("mlp_adapters") | HEAD,
    ("adapter", ("adapter.position=sequential", "adapter.sublayers=attn_mlp")):
        bottlenecks("mlp_adapters") | bottlenecks("attn_adapters") | HEAD,
    ("bitfit", ()): {f"backbone.blocks.{i}.{name}" for i in range(2) for name in BLOCK if name.endswith("bias")}
        | {"backbone.patch_embed.proj.bias", "backbone.norm.bias"} | HEAD,
    ("partial_k", ()): {f"backbone.blocks.1.{name}" for name in BLOCK} | {"backbone.norm.weight", "backbone.norm.bias"}
        | HEAD,
    ("partial_k", ("partial_k.k=0",)): {"backbone.norm.weight", "backbone.norm.bias"} | HEAD,
    ("mlp_k", ()): weights_and_biases("head", (0, 2, 4, 6, 8)),  # Linear, ReLU, LayerNorm, Dropout, ...
    ("side_tuning", ()): weights_and_biases("side", (0, 1, 3, 4, 6, 7)) | {"side_projection.weight", "alpha_logit"}
        | HEAD,
}


def resolve(name: str, *sets: str, model_kwargs: str = TINY_MODEL_KWARGS):
    values = [f"model_kwargs={model_kwargs}", "image_size=16", "epochs=1", "progress=false", "split_digits.n_tasks=2",
              *sets]
    return resolve_config({"scenario": "split_digits", "strategy": name}, None, values, SplitDigitsConfig,
                          STRATEGIES.get(name).config_cls)


def build(name: str, *sets: str, kind: str = CLASS_IL, **kwargs):
    config = resolve(name, *sets, **kwargs)
    torch.manual_seed(0)
    info = StreamInfo(kind, 10, list(DIGIT_NAMES), None, 2)
    return STRATEGIES.get(name).obj(config.strategy, config.run, info), config


def trainable_names(strategy) -> set[str]:
    return {n for n, p in strategy.named_parameters() if p.requires_grad}


def snapshot(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.state_dict().items()}


def assert_trained_only_trainable(strategy, before: dict[str, torch.Tensor]) -> None:
    trainable, after = trainable_names(strategy), strategy.state_dict()
    assert [k for k in before if k not in trainable and not torch.equal(before[k], after[k])] == []
    assert [k for k in trainable if torch.equal(before[k], after[k])] == []  # each trainable tensor moved


def test_every_peft_strategy_is_registered():
    assert set(PEFT) <= set(STRATEGIES.names())
    assert {name for name, _ in EXPECTED} == set(PEFT)


@pytest.mark.parametrize("name, sets", list(EXPECTED), ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_exactly_the_intended_parameters_get_gradients(name, sets):
    strategy, _ = build(name, *sets)
    assert trainable_names(strategy) == EXPECTED[name, sets]
    batch = Batch(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), 0, True)
    strategy.train()
    strategy.loss(strategy(batch), batch, None).backward()
    assert {n for n, p in strategy.named_parameters() if p.grad is not None} == EXPECTED[name, sets]
    assert strategy.count_trainable() == sum(p.numel() for n, p in strategy.named_parameters() if n in EXPECTED[name, sets])


@pytest.fixture(scope="module")
def tracking_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.mark.parametrize("name", PEFT)
def test_offline_run_logs_metrics_and_keeps_frozen_weights(name, tracking_dir, monkeypatch):
    monkeypatch.chdir(tracking_dir)  # MLflow puts a sqlite store's artifacts under ./mlruns
    built = {}

    def build_and_keep(config, stream):
        built["strategy"] = strategy = build_strategy(config, stream)
        built["before"] = snapshot(strategy)
        return strategy

    build_strategy = runner.build_strategy
    monkeypatch.setattr(runner, "build_strategy", build_and_keep)
    uri = f"sqlite:///{tracking_dir}/mlflow.db"
    config = resolve(name, f"tracking_uri={uri}", f"checkpoint_dir={tracking_dir}/ckpt", "device=cpu")
    result = runner.run_experiment(config, echo=lambda _: None)
    strategy = built["strategy"]
    assert_trained_only_trainable(strategy, built["before"])
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == name
    assert run.data.params["n_trainable_params"] == str(strategy.count_trainable())
    for key in ("acc_avg", "forgetting", "trainable_params"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [0, 1]
    assert client.get_metric_history(result.run_id, "trainable_params")[0].value == strategy.count_trainable()


def tiny_domain_stream() -> Stream:
    """Two domains of the same ten digit classes: as they are, and inverted."""
    images, labels = load_digits_uint8()
    images, labels = images[:240], labels[:240]
    experiences = [Experience(task, list(range(10)), domain[:200], labels[:200], domain[200:], labels[200:], name)
                   for task, (name, domain) in enumerate([("plain", images), ("inverted", 255 - images)])]
    return Stream("tiny_domains", DOMAIN_IL, list(DIGIT_NAMES), experiences, domain_names=["plain", "inverted"])


@pytest.mark.parametrize("name", PEFT)
def test_runs_on_another_vit_and_a_domain_il_stream(name):
    strategy, config = build(name, "batch_size=50", kind=DOMAIN_IL, model_kwargs=OTHER_VIT)
    before = snapshot(strategy)
    engine = Engine(config, tiny_domain_stream(), strategy, torch.device("cpu"), lambda values, step: None)
    acc_matrix = engine.run_all()
    assert acc_matrix.shape == (2, 2) and not np.isnan(acc_matrix[np.tril_indices(2)]).any()
    assert_trained_only_trainable(strategy, before)


def test_vpt_deep_replaces_prompts_at_every_block():
    strategy, _ = build("vpt_deep", "vpt_deep.length=3")
    strategy.eval()
    block_inputs = []
    for blk in strategy.backbone.blocks:
        blk.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0].detach()))
    strategy(Batch(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), 0, False))
    tokens = 1 + strategy.backbone.patch_embed.num_patches + 3  # [CLS], patches, this block's prompts only
    assert [x.shape[1] for x in block_inputs] == [tokens] * len(strategy.backbone.blocks)
    for i, x in enumerate(block_inputs):
        assert torch.equal(x[:, 1:4], strategy.prompts[i].detach().expand(2, -1, -1))


def test_prefix_of_length_zero_is_the_frozen_model():
    images = torch.rand(3, 3, 16, 16)
    batch = Batch(images, torch.zeros(3, dtype=torch.long), 0, False)
    empty, _ = build("prefix", "prefix.length=0")
    empty.eval()
    frozen = empty.head(frozen_features(empty.backbone, images))
    torch.testing.assert_close(empty(batch).logits, frozen, rtol=0, atol=1e-6)
    assert empty.count_trainable() == empty.head.weight.numel() + empty.head.bias.numel()
    prefixed, _ = build("prefix", "prefix.length=2")
    prefixed.eval()
    assert not torch.allclose(prefixed(batch).logits, prefixed.head(frozen_features(prefixed.backbone, images)))


def test_user_strategy_runs_by_dotted_path(tracking_dir):
    args = ["run", "--strategy", "examples.cosine_linear:CosineLinear", "--set",
            "examples.cosine_linear:CosineLinear.scale=10", "--set", "split_digits.n_tasks=2",
            "--experiment", "user_strategy", *tiny_run_options(tracking_dir)]  # reuses the module's MLflow store
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = clframe_subprocess(args, cwd=tracking_dir, env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking_dir}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("user_strategy").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["examples.cosine_linear:CosineLinear.scale"] == "10.0"
    assert run.data.params["n_trainable_params"] == str(10 * 32)  # cosine head: weights only, no bias


def test_param_count_table_is_computed(monkeypatch):
    spec = importlib.util.spec_from_file_location("param_counts", REPO / "bench" / "param_counts.py")
    param_counts = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "param_counts", param_counts)
    spec.loader.exec_module(param_counts)
    width, classes, length = 192, 100, 5  # vit_tiny_patch16_224, configs/vpt_shallow.yaml
    row = param_counts.count("vpt_shallow", "vit_tiny_patch16_224", classes)
    assert row.trainable == length * width + width * classes + classes
    table = param_counts.markdown([row], "vit_tiny_patch16_224", classes)
    assert "| `vpt_shallow` | 20,260 |" in table
