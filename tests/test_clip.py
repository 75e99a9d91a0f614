"""CLIP prompt learning (zeroshot_clip, coop, cocoop, dapl) on a tiny randomly initialised CLIP
with open_clip's real tokenizer: no download anywhere."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip")

from mlflow.tracking import MlflowClient  # noqa: E402

from clframe.clip_backbone import ClipBackbone, ClipOptions, create_clip, prompt_class_names  # noqa: E402
from clframe.config import RunConfig, resolve_config  # noqa: E402
from clframe.engine import Engine  # noqa: E402
from clframe.errors import ClframeError  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.runner import build_strategy, run_experiment  # noqa: E402
from clframe.text_prompts import PromptSlots, class_prompt, init_context  # noqa: E402
from conftest import clframe_subprocess  # noqa: E402
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience, Stream  # noqa: E402
from clframe.scenarios.split_digits import DIGIT_NAMES  # noqa: E402
from clframe.strategies.base import Batch, StreamInfo  # noqa: E402


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return ClipBackbone.create(RunConfig(model="clip_tiny"), ClipOptions(), "test")


def make_config(strategy: str, scenario: str = "split_digits", sets: tuple[str, ...] = ()):
    cli = {"scenario": scenario, "strategy": strategy, "model": "clip_tiny", "device": "cpu", "progress": False}
    return resolve_config(cli, None, ["epochs=2", "eval_batch_size=8", "image_size=32", *sets],  # clip_tiny's own size
                          SCENARIOS.get(scenario).config_cls,
                          STRATEGIES.get(strategy).config_cls)


def synthetic_stream(kind: str, n_tasks: int = 2, n: int = 32) -> Stream:
    generator = torch.Generator().manual_seed(0)
    experiences = []
    for task in range(n_tasks):
        classes = list(range(10)) if kind == DOMAIN_IL else list(range(5 * task, 5 * task + 5))
        labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=generator)]
        images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
        experiences.append(Experience(task, classes, images, labels, images[:16], labels[:16], domain=f"d{task}"))
    domains = [e.domain for e in experiences] if kind == DOMAIN_IL else None
    return Stream("synthetic", kind, list(DIGIT_NAMES), experiences, domain_names=domains)


def engine_for(strategy_name: str, stream: Stream, sets: tuple[str, ...] = ()) -> Engine:
    config = make_config(strategy_name, sets=sets)
    return Engine(config, stream, build_strategy(config, stream), torch.device("cpu"), lambda values, step: None)


# ----- prompts -----
@pytest.mark.parametrize("position, slots, name_at, eot", [
    ("end", [1, 2, 3, 4], [5], 7),       # [SOT] c c c c cat . [EOT]
    ("middle", [1, 2, 4, 5], [3], 7),    # [SOT] c c cat c c . [EOT]
    ("front", [2, 3, 4, 5], [1], 7),     # [SOT] cat c c c c . [EOT]
])
def test_context_vectors_land_at_their_token_positions(clip, position, slots, name_at, eot):
    tokenizer = clip.tokenizer
    cat, stop = tokenizer.encode("cat"), tokenizer.encode(".")
    assert len(cat) == 1 and len(stop) == 1
    prompts = PromptSlots(clip, [class_prompt("cat", 4, position), class_prompt("sea lion", 4, "end")])
    ctx = torch.randn(4, clip.width)
    spliced = prompts.splice(ctx)
    assert prompts.slots[0].tolist() == slots and int(prompts.eot[0]) == eot
    hand = torch.zeros(eot + 1, clip.width)
    hand[slots] = ctx
    hand[0] = clip.token_embeddings(torch.tensor([tokenizer.sot_token_id]))[0]
    hand[name_at[0]] = clip.token_embeddings(torch.tensor(cat))[0]
    hand[eot - 1] = clip.token_embeddings(torch.tensor(stop))[0]
    hand[eot] = clip.token_embeddings(torch.tensor([tokenizer.eot_token_id]))[0]
    assert torch.equal(spliced[0, :eot + 1], hand)
    # The two-token name moves the end-of-text token; the context stays right after [SOT].
    assert prompts.slots[1].tolist() == [1, 2, 3, 4] and int(prompts.eot[1]) == 8
    assert torch.equal(spliced[1, 1:5], ctx)


def test_prompt_embeddings_reproduce_clips_text_encoder(clip):
    """A context initialised from 'a photo of a' gives exactly the features of the written prompt:
    end-of-text pooling, causal mask and the shortened sequence agree with open_clip's encode_text."""
    names = ["cat", "sea lion", "maple tree"]
    ctx = init_context(clip, 16, "a photo of a")
    assert ctx.shape == (4, clip.width)
    prompts = PromptSlots(clip, [class_prompt(name, 4, "end") for name in names])
    assert prompts.tokens.shape[1] < 77
    expected = clip.encode_texts([f"a photo of a {name}." for name in names])
    assert torch.allclose(prompts.encode(clip, ctx), expected, atol=1e-5)
    per_class = init_context(clip, 16, "a photo of a", copies=3)
    assert torch.allclose(prompts.encode(clip, per_class), expected, atol=1e-5)
    per_image = ctx.expand(5, 1, 4, clip.width)  # CoCoOp's shape, in chunks of 4 sequences
    chunked = prompts.encode(clip, per_image, chunk=4)
    assert chunked.shape == (5, 3, clip.embed_dim) and torch.allclose(chunked, expected.expand(5, -1, -1), atol=1e-5)


