"""The training step as one CUDA graph, replayed over static input buffers.

At the reference batch sizes (L2P 16, DualPrompt 24) one step is a few milliseconds of GPU
arithmetic but several hundred kernel launches (two ViT passes, the backward, clipping, Adam), so
the GPU waits on the host. Capturing the whole step once per task (forward, loss, backward,
gradient clipping and the optimizer update) turns it into one launch.

How a task's steps run (:class:`GraphedStep`):

- the first ``warmup`` full batches run eagerly on a side stream, as PyTorch's capture recipe asks
  (lazy state: Adam's moments, cuBLAS workspaces, compiled backward graphs);
- the next full batch is copied into static buffers, the step is captured once (capture records
  kernels and runs none) and then replayed; every later full batch is copied into the same buffers
  and replayed;
- a batch of another size (the short last batch of an epoch) or one carrying rehearsal rows runs
  eagerly, with the same parameters and optimizer, so its loss and gradients are the eager step's.

A new task builds a new optimizer (and may change the trainable set), so the engine makes a new
``GraphedStep`` per task and drops the old graph. The step must make no host sync and keep all of
its state in tensors (``Strategy.capturable_step`` says a strategy promises that); the optimizer
must be capture-safe (:func:`make_capture_safe`). The engine's autocast runs without its weight-cast
cache, as graph capture requires. Random draws inside the step (dropout) come from the same
generator, but a replay draws them in a different order than an eager step would.

``capture=False`` runs the same bookkeeping (warm-up, static buffers, eager fallbacks) and calls the
step on the static buffers instead of replaying: what the CPU tests exercise.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from clframe.strategies.base import Batch

WARMUP_STEPS = 3  # PyTorch's whole-network capture example warms up for 3 iterations


def make_capture_safe(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Prepare ``optimizer`` for capture where torch allows it; False when it cannot be captured.

    Adam and AdamW keep their step count on the host unless ``capturable``; with it, the step count
    and bias corrections live on the device (the same update, computed there). SGD keeps no host
    state once its momentum buffers exist (created by the eager warm-up steps).
    """
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if device.type == "cuda":
            for group in optimizer.param_groups:
                group["capturable"] = True
        return True
    return type(optimizer) is torch.optim.SGD


@dataclass
class StepCounts:
    """How a task's steps ran: for the tests and the benchmark's report."""

    eager: int = 0
    replayed: int = 0
    captures: int = 0
    fallbacks: list[str] = field(default_factory=list)


class GraphedStep:
    """Calls ``step(batch) -> loss`` for one task, captured as a CUDA graph for full batches.

    The returned loss of a replayed step is the graph's static output tensor: read it (add it to a
    sum, test it for NaN) before the next call, which overwrites it.
    """

    def __init__(self, step: Callable[[Batch], torch.Tensor], batch_size: int, device: torch.device,
                 capture: bool = True, warmup: int = WARMUP_STEPS, strict: bool = False) -> None:
        self.step = step
        self.batch_size = batch_size
        self.capture = capture and device.type == "cuda"
        self.warmup = warmup
        self.strict = strict  # a failed capture raises (cuda_graph=on) instead of falling back to eager
        self.counts = StepCounts()
        self.static: Batch | None = None
        self.loss: torch.Tensor | None = None
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.warmed = 0  # full batches run eagerly on the capture stream so far
        self.stream = torch.cuda.Stream(device) if self.capture else None

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.counts.fallbacks or len(batch.labels) != self.batch_size or batch.replay is not None:
            return self._eager(batch)
        if self.warmed < self.warmup:
            self.warmed += 1
            return self._eager(batch, side_stream=True)
        if self.static is None and not self._capture(batch):
            return self._eager(batch)
        self._fill(batch)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.loss = self.step(self.static)
        self.counts.replayed += 1
        return self.loss

    def close(self) -> None:
        """Release the graph and its memory pool (after the task's last replay has finished)."""
        self.graph = self.static = self.loss = None

    # ----- internals -----
    @contextlib.contextmanager
    def _joined(self) -> Iterator[None]:
        """Work queued on the capture stream inside starts after, and is waited for by, the current stream."""
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        try:
            yield
        finally:
            current.wait_stream(self.stream)

    def _eager(self, batch: Batch, side_stream: bool = False) -> torch.Tensor:
        self.counts.eager += 1
        if not side_stream or self.stream is None:
            return self.step(batch)
        with self._joined(), torch.cuda.stream(self.stream):
            return self.step(batch)

    def _fill(self, batch: Batch) -> None:
        static = self.static
        static.images.copy_(batch.images)
        static.labels.copy_(batch.labels)
        if static.index is not None and batch.index is not None:
            static.index.copy_(batch.index)

    def _capture(self, batch: Batch) -> bool:
        index = batch.index.clone() if batch.index is not None else None
        static = Batch(batch.images.clone(), batch.labels.clone(), batch.task_id, True, index)
        if not self.capture:
            self.static = static
            self.counts.captures += 1
            return True
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (MLflow's system-metrics sampler) may call CUDA meanwhile.
            with self._joined(), torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                loss = self.step(static)
        except Exception as error:  # noqa: BLE001 - any failure to capture: fall back to eager (or refuse)
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.counts.fallbacks.append(reason)
            if self.strict:
                raise
            warnings.warn(f"the training step could not be captured as a CUDA graph ({reason}); this task steps "
                          f"eagerly (--set cuda_graph=off skips the attempt)", RuntimeWarning, stacklevel=2)
            return False
        # Detached: the static output keeps its storage, and the captured autograd graph (saved activations,
        # AccumulateGrad nodes bound to the capture stream) is released.
        self.static, self.loss, self.graph = static, loss.detach(), graph
        self.counts.captures += 1
        return True
