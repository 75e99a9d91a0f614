"""What the rehearsal and regularisation baselines share: the network they train, and the buffer.

The L2P paper's table fine-tunes the whole ViT for EWC, LwF, ER, GDumb, DER++ and iCaRL; with a
frozen backbone the same methods run on a PEFT module instead. Rather than a copy of each PEFT
module, ``NetworkStrategy`` builds the existing strategy that ``trainable`` names (``all`` is
``finetune``, ``head`` is ``linear``, the rest are the PEFT strategies of the same name, each with
its ``configs/<name>.yaml`` section and ``network`` overrides) and delegates ``forward`` to it.

The network's backbone is registered on the baseline itself (the network reads it as a plain
attribute), so the engine, the fast paths and the checkpoint see it as every strategy's
``backbone``: a frozen backbone stays out of the checkpoint, a fine-tuned one goes in.

Also shared: ``features`` (what the classifier reads: iCaRL's herding and class means) and a
teacher (the trainable weights at the end of the previous task, run with ``functional_call`` on
the same batch: LwF's and iCaRL's distillation targets) that costs one copy of the trainable
weights and nothing in the checkpoint, because it equals the weights a task-boundary checkpoint holds.

``RehearsalStrategy`` adds the one ``clframe.rehearsal.RehearsalBuffer`` with its budget, per-task
reseeding, checkpointing, MLflow params (``buffer_capacity`` in images, ``buffer_bytes``) and a per-task class
histogram artifact (``task_<i>/buffer_histogram.csv``). It runs on one process: under torchrun each
rank would insert its own shard into its own buffer (the buffers diverge, and only rank 0's is
checkpointed), and per-rank replay sizes would desync the augmentation draws that every rank
shares, so several processes are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from clframe import distributed
from clframe.config import RunConfig, build_section, builtin_config, option
from clframe.errors import ClframeError
from clframe.registry import STRATEGIES
from clframe.rehearsal import RehearsalBuffer, capacity_from
from clframe.scenarios.base import Experience
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport

# trainable -> the strategy whose network trains
NETWORKS = {"all": "finetune", "head": "linear", "adapter": "adapter", "vpt_shallow": "vpt_shallow",
            "vpt_deep": "vpt_deep", "prefix": "prefix", "bitfit": "bitfit", "partial_k": "partial_k",
            "mlp_k": "mlp_k", "side_tuning": "side_tuning"}


@dataclass
class NetworkConfig(StrategyConfig):
    trainable: str = option("all", "what trains: all (full fine-tuning, as the L2P paper's table), head (a linear "
                            "probe), or a PEFT module on the frozen backbone", choices=tuple(NETWORKS))
    network: dict = option(None, "options of the PEFT strategy 'trainable' names, over its configs/<name>.yaml "
                           "section, e.g. {dim: 16} for adapter", factory=dict)


class NetworkStrategy(Strategy):
    """Base of the rehearsal/regularisation baselines: ``self.net`` computes the logits."""

    config_cls = NetworkConfig

    def __init__(self, config: NetworkConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        network = NETWORKS[config.trainable]
        entry = STRATEGIES.get(network)
        values = dict(builtin_config(network).get(network) or {})
        values.update(config.network)
        net = entry.obj(build_section(entry.config_cls, values, f"{self.name}.network"), run, info)
        self.backbone = net._modules.pop("backbone")
        object.__setattr__(net, "backbone", self.backbone)  # read, not registered: one backbone, ours
        self.net = net
        self._teacher: dict[str, torch.Tensor] | None = None

    def forward(self, batch: Batch) -> ForwardOutput:
        return self.net(batch)

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def before_task(self, experience: Experience) -> None:
        super().before_task(experience)
        self.net.before_task(experience)

    def after_task(self, experience: Experience) -> None:
        super().after_task(experience)
        self.net.after_task(experience)

    def load_cl_state(self, state: dict[str, Any]) -> None:
        super().load_cl_state(state)
        self.net.load_cl_state(state)

    def features(self, batch: Batch) -> torch.Tensor:
        """What the network's classifier reads for ``batch`` (the input of ``net.head``)."""
        seen: list[torch.Tensor] = []
        handle = self.net.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.net(batch)
        finally:
            handle.remove()
        return seen[0]

    # ----- the previous task's model (LwF, iCaRL) -----
    def trainable_named(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def keep_teacher(self) -> None:
        """Freeze a copy of the trainable weights as they are now (at the end of a task)."""
        self._teacher = {name: p.detach().clone() for name, p in self.trainable_named().items()}

    @property
    def has_teacher(self) -> bool:
        return self._teacher is not None

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The kept model's logits on ``batch`` (the same augmented images the student sees), in
        eval mode (dropout off) and the engine's precision, as a frozen copy would give them."""
        was_training = self.training
        self.eval()
        try:
            with self.autocast():
                return functional_call(self, self._teacher, (batch,), strict=False).logits.float()
        finally:
            self.train(was_training)

    def extra_state(self) -> dict[str, Any]:
        return {"has_teacher": self.has_teacher, "net": self.net.extra_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """The teacher is the weights the checkpoint was written with, which the runner has
        already loaded (``restore``: weights, then continual-learning state, then this)."""
        self.net.load_extra_state(state.get("net", {}))
        self._teacher = None
        if state.get("has_teacher"):
            self.keep_teacher()


def check_one_process(strategy_cls: type, processes: int) -> None:
    """Refuse a rehearsal strategy on several processes (see the module docstring): ``clframe run
    --gpus N`` asks before it launches torchrun, and every rank asks again as it builds the strategy."""
    if processes > 1 and issubclass(strategy_cls, RehearsalStrategy):
        raise ClframeError(f"strategy {strategy_cls.name}: rehearsal strategies run on one process: drop --gpus "
                           f"(or run it without torchrun)")


@dataclass
class RehearsalConfig(NetworkConfig):
    buffer_size: int = option(0, "rehearsal buffer size in images (0: use per_class)", min=0)
    per_class: int = option(10, "images per class of the stream when buffer_size is 0 (the L2P table's 10/class = "
                            "1,000 images on Split CIFAR-100)", min=0)


class RehearsalStrategy(NetworkStrategy):
    """A ``NetworkStrategy`` with a ``RehearsalBuffer``: budget, per-task reseeding, the task's
    uint8 images on the device for insertion, checkpointing, MLflow params and the histogram."""

    config_cls = RehearsalConfig
    keep_logits = False

    def __init__(self, config: RehearsalConfig, run: RunConfig, info: StreamInfo) -> None:
        check_one_process(type(self), distributed.world())
        super().__init__(config, run, info)
        capacity = capacity_from(config.buffer_size, config.per_class, info.n_classes, self.name)
        self.buffer = RehearsalBuffer(capacity, keep_logits=self.keep_logits)
        self.task_images: torch.Tensor | None = None  # this task's uint8 images, on the device

    def before_task(self, experience: Experience) -> None:
        from clframe.engine import task_seed  # here: the engine imports the strategies package

        super().before_task(experience)
        self.buffer.reseed(task_seed(self.run_config.seed, experience.task_id, 101), self.device())

    def train_set(self, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's images, moved to the device once here (the engine's own move is then a no-op)
        so that the buffer can copy rows of the current batch by index."""
        self.task_images = experience.train_images.to(self.device())
        return self.task_images, experience.train_labels

    def current_rows(self, batch: Batch) -> torch.Tensor:
        """The uint8 images of the batch's current (non-replayed) rows."""
        return self.task_images[batch.index]

    def after_task(self, experience: Experience) -> None:
        super().after_task(experience)
        self.task_images = None

    def extra_params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        logit_dim = self.info.n_classes if self.keep_logits else 0
        return {"buffer_capacity": self.buffer.capacity,
                "buffer_bytes": RehearsalBuffer.nbytes_for(self.buffer.capacity, image_shape, logit_dim)}

    def task_report(self) -> TaskReport:
        report = super().task_report()
        report.metrics["buffer/images"] = float(self.buffer.size)
        report.artifacts["buffer_histogram.csv"] = self.buffer.histogram_csv(self.info.class_names)
        return report

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.buffer.load_state_dict(state["buffer"], self.device())
