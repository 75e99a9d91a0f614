"""The rehearsal buffer: the one component every replay strategy (ER, DER/DER++, iCaRL, GDumb) shares.

It holds uint8 images exactly as the scenario stores them (the engine augments replayed rows as
it augments current ones), their labels, the task each came from, a rank within its group (the
herding order, for iCaRL's reductions) and, when asked, the logits seen at insertion (DER). The
tensors live on the device of the images first added, so a replay draw costs no host transfer.

Three ways to choose what stays, each the reference's rule:

- ``add_reservoir`` (ER, DER/DER++; mammoth ``utils/buffer.py``, Vitter's algorithm R): the n-th
  sample offered goes to a free slot while there is one, then replaces slot ``j ~ U{0..n-1}`` if
  ``j < capacity``, so every sample seen stays with probability capacity / seen. Vectorised per
  batch on the device (a slot drawn twice in one batch keeps the later sample, as the sequential
  rule does); no host synchronisation.
- ``add_balanced`` (GDumb's greedy class-balanced sampler): a sample enters a full buffer only if
  its class holds fewer samples than the largest class, evicting a random member of that class.
- herding (iCaRL): ``herding_order`` ranks a group's samples, ``keep``/``append`` rebuild the buffer.

The budget is ``buffer_size`` images in total, or ``per_class`` images per class of the stream
(``capacity_from``): the L2P table's "10/class" is 1,000 images on Split CIFAR-100.

``state_dict()`` holds the filled rows and counters (plain tensors and ints) for the checkpoint;
the draws come from ``generator``, which strategies reseed from (seed, task) at every task, so a
run resumed at a task boundary draws what the uninterrupted one does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from clframe.errors import ClframeError

if TYPE_CHECKING:
    from clframe.strategies.base import Replay


def capacity_from(buffer_size: int, per_class: int, n_classes: int, strategy: str) -> int:
    """The buffer's size in images: ``buffer_size`` if set, else ``per_class`` x classes of the stream."""
    if (buffer_size > 0) == (per_class > 0):
        raise ClframeError(f"{strategy}: set exactly one of {strategy}.buffer_size (images in total) and "
                           f"{strategy}.per_class (images per class of the stream); the other must be 0")
    return buffer_size if buffer_size > 0 else per_class * n_classes


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al. 2017, Alg. 4; mammoth ``fill_buffer``): the k-th pick is the
    sample that brings the mean of the picks closest to the mean of all ``features`` [n, d];
    without repetition. Returns the indices of the first min(m, n) picks, in order."""
    features = features.float()
    target = features.mean(0)
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    picks = []
    for k in range(min(m, len(features))):
        cost = (target - (running + features) / (k + 1)).norm(dim=1).masked_fill(~available, float("inf"))
        pick = int(cost.argmin())
        picks.append(pick)
        available[pick] = False
        running = running + features[pick]
    return torch.tensor(picks, dtype=torch.long, device=features.device)


class RehearsalBuffer:
    """Up to ``capacity`` uint8 images with labels, task ids, group ranks and optional logits."""

    def __init__(self, capacity: int, *, keep_logits: bool = False) -> None:
        self.capacity = capacity
        self.keep_logits = keep_logits
        self.size = 0  # filled rows: images[:size]
        self.seen = 0  # samples offered to add_reservoir so far
        self.images: torch.Tensor | None = None  # allocated at the first insertion (+1 scratch row)
        self.labels = self.tasks = self.ranks = self.logits = None
        self.generator: torch.Generator | None = None

    # ----- storage -----
    def _allocate(self, images: torch.Tensor, logits: torch.Tensor | None) -> None:
        if self.images is not None:
            return
        rows, device = self.capacity + 1, images.device  # the last row takes writes that lose (add_reservoir)
        self.images = torch.zeros((rows, *images.shape[1:]), dtype=torch.uint8, device=device)
        self.labels = torch.zeros(rows, dtype=torch.long, device=device)
        self.tasks = torch.zeros(rows, dtype=torch.long, device=device)
        self.ranks = torch.zeros(rows, dtype=torch.long, device=device)
        if self.keep_logits:
            if logits is None:
                raise ValueError("this buffer keeps logits: pass them at every insertion")
            self.logits = torch.zeros((rows, logits.shape[1]), dtype=torch.float32, device=device)

    @staticmethod
    def nbytes_for(capacity: int, image_shape: tuple[int, ...], logit_dim: int = 0) -> int:
        """Device memory of a full buffer: uint8 images, three int64 columns, float32 logits."""
        per_row = int(torch.Size(image_shape).numel()) + 3 * 8 + 4 * logit_dim
        return capacity * per_row

    def reseed(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _rng(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device.type != device.type:
            self.reseed(0, device)
        return self.generator

    def _write(self, slots: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, task_id: int,
               ranks: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        self.images.index_copy_(0, slots, images.to(self.images.device))
        self.labels.index_copy_(0, slots, labels.to(self.labels.device))
        self.tasks.index_fill_(0, slots, task_id)
        self.ranks.index_copy_(0, slots, ranks if ranks is not None else torch.zeros_like(slots))
        if self.logits is not None:
            self.logits.index_copy_(0, slots, logits.detach().float().to(self.logits.device))

    # ----- selection rules -----
    @torch.no_grad()
    def add_reservoir(self, images: torch.Tensor, labels: torch.Tensor, task_id: int,
                      logits: torch.Tensor | None = None) -> None:
        """Reservoir sampling over every sample ever offered (see the module docstring)."""
        k = len(labels)
        if not k or not self.capacity:
            return
        self._allocate(images, logits)
        device = self.images.device
        position = torch.arange(self.seen, self.seen + k, device=device)
        drawn = (torch.rand(k, generator=self._rng(device), device=device, dtype=torch.float64)
                 * (position + 1)).long()  # uniform over 0..position
        slot = torch.where(position < self.capacity, position, drawn)
        order = torch.arange(k, device=device)
        accepted = slot < self.capacity
        slot = torch.where(accepted, slot, self.capacity)
        last = torch.full((self.capacity + 1,), -1, dtype=torch.long, device=device)
        last = last.scatter_reduce(0, slot, torch.where(accepted, order, -1), "amax")
        slot = torch.where(accepted & (last[slot] == order), slot, self.capacity)  # losers go to the scratch row
        self._write(slot, images, labels, task_id, logits=logits)
        self.seen += k
        self.size = min(self.seen, self.capacity)

    @torch.no_grad()
    def add_balanced(self, images: torch.Tensor, labels: torch.Tensor, task_id: int) -> None:
        """GDumb's greedy class-balanced sampler over the samples in order (decided on the host)."""
        if not len(labels) or not self.capacity:
            return
        self._allocate(images, None)
        seed = int(torch.randint(2**62, (1,), generator=self._rng(self.images.device)))
        host_rng = torch.Generator().manual_seed(seed)  # the choices are made on the host
        members: dict[int, list[int]] = {}
        for slot, label in enumerate(self.labels[:self.size].tolist()):
            members.setdefault(label, []).append(slot)
        written: dict[int, int] = {}  # slot -> index of the incoming sample that ends there
        for i, label in enumerate(labels.tolist()):
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                largest = max(len(v) for v in members.values())
                if len(members.get(label, ())) >= largest:
                    continue
                crowded = [c for c, v in members.items() if len(v) == largest]
                victim_class = crowded[int(torch.randint(len(crowded), (1,), generator=host_rng))]
                victims = members[victim_class]
                slot = victims.pop(int(torch.randint(len(victims), (1,), generator=host_rng)))
            members.setdefault(label, []).append(slot)
            written[slot] = i
        if written:
            slots = torch.tensor(list(written), dtype=torch.long, device=self.images.device)
            index = torch.tensor(list(written.values()), dtype=torch.long, device=images.device)
            self._write(slots, images[index], labels[index], task_id)

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the filled rows ``index`` (in that order), e.g. each group's first m by rank."""
        if self.images is None:
            return
        index = index.to(self.images.device)
        n = len(index)
        for name in ("images", "labels", "tasks", "ranks", "logits"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[:n] = tensor[index].clone()
        self.size = n

    @torch.no_grad()
    def append(self, images: torch.Tensor, labels: torch.Tensor, task_id: int, ranks: torch.Tensor,
               logits: torch.Tensor | None = None) -> None:
        """Add rows after the filled ones (herding's picks); the caller keeps within capacity."""
        if not len(labels):
            return
        if self.size + len(labels) > self.capacity:
            raise ValueError(f"appending {len(labels)} rows to {self.size} overflows capacity {self.capacity}")
        self._allocate(images, logits)
        slots = torch.arange(self.size, self.size + len(labels), device=self.images.device)
        self._write(slots, images, labels, task_id, ranks.to(self.images.device), logits)
        self.size += len(labels)

    # ----- reading -----
    def sample(self, m: int) -> Replay | None:
        """``m`` rows drawn without replacement (fewer if fewer are filled), as mammoth's get_data."""
        from clframe.strategies.base import Replay  # here: the strategies package imports this module

        if not self.size or m <= 0:
            return None
        device = self.images.device
        index = torch.randperm(self.size, generator=self._rng(device), device=device)[:m]
        return Replay(self.images[index], self.labels[index],
                      self.logits[index] if self.logits is not None else None)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows' images and labels (views)."""
        if self.images is None:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        return self.images[:self.size], self.labels[:self.size]

    def groups(self) -> set[tuple[int, int]]:
        """The (class, task) pairs held (herding budgets are per group)."""
        if not self.size:
            return set()
        return set(zip(self.labels[:self.size].tolist(), self.tasks[:self.size].tolist()))

    def histogram(self, n_classes: int) -> list[int]:
        """Images held per class (one host read)."""
        if not self.size:
            return [0] * n_classes
        return torch.bincount(self.labels[:self.size], minlength=n_classes).tolist()

    def histogram_csv(self, class_names: list[str]) -> str:
        counts = self.histogram(len(class_names))
        rows = (f"{c},{name},{n}\n" for c, (name, n) in enumerate(zip(class_names, counts)))
        return "class,name,images\n" + "".join(rows)

    # ----- checkpoint -----
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"capacity": self.capacity, "size": self.size, "seen": self.seen}
        if self.images is not None:
            for name in ("images", "labels", "tasks", "ranks", "logits"):
                tensor = getattr(self, name)
                if tensor is not None:
                    state[name] = tensor[:self.size].detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ClframeError(f"the checkpoint's rehearsal buffer holds {state['capacity']} images, this config "
                               f"{self.capacity}; resume with the buffer size the run began with")
        self.size, self.seen = int(state["size"]), int(state["seen"])
        self.images = None
        if "images" in state:
            self._allocate(state["images"].to(device), state.get("logits"))
            for name in ("images", "labels", "tasks", "ranks", "logits"):
                if name in state:
                    getattr(self, name)[:self.size] = state[name].to(device)
