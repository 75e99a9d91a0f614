"""The Strategy base class: what a continual-learning method may change, and nothing else.

The engine owns the loop, devices, mixed precision, optimisation, evaluation, logging and
checkpoints. A strategy is an ``nn.Module`` that holds its backbone and its own parameters and
overrides a few hooks. The engine calls them in this order::

    strategy = MyStrategy(cfg, run, stream_info)          # build modules; freeze what stays fixed
    for experience in stream:
        strategy.before_task(experience)                  # grow/initialise per-task state
        images, labels = strategy.train_set(experience)   # default: the experience's training split
        optimizer = strategy.configure_optimizer()        # fresh optimizer over trainable_parameters()
        for each batch (skipped when nothing trains):
            replay = strategy.replay(n)                   # rehearsal: uint8 samples appended to the batch
            out = strategy(batch); loss = strategy.loss(out, batch, class_mask); step
        strategy.after_task(experience)                   # consolidate, freeze, statistics passes, ...
        for each test set seen so far:  strategy(batch) with batch.training False
        strategy.task_report()                            # extra metrics/artifacts for this task

Hooks and what they may change:

- ``__init__``: build the backbone (``create_backbone(run)``), heads, prompts; set
  ``requires_grad`` of everything. Must call ``super().__init__``.
- ``trainable_parameters()``: the parameters the optimizer updates (default: those with
  ``requires_grad``). The engine clips the grad norm over exactly these.
- ``forward(batch) -> ForwardOutput``: logits over *all* classes of the stream (the engine masks
  classes not seen yet), plus optional ``extra_loss`` (added to the loss at training) and
  ``selected`` (e.g. prompt ids, for reports). It must not use ``batch.task_id`` to predict at
  test time: it is given only so a strategy can *report* task-identification accuracy.
- ``loss(out, batch, class_mask)``: default is cross-entropy over the logits masked to the classes
  that ``config.train_mask`` allows (``class_mask``, None = all), plus ``out.extra_loss``.
- ``before_task(experience)`` / ``after_task(experience)``: per-task bookkeeping. Call super().
- ``train_set(experience) -> (uint8 images, labels)``: what the task trains on (GDumb trains on
  its buffer instead). With no trainable parameters the engine skips the training loop.
- ``replay(n_current) -> Replay | None``: rehearsal. Samples returned here (uint8 images on the
  device, labels, optionally stored logits) are augmented exactly as the current images and
  appended to the batch: ``batch.images[batch.n_current:]`` are the replayed rows and
  ``batch.replay`` holds their labels/logits. The default returns None and costs nothing.
- ``task_batches(experience)`` / ``prepared_batches(images, labels)``: after training (EWC's
  Fisher, prototypes, herding), the images of a task prepared by the engine exactly as for
  evaluation (resized, normalised; augmented only with ``augment=True``), as ``Batch`` objects on
  the device; run the model inside ``self.autocast()`` to match training's precision.
- ``configure_optimizer(params, lr)``: override for per-group learning rates.
- ``input_spec()``: image size and normalisation (default: the timm backbone's).
- ``task_report()``: ``TaskReport(metrics, artifacts)`` logged at the task step.
- ``extra_params(image_shape)``: MLflow params the strategy adds when the run opens (e.g. a rehearsal
  buffer's size and bytes); ``image_shape`` is the stream's stored uint8 image shape [3, H, W].
- ``extra_state()`` / ``load_extra_state()``: non-parameter state a checkpoint must keep.
- ``capturable_step = True`` (class attribute): the strategy promises that its training forward and
  loss can be captured as one CUDA graph with the backward and the update (see clframe.step_graph:
  no host sync, no Python state that changes within a task); the engine then replays the step.
  It is not inherited: a subclass of a capturable strategy steps eagerly until it declares it too.

Read-only continual-learning state: ``seen_classes``, ``current_classes``, ``task_id``.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clframe.config import RunConfig, option
from clframe.models import input_stats, native_image_size
from clframe.errors import ClframeError
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience


KIND_NAMES = {CLASS_IL: "class-IL", DOMAIN_IL: "domain-IL"}
KIND_EXAMPLES = {CLASS_IL: "split_digits, split_cifar100, ...", DOMAIN_IL: "rotated_digits, corrupted_digits, ..."}


@dataclass
class StrategyConfig:
    """Fields every strategy has; a strategy's own config subclasses this."""

    train_mask: str = option("seen", "training logits limited to: classes seen so far, the current "
                             "task's, or none (all classes)", choices=("seen", "current", "none"))