# ----- what trains -----
@pytest.mark.parametrize("name, sets, learned", [
    ("coop", (), {"ctx"}),
    ("coop", ("coop.class_specific=true", "coop.position=middle"), {"ctx"}),
    ("cocoop", ("cocoop.text_chunk=16",), {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                                           "meta_net.2.bias"}),
])
def test_only_context_and_meta_net_learn_and_encoders_stay_bit_identical(name, sets, learned):
    stream = synthetic_stream(CLASS_IL)
    engine = engine_for(name, stream, sets)
    strategy = engine.strategy
    frozen = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    ctx_before = strategy.ctx.detach().clone()
    for experience in stream.experiences:
        engine.train_task(experience)
    assert {n for n, p in strategy.named_parameters() if p.grad is not None} == learned
    assert {n for n, p in strategy.named_parameters() if p.requires_grad} == learned
    after = strategy.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not torch.equal(ctx_before, strategy.ctx.detach())


def test_text_side_runs_once_per_evaluation(monkeypatch):
    stream = synthetic_stream(CLASS_IL)
    engine = engine_for("coop", stream)
    calls = []
    original = engine.strategy.prompts.encode
    monkeypatch.setattr(engine.strategy.prompts, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    engine.train_task(stream.experiences[0])
    trained = len(calls)
    assert trained == 2  # two epochs of one step each
    for experience in stream.experiences:  # 2 test sets x 2 batches of 8
        engine.evaluate(experience)
    assert len(calls) == trained + 1
    engine.train_task(stream.experiences[1])  # training resumes: the cache is dropped
    engine.evaluate(stream.experiences[1])
    assert len(calls) == trained + 1 + 2 + 1


def test_zeroshot_logits_are_clips_scale_times_cosine():
    stream = synthetic_stream(CLASS_IL)
    strategy = build_strategy(make_config("zeroshot_clip"), stream)
    assert strategy.count_trainable() == 0
    strategy.before_task(stream.experiences[0])
    strategy.eval()
    images = torch.randn(6, 3, 32, 32)
    logits = strategy(Batch(images, torch.zeros(6, dtype=torch.long), 0, False)).logits
    model, tokenizer = strategy.backbone.model, strategy.backbone.tokenizer
    with torch.no_grad():
        image = model.encode_image(images)
        text = model.encode_text(tokenizer([f"a photo of a {name}." for name in DIGIT_NAMES]))
    cosine = (image @ text.t()) / (image.norm(dim=1)[:, None] * text.norm(dim=1)[None, :])
    assert logits.shape == (6, 10)
    assert torch.allclose(logits, model.logit_scale.exp() * cosine, atol=1e-4)


def test_dapl_trains_shared_and_current_domain_context_only():
    stream = synthetic_stream(DOMAIN_IL)
    engine = engine_for("dapl", stream, ("dapl.n_ctx=4", "dapl.n_domain_ctx=2"))
    strategy = engine.strategy
    engine.train_task(stream.experiences[0])
    first_domain, shared = strategy.domain_ctx[0].detach().clone(), strategy.ctx.detach().clone()
    frozen = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    strategy.zero_grad(set_to_none=True)
    engine.train_task(stream.experiences[1])
    assert {n for n, p in strategy.named_parameters() if p.grad is not None} == {"ctx", "domain_ctx.1"}
    assert torch.equal(first_domain, strategy.domain_ctx[0])
    assert not torch.equal(shared, strategy.ctx.detach())
    assert all(torch.equal(frozen[k], v) for k, v in strategy.backbone.state_dict().items())
    strategy.eval()
    out = strategy(Batch(torch.randn(3, 3, 32, 32), torch.zeros(3, dtype=torch.long), 1, False))
    assert out.pair_logits.shape == (3, 2, 10) and torch.equal(out.logits, out.pair_logits.amax(dim=1))


# ----- offline runs through MLflow -----
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_mlflow")


@pytest.mark.parametrize("name, scenario, sets, trainable", [
    ("zeroshot_clip", "split_digits", ("epochs=0",), 0),
    ("coop", "split_digits", (), 16 * 32),
    ("cocoop", "split_digits", ("cocoop.text_chunk=64",), 4 * 32 + (32 * 2 + 2) + (2 * 32 + 32)),
    pytest.param("dapl", "rotated_digits", ("rotated_digits.angles=[0, 90]", "dapl.unlabeled=true",
                                            "dapl.threshold=0"), 16 * 32 + 16 * 32,
                 marks=pytest.mark.skipif("rotated_digits" not in SCENARIOS.names(),
                                          reason="needs the domain-IL scenarios (scenarios/digits_domains.py)")),
])
def test_offline_run_logs_metrics_to_mlflow(tracking, name, scenario, sets, trainable):
    folder = tracking / name
    base = ["epochs=1", f"tracking_uri=sqlite:///{tracking}/mlflow.db", f"checkpoint_dir={folder}/ckpt"]
    if scenario == "split_digits":
        base.append("split_digits.n_tasks=2")
    config = make_config(name, scenario, (*base, *sets))
    result = run_experiment(config, echo=lambda line: None)
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == name
    assert run.data.params["n_trainable_params"] == str(trainable)
    for key in ("acc_avg", "forgetting", "bwt", "trainable_params"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    assert 0.0 <= result.summary["acc_avg"] <= 100.0
    if name == "dapl":
        kept = client.get_metric_history(run.info.run_id, "dapl/pseudo_kept")
        assert [(m.step, m.value) for m in kept] == [(1, 100.0)]  # threshold 0 keeps every pseudo-label
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "acc_matrix.csv"} <= artifacts


# ----- clear errors -----
def test_bad_clip_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(ClframeError, match="unknown open_clip model 'vit_tiny_patch16_224'.*--model ViT-B-16"):
        create_clip(RunConfig(model="vit_tiny_patch16_224"), ClipOptions(), "coop")
    with pytest.raises(ClframeError, match="without pretrained weights"):
        create_clip(RunConfig(model="clip_tiny", pretrained=True), ClipOptions(), "coop")
    with pytest.raises(ClframeError, match="builds text prompts from class names"):
        prompt_class_names(StreamInfo(CLASS_IL, 3, ["0", "1", "2"], None, 1), "coop")
    with pytest.raises(ClframeError, match="has none .it has 'class_0', 'class_1'"):
        prompt_class_names(StreamInfo(CLASS_IL, 2, ["class_0", "class_1"], None, 1), "coop")
    assert prompt_class_names(StreamInfo(CLASS_IL, 2, ["maple_tree", "class_7"], None, 1), "coop") == \
        ["maple tree", "class 7"]
    with pytest.raises(ClframeError, match="needs a domain-IL scenario"):
        build_strategy(make_config("dapl"), synthetic_stream(CLASS_IL))
    import open_clip

    model, _ = create_clip(RunConfig(model="clip_tiny"), ClipOptions(), "coop")
    torch.save(model.state_dict(), tmp_path / "good.pt")
    loaded, _ = create_clip(RunConfig(model="clip_tiny", weights=str(tmp_path / "good.pt")), ClipOptions(), "coop")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    wider = open_clip.CLIP(48, {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
                           {"width": 32, "heads": 2, "layers": 2})
    torch.save(wider.state_dict(), tmp_path / "bad.pt")
    with pytest.raises(ClframeError, match="does not fit open_clip model 'clip_tiny'"):
        create_clip(RunConfig(model="clip_tiny", weights=str(tmp_path / "bad.pt")), ClipOptions(), "coop")


def test_offline_pretrained_tag_names_weights(tmp_path):
    args = ["run", "--strategy", "coop", "--model", "ViT-B-16", "--pretrained", "--no-progress",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    result = clframe_subprocess(args, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "cannot fetch open_clip weights 'openai' for 'ViT-B-16'" in lines[0] and "--weights FILE" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_strategies_import_without_open_clip(tmp_path):
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "import clframe.strategies\n"
            "from clframe.cli import main\n"
            f"sys.argv = ['clframe', 'run', '--strategy', 'coop', '--model', 'clip_tiny', '--no-progress', "
            f"'--tracking-uri', 'sqlite:///{tmp_path}/mlflow.db']\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == "error: CLIP strategies need open_clip: pip install -e .[clip]"
