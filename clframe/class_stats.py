"""Running per-class feature statistics: the one component every statistics-based strategy shares.

Prototype classifiers (SimpleCIL, APER, EASE, iCaRL's nearest-mean), ridge regression (RanPAC)
and classifier alignment from class Gaussians (SLCA) all reduce a task's features to a few sums.
``ClassStatistics`` keeps exactly those sums, updated batch by batch on the features' device, so a
statistics pass never holds a task's features in memory and a checkpoint holds only
``state_dict()`` (plain tensors): a run resumed at a task boundary continues from the same sums and
produces the same matrices as an uninterrupted run.

What is kept (each optional, so a strategy pays only for what it reads):

- always: ``counts`` [C] and per-class feature sums [C, D] -> ``means()``;
- ``covariance=True``: per-class sums of outer products [C, D, D] -> ``covariance(c)`` (unbiased,
  as ``torch.cov``); memory C*D*D, so keep D small or the dtype float32 for many classes;
- ``ridge=True``: ``gram`` = features^T features [D, D] and ``class_sums`` = features^T onehot
  [D, C], the two matrices of ridge regression (RanPAC's G and Q).

Sums are accumulated in ``dtype`` (float64 by default): the Gram matrix of tens of thousands of
ReLU features loses digits in float32, and the ridge solve with a small lambda needs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassStatistics:
    """Per-class counts and sums (plus optional covariances, Gram and class-sum matrices)."""

    def __init__(self, n_classes: int, dim: int, *, covariance: bool = False, ridge: bool = False,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> None:
        self.n_classes, self.dim, self.dtype = n_classes, dim, dtype
        self.counts = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.sums = torch.zeros(n_classes, dim, dtype=dtype, device=device)
        self.outer = torch.zeros(n_classes, dim, dim, dtype=dtype, device=device) if covariance else None
        self.gram = torch.zeros(dim, dim, dtype=dtype, device=device) if ridge else None
        self.class_sums = torch.zeros(dim, n_classes, dtype=dtype, device=device) if ridge else None

    @property
    def device(self) -> torch.device:
        return self.sums.device

    def to(self, device: torch.device | str) -> "ClassStatistics":
        """Moves every sum to ``device`` (in place) and returns self."""
        for name, value in self._tensors().items():
            setattr(self, name, value.to(device))
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch: ``features`` [N, D] (any float dtype/device), ``labels`` [N] class ids."""
        x = features.detach().to(self.device, self.dtype)
        labels = labels.to(self.device)
        if x.shape[-1] != self.dim:
            raise ValueError(f"features have {x.shape[-1]} dims, statistics were built for {self.dim}")
        self.counts += torch.bincount(labels, minlength=self.n_classes)
        self.sums.index_add_(0, labels, x)
        if self.outer is not None:
            for c in labels.unique().tolist():
                rows = x[labels == c]
                self.outer[c] += rows.T @ rows
        if self.gram is not None:
            self.gram += x.T @ x
            self.class_sums += x.T @ F.one_hot(labels, self.n_classes).to(self.dtype)

    def means(self) -> torch.Tensor:
        """[C, D] class means; rows of classes never seen are zero."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1).to(self.dtype)

    def covariance(self, c: int) -> torch.Tensor:
        """[D, D] unbiased covariance of class ``c`` (as ``torch.cov``; zero with fewer than 2 samples)."""
        if self.outer is None:
            raise RuntimeError("covariances were not kept: build ClassStatistics(..., covariance=True)")
        n = int(self.counts[c])
        if n < 2:
            return torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        mean = self.sums[c] / n
        return (self.outer[c] - n * torch.outer(mean, mean)) / (n - 1)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("counts", "sums", "outer", "gram", "class_sums")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (on the host) for a checkpoint."""
        return {name: value.detach().cpu().clone() for name, value in self._tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores ``state_dict()``'s sums onto this object's device; the kept parts must match."""
        mine = self._tensors()
        if set(state) != set(mine):
            raise ValueError(f"statistics state holds {sorted(state)}, expected {sorted(mine)}")
        for name, value in state.items():
            if value.shape != mine[name].shape:
                raise ValueError(f"statistics '{name}' has shape {tuple(value.shape)}, expected {tuple(mine[name].shape)}")
            setattr(self, name, value.to(mine[name].device, mine[name].dtype).clone())