@dataclass
class StreamInfo:
    """What a strategy may know about the stream when it is built."""

    kind: str
    n_classes: int
    class_names: list[str]
    domain_names: list[str] | None
    n_tasks: int


@dataclass
class Batch:
    """One batch as a strategy sees it; ``images`` are float, augmented and normalised."""

    images: torch.Tensor
    labels: torch.Tensor
    task_id: int  # the task the images come from (reporting only at test time)
    training: bool
    index: torch.Tensor | None = None  # positions in the task's split
    # At evaluation, the [first, end) positions of these images in the task's test set, on the host:
    # the same (task_id, eval_slice) always holds the same images, so a strategy may cache what depends
    # only on its frozen model (see clframe.query_cache) without a device sync.
    eval_slice: tuple[int, int] | None = None
    # Rehearsal: the first ``n_current`` rows are the task's own images, the rest are ``replay``'s.
    n_current: int | None = None
    replay: "Replay | None" = None


@dataclass
class Replay:
    """Samples a rehearsal strategy adds to a training batch (see ``Strategy.replay``)."""

    images: torch.Tensor  # uint8 [m, 3, H, W] on the engine's device
    labels: torch.Tensor  # int64 [m]
    logits: torch.Tensor | None = None  # stored at insertion (DER/DER++)


class EngineIO(Protocol):
    """What the engine lends a strategy for passes outside the training loop."""

    device: torch.device

    def batches(self, images: torch.Tensor, labels: torch.Tensor, task_id: int, augment: bool,
                batch_size: int | None) -> Iterator["Batch"]: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    extra_loss: torch.Tensor | None = None
    selected: torch.Tensor | None = None


@dataclass
class TaskReport:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # file name -> text content


