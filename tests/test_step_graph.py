"""The captured training step (clframe.step_graph) is the eager step: same losses, same parameters.

On a CPU the engine's graph bookkeeping runs without capture (``graph_capture = False``: warm-up,
static buffers filled per batch, eager short batches, a new graph per task), which must give the
eager engine's numbers exactly. On CUDA the real capture is compared with the eager step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clframe.config import resolve_config
from clframe.engine import Engine
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES
from clframe.runner import build_stream, build_strategy
from clframe.step_graph import WARMUP_STEPS, GraphedStep, make_capture_safe
from clframe.strategies.base import Batch

BATCH = 64  # split_digits with 2 tasks: 670 and 677 training images, so every epoch ends on a short batch
EPOCHS = 2


def make_engine(strategy: str, sets: list[str], device: str = "cpu",
                lr: str | None = "0.01") -> tuple[Engine, list[float]]:
    """Split Digits, 2 tasks; ``lr=None`` keeps the strategy's configured (reference) learning rate."""
    config = resolve_config(dict(scenario="split_digits", strategy=strategy, progress=False), None,
                            ["split_digits.n_tasks=2", f"epochs={EPOCHS}", f"batch_size={BATCH}",
                             *([f"lr={lr}"] if lr is not None else []), *sets],
                            SCENARIOS.get("split_digits").config_cls, STRATEGIES.get(strategy).config_cls)
    stream = build_stream(config)
    losses: list[float] = []

    def log(metrics, step):
        if "train/loss" in metrics:
            losses.append(metrics["train/loss"])

    torch.manual_seed(0)
    return Engine(config, stream, build_strategy(config, stream), torch.device(device), log), losses


def trained(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in engine.strategy.named_parameters() if p.requires_grad}


def expected_counts(experience) -> tuple[int, int]:
    """(eager, replayed) steps of one task: the warm-up and every short batch run eagerly."""
    n = len(experience.train_labels)
    full, short = n // BATCH, int(n % BATCH > 0)
    return WARMUP_STEPS + short * EPOCHS, full * EPOCHS - WARMUP_STEPS


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "vpt_deep"])
def test_static_buffer_step_gives_the_eager_engines_losses_and_parameters(strategy):
    eager, eager_losses = make_engine(strategy, [])
    graphed, graphed_losses = make_engine(strategy, [])
    assert eager.graph_capture is None and graphed.graph_capture is None  # auto on a CPU: eager
    graphed.graph_capture = False  # the graph path's bookkeeping without capture
    for experience in eager.train_experiences:  # two tasks: a new optimizer and a new graph in the second
        eager.train_task(experience)
        graphed.train_task(experience)
        counts = graphed.last_step_counts
        assert eager.last_step_counts is None
        assert (counts.eager, counts.replayed) == expected_counts(experience)
        assert counts.captures == 1 and not counts.fallbacks
        for name, value in trained(eager).items():
            assert torch.equal(value, trained(graphed)[name]), name
    assert len(eager_losses) == 2 * EPOCHS and eager_losses == graphed_losses
    matrix = [eager.evaluate(e) for e in eager.stream.experiences]
    assert matrix == [graphed.evaluate(e) for e in graphed.stream.experiences]


def test_the_short_last_batch_runs_the_compiled_blocks_uncompiled(monkeypatch):
    """A second batch size would compile the block twice more (the step and the no-grad query pass,
    batch dimension dynamic): seconds of compilation on a GPU for one batch per epoch. One task, two
    epochs, each ending on a short batch: the blocks are compiled for the full batch only, and the
    losses are the uncompiled engine's."""
    from clframe import fastpath

    compiled_batches = []

    def record(graph, example_inputs):  # a backend that runs the traced graph as is, noting its batch size
        compiled_batches.append(next(int(x.shape[0]) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 3))
        return graph.forward

    compile_blocks = fastpath.compile_blocks
    monkeypatch.setattr(fastpath, "compile_blocks", lambda backbone: compile_blocks(backbone, backend=record))
    torch._dynamo.reset()
    try:
        plain, plain_losses = make_engine("l2p", ["compile=off"])
        compiled, compiled_losses = make_engine("l2p", ["compile=on"])
        experience = plain.train_experiences[0]
        assert len(experience.train_labels) % BATCH
        plain.train_task(experience)
        compiled.train_task(experience)
    finally:
        torch._dynamo.reset()
    assert compiled.compiled and compiled_batches == [BATCH, BATCH]  # training and the query pass
    np.testing.assert_allclose(compiled_losses, plain_losses, rtol=1e-5)


