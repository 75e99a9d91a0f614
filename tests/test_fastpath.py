"""The GPU fast path is the same algorithm: checked on CPU with bf16 autocast and a tiny model."""
import numpy as np
import torch

from clframe.config import resolve_config
from clframe.engine import Engine
from clframe.fastpath import hold_frozen_in_bf16
from clframe.runner import build_stream, build_strategy
from conftest import TINY_MODEL_KWARGS
from clframe.scenarios.split_digits import SplitDigitsConfig
from clframe.strategies.linear import LinearConfig


def make_engine(sets):
    config = resolve_config(dict(scenario="split_digits", strategy="linear", progress=False), None,
                            [f"model_kwargs={TINY_MODEL_KWARGS}", "image_size=16", "split_digits.n_tasks=2",
                             "epochs=2", *sets], SplitDigitsConfig, LinearConfig)
    stream = build_stream(config)
    engine = Engine(config, stream, build_strategy(config, stream), torch.device("cpu"), lambda m, s: None)
    return engine


def test_frozen_bf16_casts_only_frozen_linear_and_conv():
    engine = make_engine(["amp=bf16", "frozen_bf16=true"])
    strategy = engine.strategy
    assert strategy.head.weight.dtype == torch.float32  # trainable: untouched
    assert strategy.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert strategy.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    assert strategy.backbone.blocks[0].norm1.weight.dtype == torch.float32  # norms stay fp32
    assert hold_frozen_in_bf16(torch.nn.Linear(2, 2)) == 0


def test_frozen_bf16_gives_the_same_products_under_autocast():
    plain, fast = make_engine(["amp=bf16", "frozen_bf16=false"]), make_engine(["amp=bf16", "frozen_bf16=true"])
    images = torch.randn(8, 3, 16, 16)
    from clframe.strategies.base import Batch
    batch = Batch(images, torch.zeros(8, dtype=torch.long), 0, False)
    with plain.autocast():
        expected = plain.strategy(batch).logits.float()
    with fast.autocast():
        got = fast.strategy(batch).logits.float()
    assert torch.equal(expected, got)


def test_fast_path_accuracy_matches_plain_fp32_path():
    plain = make_engine(["amp=off"]).run_all()
    fast = make_engine(["amp=bf16", "frozen_bf16=true"]).run_all()
    assert plain.shape == fast.shape == (2, 2)
    assert np.nanmax(np.abs(plain - fast)) <= 5.0, (plain, fast)