class Strategy(nn.Module, abc.ABC):
    """Base class of every continual-learning method (see the module docstring for the hooks)."""

    name: ClassVar[str] = "strategy"
    config_cls: ClassVar[type] = StrategyConfig
    # Stream kinds it can serve (any other is refused in one line) and the kind of backbone it builds,
    # which picks the run keys a scenario's config file gives it (``backbones:`` in configs/<scenario>.yaml).
    kinds: ClassVar[tuple[str, ...]] = (CLASS_IL, DOMAIN_IL)
    backbone_kind: ClassVar[str] = "timm"
    # The training step (forward + loss) may be captured as a CUDA graph (clframe.step_graph): it makes
    # no host sync, reads the batch only through its images/labels/index tensors, depends on no Python
    # value that changes within a task, and changes state only by tensor operations on the device.
    # Read from the class itself, never inherited (clframe.engine.declares_capturable_step).
    capturable_step: ClassVar[bool] = False

    def __init__(self, config: Any, run: RunConfig, info: StreamInfo) -> None:
        super().__init__()
        self.config = config
        self.run_config = run
        self.info = info
        self._seen: list[int] = []
        self._current: list[int] = []
        self._task_id = -1
        self._engine_io: EngineIO | None = None  # set by the engine (clframe.engine.Engine)
        if info.kind not in self.kinds:
            wanted = " or ".join(f"{KIND_NAMES.get(k, k)} scenario ({KIND_EXAMPLES.get(k, '...')})" for k in self.kinds)
            raise ClframeError(f"strategy {self.name} needs a {wanted}, not a {KIND_NAMES.get(info.kind, info.kind)} "
                               f"one; clframe list shows the kinds each strategy serves")

    # ----- read-only continual-learning state -----
    @property
    def seen_classes(self) -> list[int]:
        return list(self._seen)

    @property
    def current_classes(self) -> list[int]:
        return list(self._current)

    @property
    def task_id(self) -> int:
        return self._task_id

    # ----- hooks -----
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    @abc.abstractmethod
    def forward(self, batch: Batch) -> ForwardOutput:
        """Logits over all classes of the stream for ``batch.images``."""

    def before_task(self, experience: Experience) -> None:
        self._task_id = experience.task_id
        self._current = list(experience.classes)
        self._seen = sorted(set(self._seen) | set(experience.classes))

    def after_task(self, experience: Experience) -> None:
        """Called after training on ``experience``, before evaluation."""

    def train_set(self, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and labels the engine trains this task on (after ``before_task``)."""
        return experience.train_images, experience.train_labels

    def replay(self, n_current: int) -> Replay | None:
        """Rehearsal samples to append to a training batch of ``n_current`` images (default: none)."""
        return None

    # ----- engine-prepared data for passes outside the training loop -----
    def attach_engine(self, io: EngineIO | None) -> None:
        self._engine_io = io

    def _io(self) -> EngineIO:
        if self._engine_io is None:
            raise RuntimeError("prepared batches exist only once an Engine holds the strategy")
        return self._engine_io

    def prepared_batches(self, images: torch.Tensor, labels: torch.Tensor, *, task_id: int | None = None,
                         augment: bool = False, batch_size: int | None = None) -> Iterator[Batch]:
        """uint8 ``images`` prepared as the engine prepares evaluation images (or training images,
        with ``augment``), in order, as ``Batch`` objects on the device (``training`` False)."""
        task = self._task_id if task_id is None else task_id
        return self._io().batches(images, labels, task, augment, batch_size)

    def task_batches(self, experience: Experience, split: str = "train", *, augment: bool = False,
                     batch_size: int | None = None) -> Iterator[Batch]:
        """A task's training (or ``split="test"``) images, engine-prepared; see ``prepared_batches``."""
        images = experience.train_images if split == "train" else experience.test_images
        labels = experience.train_labels if split == "train" else experience.test_labels
        return self.prepared_batches(images, labels, task_id=experience.task_id, augment=augment,
                                     batch_size=batch_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The engine's mixed-precision context (a no-op before an engine holds the strategy)."""
        return self._engine_io.autocast() if self._engine_io is not None else contextlib.nullcontext()

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """(image size, mean, std) the engine prepares images with; default: the timm backbone's.
        A strategy with another kind of backbone (open_clip) overrides this."""
        size = self.run_config.image_size or native_image_size(self.backbone)
        mean, std = input_stats(self.backbone)
        return size, mean, std

    def configure_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        run = self.run_config
        if run.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=run.momentum, weight_decay=run.weight_decay)
        optimizer_cls = torch.optim.AdamW if run.optimizer == "adamw" else torch.optim.Adam
        return optimizer_cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=run.weight_decay)

    def train_class_mask(self) -> torch.Tensor | None:
        """Boolean [n_classes] of logits kept at training (None keeps all)."""
        if self.info.kind != CLASS_IL or self.config.train_mask == "none":
            return None
        allowed = self._current if self.config.train_mask == "current" else self._seen
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool)
        mask[allowed] = True
        return mask

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        logits = out.logits.float()
        if class_mask is not None:
            logits = logits.masked_fill(~class_mask, float("-inf"))
        loss = F.cross_entropy(logits, batch.labels)
        if out.extra_loss is not None:
            loss = loss + out.extra_loss
        return loss

    def task_report(self) -> TaskReport:
        return TaskReport()

    def extra_params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: everything outside ``backbone`` plus the backbone's trainable
        parameters; never the frozen backbone (it is rebuilt from its weights)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k in trainable or not k.startswith("backbone.")}

    def cl_state(self) -> dict[str, Any]:
        return {"seen": list(self._seen), "current": list(self._current), "task_id": self._task_id}

    def load_cl_state(self, state: dict[str, Any]) -> None:
        self._seen, self._current, self._task_id = list(state["seen"]), list(state["current"]), int(state["task_id"])