def test_replays_read_each_batch_not_the_captured_one():
    """Every replay must see its own batch: the static buffers are refilled, never left at the
    batch the step was captured with."""
    seen: list[torch.Tensor] = []

    def step(batch: Batch) -> torch.Tensor:
        seen.append(batch.images.clone())
        return batch.images.sum()

    runner = GraphedStep(step, batch_size=2, device=torch.device("cpu"), capture=False, warmup=1)
    batches = [Batch(torch.full((2, 1), float(i)), torch.zeros(2, dtype=torch.long), 0, True) for i in range(4)]
    losses = [float(runner(b)) for b in batches]
    short = float(runner(Batch(torch.full((1, 1), 9.0), torch.zeros(1, dtype=torch.long), 0, True)))
    assert losses == [0.0, 2.0, 4.0, 6.0] and short == 9.0
    assert (runner.counts.eager, runner.counts.replayed, runner.counts.captures) == (2, 3, 1)


def test_cuda_graph_setting_refuses_what_cannot_be_captured():
    from clframe.engine import cuda_graph_plan

    def plan(engine):
        return cuda_graph_plan(engine.run.cuda_graph, engine.device, type(engine.strategy), engine.run.batch_size)

    with pytest.raises(ClframeError, match="cuda_graph=on needs a CUDA device"):
        make_engine("l2p", ["cuda_graph=on"])
    engine, _ = make_engine("l2p", ["cuda_graph=off"])
    assert engine.graph_capture is None
    engine.device = torch.device("cuda")  # the checks only; nothing runs there
    engine.run.cuda_graph = "on"
    assert plan(engine) is True
    engine.run.cuda_graph = "auto"
    assert plan(engine) is True  # batch 64: captured
    engine.run.batch_size = 128  # where the captured step no longer pays, auto steps eagerly; on still captures
    assert plan(engine) is None
    engine.run.cuda_graph = "on"
    assert plan(engine) is True
    rehearsal, _ = make_engine("er", ["cuda_graph=off"])
    rehearsal.device, rehearsal.run.cuda_graph = torch.device("cuda"), "on"
    with pytest.raises(ClframeError, match="er's does not"):
        plan(rehearsal)
    rehearsal.run.cuda_graph = "auto"
    assert plan(rehearsal) is None


def test_a_subclass_of_a_capturable_strategy_steps_eagerly_until_it_declares_it():
    from clframe.engine import cuda_graph_missing, declares_capturable_step
    from clframe.strategies.l2p import L2P

    class Counting(L2P):  # Python state in forward: a replay would skip it
        pass

    class Declared(L2P):
        capturable_step = True

    cuda = torch.device("cuda")
    assert declares_capturable_step(L2P) and cuda_graph_missing(cuda, L2P) is None
    assert not declares_capturable_step(Counting) and "declares capturable_step" in cuda_graph_missing(cuda, Counting)
    assert cuda_graph_missing(cuda, Declared) is None


def test_capture_safe_optimizers():
    param = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([param], lr=0.1)
    assert make_capture_safe(adam, torch.device("cuda")) and adam.param_groups[0]["capturable"] is True
    cpu_adam = torch.optim.AdamW([param], lr=0.1)
    assert make_capture_safe(cpu_adam, torch.device("cpu")) and not cpu_adam.param_groups[0]["capturable"]
    assert make_capture_safe(torch.optim.SGD([param], lr=0.1, momentum=0.9), torch.device("cuda"))
    assert not make_capture_safe(torch.optim.RMSprop([param], lr=0.1), torch.device("cuda"))


CAPTURABLE = sorted(name for name in STRATEGIES._entries if STRATEGIES.get(name).obj.__dict__.get("capturable_step"))
# Dropout inside the step draws from the same generator in another order when replayed: off for the comparison.
NO_DROPOUT = {"adapter": ["adapter.dropout=0"], "mlp_k": ["mlp_k.dropout=0"], "vpt_shallow": ["vpt_shallow.dropout=0"],
              "vpt_deep": ["vpt_deep.dropout=0"]}
FP32 = ["amp=off", "frozen_bf16=false"]


def off_the_eager_path(start: dict, eager: dict, graphed: dict, share: float) -> list[str]:
    """Parameters whose captured value is farther from the eager one than ``share`` of how far the eager
    step moved them. Both paths round differently (capturable Adam orders its arithmetic otherwise,
    scatter-adds sum in any order, Adam turns a near-zero gradient's noise into a step), so an absolute
    tolerance either misses a bug or fails on noise; a replay that read a stale batch or skipped an
    update is off by about as much as the training moved the parameter."""
    off = []
    for name, value in eager.items():
        value, first, other = (without_key_bias(name, t) for t in (value, start[name], graphed[name]))
        moved, gap = float((value - first).norm()), float((other - value).norm())
        if gap > share * moved + 1e-6:
            off.append(f"{name}: {gap:.3g} apart, moved {moved:.3g}")
    return off


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """An attention ``qkv.bias`` without its key third. Adding a constant to every key shifts each
    query's scores by one constant, which softmax ignores: the key bias's gradient is exactly zero,
    so what it gets is rounding noise, and Adam turns noise into full-size steps in random
    directions (on CUDA, 5.4% of bitfit's and 9% of partial_k's qkv.bias movement). Prefix keys
    (DualPrompt) would make it nonzero, but no strategy trains both."""
    if not name.endswith("qkv.bias"):
        return value
    query, _, v = value.chunk(3)
    return torch.cat([query, v])


