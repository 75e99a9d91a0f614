"""The continual-learning loop: for each experience, train, then evaluate every task seen so far.

The engine owns devices, mixed precision, batching, augmentation, optimisation and metrics; a
strategy only answers its hooks. Data for a task is moved to the device once, as uint8, and
augmented there; the step loop never synchronises with the host (losses accumulate on device
and are read once per epoch; a NaN/inf loss is spotted within a step or two by DivergenceWatch).

Under torchrun (clframe.distributed) every rank walks the same global batches and keeps its shard:
the augmentation is drawn for the whole global batch and sliced, each rank's loss is weighted by
its share of the global batch and the gradients are summed across ranks, so a step is the
single-process step of the global batch; evaluation is sharded and the correct counts summed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from clframe import distributed, fastpath, metrics
from clframe.augment import prepare
from clframe.config import ResolvedConfig
from clframe.errors import ClframeError
from clframe.scenarios.base import CLASS_IL, Experience, Stream
from clframe.step_graph import GraphedStep, StepCounts, make_capture_safe
from clframe.strategies.base import Batch, Replay, Strategy


class TrainingDiverged(ClframeError):
    """The loss became NaN or infinite."""


class DivergenceWatch:
    """Finds the first training step whose loss is NaN or infinite without a host sync per step.

    The step number lives on the device (``first``, -1 while every loss is finite) and is updated
    by a few tiny kernels per step. On CUDA, each step also queues a non-blocking copy of it to
    pinned host memory behind an event; the host reads that copy only once the event has
    completed, so it learns of a bad loss a step or two late and never waits for the GPU. On the
    CPU the value is already on the host.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.cuda = device.type == "cuda"
        self.host = torch.full((), -1, dtype=torch.long).pin_memory() if self.cuda else None
        self.event = torch.cuda.Event() if self.cuda else None
        self.copying = False  # a copy to ``host`` is queued behind ``event``

    def update(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(newly_bad, step, self.first)
        self.value = torch.where(newly_bad, loss.detach().float(), self.value)

    def poll(self) -> int | None:
        """The first bad step if the host can know it now without waiting, else None."""
        if not self.cuda:
            return self._read(self.first)
        if self.copying and not self.event.query():
            return None
        bad = self._read(self.host) if self.copying else None
        self.host.copy_(self.first, non_blocking=True)
        self.event.record()
        self.copying = True
        return bad

    def result(self) -> int | None:
        """The first bad step, waiting for the device (once per epoch)."""
        return self._read(self.first)

    @staticmethod
    def _read(value: torch.Tensor) -> int | None:
        step = int(value)
        return step if step >= 0 else None


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ClframeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu "
                           "(or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cuda_graph_missing(device: torch.device, strategy_cls: type[Strategy]) -> str | None:
    """What a captured training step would need and this run lacks (None: it can be captured)."""
    if device.type != "cuda":
        return "a CUDA device"
    if distributed.world() > 1:
        return "one process per run (not --gpus N)"
    if not declares_capturable_step(strategy_cls):
        return (f"a strategy whose class declares capturable_step = True ({strategy_cls.name}'s does not; a "
                f"subclass declares it itself, once its own forward and loss allow it)")
    return None


def declares_capturable_step(strategy_cls: type[Strategy]) -> bool:
    """Whether the class itself says its step can be captured. Not inherited: a subclass of a capturable
    strategy may add Python state to ``forward`` that a replayed graph would silently skip."""
    return bool(strategy_cls.__dict__.get("capturable_step", False))


# ``cuda_graph=auto`` captures batches smaller than this. On an H100 the captured L2P step ran 3.2x the
# eager one at batch 16 and 2.4x (DualPrompt) at 24, but 0.98x (L2P) and 0.97x (CODA-Prompt) at 128:
# there the GPU's arithmetic already hides the host's launches (BENCHMARKS.md).
CAPTURE_BELOW_BATCH = 128


def cuda_graph_plan(setting: str, device: torch.device, strategy_cls: type[Strategy],
                    batch_size: int) -> bool | None:
    """How training steps run: True = captured CUDA graphs (clframe.step_graph), None = eager.
    ``auto`` captures where it can and where it pays (batches below ``CAPTURE_BELOW_BATCH``); ``on``
    captures at any batch, and one that cannot be honoured is refused. (Tests set an engine's False:
    the same bookkeeping over static buffers, without capture, on a CPU.)"""
    if setting == "off":
        return None
    missing = cuda_graph_missing(device, strategy_cls)
    if missing is not None and setting == "on":
        raise ClframeError(f"cuda_graph=on needs {missing}; use --set cuda_graph=auto (captures where it can) or off")
    if missing is not None or (setting == "auto" and batch_size >= CAPTURE_BELOW_BATCH):
        return None
    return True


def task_seed(seed: int, task_id: int, salt: int = 0) -> int:
    """Per-task seeds, so a run resumed at a task boundary draws exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + task_id * 7919 + salt) % (2**63 - 1)


@dataclass
class PhaseTimer:
    """Images and seconds per phase, for throughput (one device sync per phase, not per step)."""

    images: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "eval": 0.0})

    def rate(self, phase: str) -> float:
        return self.images[phase] / self.seconds[phase] if self.seconds[phase] > 0 else 0.0


@dataclass
class EngineState:
    """Where a run stands; what a task-boundary checkpoint restores."""

    acc_matrix: np.ndarray
    tasks_done: int = 0
    epochs_done: int = 0


class Engine:
    def __init__(self, config: ResolvedConfig, stream: Stream, strategy: Strategy, device: torch.device,
                 log_metrics: Callable[[dict[str, float], int], None],
                 on_task_end: Callable[[int, "Engine"], None] | None = None) -> None:
        self.config = config
        self.run = config.run
        self.stream = stream
        self.strategy = strategy.to(device)
        self.device = device
        strategy.attach_engine(self)
        self.log_metrics = log_metrics
        self.on_task_end = on_task_end
        self.timer = PhaseTimer()
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_experiences = [stream.joint_experience()] if self.run.joint else stream.experiences
        self.state = EngineState(acc_matrix=np.full((len(self.train_experiences), stream.n_tasks), np.nan))
        self.image_size, mean, std = strategy.input_spec()
        self.mean, self.std = (mean, std) if self.run.normalize else (None, None)
        use_bf16 = self.run.amp == "bf16" or (self.run.amp == "auto" and device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if use_bf16 and self.run.frozen_bf16:
            fastpath.hold_frozen_in_bf16(self.strategy)
        self.compiled = self.run.compile == "on" or (self.run.compile == "auto" and device.type == "cuda")
        if self.compiled:
            fastpath.compile_blocks(self.strategy.backbone)
        self.graph_capture = cuda_graph_plan(self.run.cuda_graph, device, type(self.strategy), self.run.batch_size)
        self.last_step_counts: StepCounts | None = None  # how the last task's steps ran

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: CUDA graph capture needs it off (clframe.step_graph), and it saves nothing
        # here: frozen weights are held in bf16 already and a trainable one is used once per forward.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- training -----
    def learning_rate(self) -> float:
        return self.run.lr * self.run.batch_size / 256 if self.run.lr_batch_scale else self.run.lr

    def train_task(self, experience: Experience) -> None:
        run, strategy, task = self.run, self.strategy, experience.task_id
        torch.manual_seed(task_seed(run.seed, task, 1))
        strategy.before_task(experience)
        train_images, train_labels = strategy.train_set(experience)
        params = list(strategy.trainable_parameters())
        optimizer = strategy.configure_optimizer(params, self.learning_rate()) if params else None
        class_mask = strategy.train_class_mask()
        class_mask = class_mask.to(self.device) if class_mask is not None else None
        order = torch.Generator().manual_seed(task_seed(run.seed, task, 2))
        augment = torch.Generator(device=self.device).manual_seed(task_seed(run.seed, task, 3))
        images = train_images.to(self.device, non_blocking=True)
        labels = train_labels.to(self.device, non_blocking=True)
        n = len(labels)
        steps = math.ceil(n / run.batch_size)
        epochs = run.epochs if optimizer is not None and n else 0  # nothing trains (prototype methods): no loop
        self.optimizer = optimizer  # kept for the task-boundary checkpoint
        watch = DivergenceWatch(self.device)
        graphed = self._graphed_step(class_mask, params, optimizer) if epochs else None
        self.last_step_counts = graphed.counts if graphed is not None else None
        strategy.train()
        self._sync()
        start = time.perf_counter()
        sharded = distributed.world() > 1
        bar = tqdm(total=epochs * steps, desc=f"task {task + 1}/{len(self.train_experiences)}",
                   disable=not run.progress or not distributed.is_main(), leave=True, dynamic_ncols=True, mininterval=0.5)
        try:  # the bar is closed even when a signal or a NaN stops the task, so messages start a line
            for epoch in range(epochs):
                permutation = torch.randperm(n, generator=order).to(self.device)
                loss_sum = torch.zeros((), device=self.device)
                for step in range(steps):
                    first, end = step * run.batch_size, min((step + 1) * run.batch_size, n)
                    mine = distributed.shard(first, end)
                    index = permutation[mine[0]:mine[1]]
                    batch = Batch(prepare(images[index], self.image_size, self.mean, self.std, train=run.train_aug,
                                          generator=augment, crop_scale_min=run.crop_scale_min,
                                          rows=(mine[0] - first, end - first)),
                                  labels[index], task, True, index)
                    replay = strategy.replay(len(index))
                    if replay is not None:
                        self._append_replay(batch, replay, augment)
                    with fastpath.uncompiled(self.compiled and end - first < run.batch_size):  # the short last batch
                        if graphed is not None:
                            loss = graphed(batch)
                        else:  # every rank steps, even on an empty shard (collectives inside)
                            weight = (len(index) / (end - first)) if sharded else None  # its share of the global mean
                            loss = self._train_step(batch, class_mask, params, optimizer, weight)
                    loss_sum += loss.detach()
                    watch.update(loss, epoch * steps + step)
                    bar.update(1)
                    if not sharded and watch.poll() is not None:  # ranks stop together, at the epoch's end
                        break
                bad_step = watch.result()  # with the line below, the one host sync per epoch
                epoch_loss = (distributed.all_reduce_sum(loss_sum) / steps).item()
                if bad_step is not None or not math.isfinite(epoch_loss):
                    value = float(watch.value) if bad_step is not None else epoch_loss
                    raise self._diverged(experience, bad_step, value, epoch, steps)
                bar.set_postfix(loss=f"{epoch_loss:.4f}")
                self.state.epochs_done += 1
                self.log_metrics({"train/loss": epoch_loss}, self.state.epochs_done - 1)
        finally:
            bar.close()
        distributed.reduce_selection_stats(strategy, task)  # this task's counts, over every rank's images
        self._sync()
        self.timer.seconds["train"] += time.perf_counter() - start
        self.timer.images["train"] += n * epochs
        if graphed is not None:
            graphed.close()  # after the sync above: no replay is pending
        strategy.after_task(experience)

    def _train_step(self, batch: Batch, class_mask: torch.Tensor | None, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, weight: float | None = None) -> torch.Tensor:
        """One optimisation step: forward, loss, backward, gradient all-reduce and clipping, update.
        ``weight`` scales the loss to this rank's share of a sharded global batch (0: an empty shard,
        which still joins the collectives). Captured whole by :class:`GraphedStep` where it can be."""
        run, strategy = self.run, self.strategy
        with self.autocast():
            out = strategy(batch)
        if weight == 0:
            loss = torch.zeros((), device=self.device)
        else:
            loss = strategy.loss(out, batch, class_mask)
            if weight is not None:
                loss = loss * weight
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        distributed.all_reduce_grads(params)
        if run.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        optimizer.step()
        return loss.detach()  # the autograd graph goes now, not when the next step rebinds ``loss``

    def _graphed_step(self, class_mask: torch.Tensor | None, params: list[torch.nn.Parameter],
                      optimizer: torch.optim.Optimizer) -> GraphedStep | None:
        """This task's captured step, or None to step eagerly (``cuda_graph`` off or not possible)."""
        if self.graph_capture is None:
            return None
        if not make_capture_safe(optimizer, self.device):
            if self.run.cuda_graph == "on":
                raise ClframeError(f"cuda_graph=on: a {type(optimizer).__name__} optimizer cannot be captured "
                                   f"(Adam, AdamW and SGD can); use --set cuda_graph=auto")
            return None
        return GraphedStep(lambda batch: self._train_step(batch, class_mask, params, optimizer),
                           self.run.batch_size, self.device, capture=self.graph_capture,
                           strict=self.run.cuda_graph == "on")

    def _append_replay(self, batch: Batch, replay: Replay, augment: torch.Generator) -> None:
        """Rehearsal: the replayed uint8 images are augmented as the current ones (same generator,
        drawn after them) and appended to the batch; ``batch.n_current`` marks where they start."""
        run = self.run
        replayed = prepare(replay.images.to(self.device), self.image_size, self.mean, self.std, train=run.train_aug,
                           generator=augment, crop_scale_min=run.crop_scale_min)
        batch.n_current = len(batch.labels)
        batch.images = torch.cat([batch.images, replayed.to(batch.images.dtype)])
        batch.labels = torch.cat([batch.labels, replay.labels.to(self.device)])
        batch.replay = replay

    # ----- data for a strategy's passes outside the loop (EngineIO) -----
    def batches(self, images: torch.Tensor, labels: torch.Tensor, task_id: int, augment: bool,
                batch_size: int | None) -> Iterator[Batch]:
        """Engine-prepared batches of uint8 ``images`` in order (see ``Strategy.prepared_batches``);
        with ``augment`` the training augmentation is drawn from a generator seeded by (seed, task)."""
        size = batch_size or self.run.eval_batch_size
        generator = None
        if augment:
            generator = torch.Generator(device=self.device).manual_seed(task_seed(self.run.seed, task_id, 4))
        for first in range(0, len(labels), size):
            chunk = images[first:first + size].to(self.device, non_blocking=True)
            prepared = prepare(chunk, self.image_size, self.mean, self.std, train=augment and self.run.train_aug,
                               generator=generator, crop_scale_min=self.run.crop_scale_min,
                               test_crop=1.0 if augment else self.run.test_crop)
            yield Batch(prepared, labels[first:first + size].to(self.device, non_blocking=True), task_id, False,
                        torch.arange(first, first + len(chunk), device=self.device))

    def _diverged(self, experience: Experience, bad_step: int | None, value: float, epoch: int,
                  steps: int) -> TrainingDiverged:
        where = f"task {experience.task_id + 1}/{len(self.train_experiences)} (task index {experience.task_id})"
        if bad_step is None:  # every step was finite but their sum overflowed
            at = f"in epoch {epoch + 1}/{self.run.epochs}"
        else:
            at = (f"at epoch {bad_step // steps + 1}/{self.run.epochs}, step {bad_step % steps + 1}/{steps} "
                  f"(step {bad_step + 1} of the task)")
        return TrainingDiverged(f"training loss became {value} in {where} {at}; lower --lr or check the data")

    # ----- evaluation -----
    def eval_class_mask(self) -> torch.Tensor | None:
        """Class-IL: the classes seen so far (``eval_classes: seen``); None predicts over every class
        of the stream (``eval_classes: all``, as l2p-pytorch evaluates) and in domain-IL."""
        if self.stream.kind != CLASS_IL or self.run.eval_classes == "all":
            return None
        mask = torch.zeros(self.stream.n_classes, dtype=torch.bool, device=self.device)
        mask[self.strategy.seen_classes] = True
        return mask

    @torch.no_grad()
    def evaluate(self, experience: Experience) -> float:
        """Accuracy (percent) on ``experience``'s test set; class-IL predicts among seen classes only."""
        strategy, size = self.strategy, self.run.eval_batch_size
        strategy.eval()
        class_mask = self.eval_class_mask()
        images = experience.test_images.to(self.device, non_blocking=True)
        labels = experience.test_labels.to(self.device, non_blocking=True)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._sync()
        start = time.perf_counter()
        for global_first in range(0, len(labels), size):  # every rank walks every batch, keeping its shard
            first, end = distributed.shard(global_first, min(global_first + size, len(labels)))
            index = torch.arange(first, end, device=self.device)
            batch = Batch(prepare(images[index], self.image_size, self.mean, self.std, train=False,
                                  test_crop=self.run.test_crop),
                          labels[index], experience.task_id, False, index, eval_slice=(first, end))
            with self.autocast():
                logits = strategy(batch).logits.float()
            if class_mask is not None:
                logits = logits.masked_fill(~class_mask, float("-inf"))
            correct += (logits.argmax(dim=1) == batch.labels).sum()
        accuracy = 100.0 * distributed.all_reduce_sum(correct).item() / max(len(labels), 1)
        self._sync()
        self.timer.seconds["eval"] += time.perf_counter() - start
        self.timer.images["eval"] += len(labels)
        return accuracy

    # ----- the loop -----
    def task_metrics(self, i: int) -> dict[str, float]:
        row = self.state.acc_matrix[i]
        test_sizes = [len(e.test_labels) for e in self.stream.experiences]  # acc_seen weighs tasks by these
        if self.run.joint:
            seen = metrics.weighted_accuracy(row, test_sizes)
            values = {"acc_avg": float(np.nanmean(row)), "forgetting": 0.0, "bwt": 0.0, "acc_seen": seen,
                      "acc_inc_avg": seen}
        else:
            values = metrics.summary(self.state.acc_matrix, i, test_sizes)
        values.update({f"acc/task_{j}": float(row[j]) for j in range(len(row)) if not np.isnan(row[j])})
        return values

    def run_all(self) -> np.ndarray:
        for i in range(self.state.tasks_done, len(self.train_experiences)):
            self.train_task(self.train_experiences[i])
            tested = self.stream.experiences if self.run.joint else self.stream.experiences[: i + 1]
            for experience in tested:
                self.state.acc_matrix[i, experience.task_id] = self.evaluate(experience)
            self.state.tasks_done = i + 1
            distributed.reduce_selection_stats(self.strategy, None)  # the evaluation round, every rank's images
            report = self.strategy.task_report()
            values = self.task_metrics(i)
            values.update(report.metrics)
            values.update({"trainable_params": float(self.strategy.count_trainable()),
                           "perf/train_img_s": self.timer.rate("train"),
                           "perf/eval_img_s": self.timer.rate("eval")})
            self.log_metrics(values, i)
            self.last_report = report
            if self.on_task_end is not None:
                self.on_task_end(i, self)
        return self.state.acc_matrix