def test_off_the_eager_path_flags_a_skipped_update_and_passes_rounding():
    torch.manual_seed(0)
    start = {"w": torch.randn(50), "frozen": torch.ones(3)}
    eager = {"w": start["w"] + 0.01 * torch.randn(50), "frozen": torch.ones(3)}
    rounded = {"w": eager["w"] + 1e-7 * torch.randn(50), "frozen": torch.ones(3)}
    assert off_the_eager_path(start, eager, rounded, 0.05) == []
    assert off_the_eager_path(start, eager, dict(eager, w=start["w"]), 0.05)  # the update skipped
    assert off_the_eager_path(start, eager, dict(eager, frozen=torch.full((3,), 1.001)), 0.05)  # a frozen one moved
    bias = {"qkv.bias": torch.zeros(9)}
    trained = {"qkv.bias": torch.tensor([1.0, 1, 1, 0.5, -0.5, 0.5, 1, 1, 1])}  # the key third: noise-driven steps
    noise = {"qkv.bias": torch.tensor([1.0, 1, 1, -0.5, 0.5, -0.5, 1, 1, 1])}
    assert off_the_eager_path(bias, trained, noise, 0.05) == []
    assert off_the_eager_path(bias, trained, {"qkv.bias": torch.tensor([0.0, 0, 0, 0.5, -0.5, 0.5, 1, 1, 1])}, 0.05)


def compare_with_eager(strategy: str, sets: list[str], share: float, loss_rtol: float, device: str = "cuda") -> None:
    """Real capture against the eager step: two tasks, short last batches, a new graph in the second.
    (``device="cpu"``: the same comparison over the uncaptured bookkeeping, to check the comparison.)"""
    sets = ["compile=off", *NO_DROPOUT.get(strategy, []), *sets]
    # The configured learning rates: at 0.01 a whole-network Adam finetune is chaotic (its two paths'
    # losses went from 1e-6 to 4% apart in three epochs), and chaos is no test of the replay.
    on_cuda = device == "cuda"
    eager, eager_losses = make_engine(strategy, ["cuda_graph=off", *sets], device, lr=None)
    graphed, graphed_losses = make_engine(strategy, [f"cuda_graph={'on' if on_cuda else 'off'}", *sets], device, lr=None)
    if not on_cuda:
        graphed.graph_capture = False
    assert graphed.graph_capture is on_cuda
    start = trained(eager)
    before_task = eager.strategy.before_task

    def note_new_parameters(experience):  # a task's new parameters (CODA-Prompt's components) from where they began
        before_task(experience)
        start.update({name: value for name, value in trained(eager).items() if name not in start})

    eager.strategy.before_task = note_new_parameters
    problems = []
    for experience in eager.train_experiences:
        eager.train_task(experience)
        graphed.train_task(experience)
        counts = graphed.last_step_counts
        if (counts.eager, counts.replayed, counts.captures) != (*expected_counts(experience), 1) or counts.fallbacks:
            problems.append(f"task {experience.task_id}: {counts}")
        problems += [f"task {experience.task_id}: {line}"
                     for line in off_the_eager_path(start, trained(eager), trained(graphed), share)]
    if not np.allclose(graphed_losses, eager_losses, rtol=loss_rtol, atol=0):
        problems.append(f"losses {graphed_losses} against eager {eager_losses}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("strategy", ["coda_prompt", "bitfit"])
def test_the_cuda_comparison_passes_the_uncaptured_bookkeeping_on_a_cpu(strategy):
    """The CUDA comparison itself, where it can run here: CODA-Prompt adds parameters in its second
    task (compared from where they began), bitfit trains qkv.bias (its key third left out)."""
    compare_with_eager(strategy, FP32, share=0.05, loss_rtol=1e-3, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("strategy", CAPTURABLE)
def test_captured_step_matches_eager_on_cuda(strategy):
    """Every capturable strategy in fp32: the captured step's mechanics (static buffers refilled, the
    update replayed, eager short batches, a new graph per task), free of bf16's amplified rounding."""
    compare_with_eager(strategy, FP32, share=0.05, loss_rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "coda_prompt"])
def test_captured_step_matches_eager_under_bf16_autocast_on_cuda(strategy):
    """The default path: bf16 autocast with frozen weights in bf16. A cast of a trainable weight kept
    from capture time (autocast's cache) would freeze the forward's view of it while Adam moved it."""
    compare_with_eager(strategy, [], share=0.1, loss_rtol=1e-2)
