"""Shared pieces of the pre-trained-model baselines (SimpleCIL, APER, RanPAC, EASE, SLCA).

These methods barely train: they pass a task's images through a (mostly) frozen model once and
turn the features into a classifier. What they share lives here, once:

- ``statistics_pass``: the engine-prepared images of a task (evaluation preprocessing, no
  augmentation, as the references' ``mode="test"`` loaders) through a feature function under the
  engine's autocast, into ``ClassStatistics``;
- ``CosineHead`` / ``cosine_logits``: the cosine classifier of SimpleCIL/APER/EASE (LAMDA-PILOT
  ``backbone/linears.py`` CosineLinear, a learnable scale ``sigma`` that starts at 1);
- ``ridge_weights`` / ``choose_ridge``: RanPAC's ridge-regression head and its choice of lambda
  on held-out training rows (RanPAC authors' ``RanPAC.py`` ``optimise_ridge_parameter``), in float64.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clframe.class_stats import ClassStatistics

if TYPE_CHECKING:  # strategies import this module
    from clframe.scenarios.base import Experience
    from clframe.strategies.base import Strategy

# RanPAC's grid: 10^-8 ... 10^8 (``ridges = 10.0 ** np.arange(-8, 9)``).
RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))


@torch.no_grad()
def statistics_pass(strategy: "Strategy", experience: "Experience",
                    features: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
                    statistics: ClassStatistics | Sequence[ClassStatistics]) -> None:
    """Adds ``features(images)`` of every training image of ``experience`` to ``statistics``.

    ``features`` may return one tensor or one per ``statistics`` object (EASE: one per subspace).
    """
    many = not isinstance(statistics, ClassStatistics)
    targets = list(statistics) if many else [statistics]
    was_training = strategy.training
    strategy.eval()  # after_task runs in training mode; dropout must not touch statistics
    try:
        for batch in strategy.task_batches(experience):
            with strategy.autocast():
                output = features(batch.images)
            outputs = list(output) if many else [output]
            for stats, value in zip(targets, outputs):
                stats.update(value.float(), batch.labels)
    finally:
        strategy.train(was_training)


def cosine_logits(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """cos(feature, weight row) for every pair: [N, D] x [C, D] -> [N, C]; a zero row gives 0."""
    return F.linear(F.normalize(features.float(), dim=-1), F.normalize(weights.float(), dim=-1))


class CosineHead(nn.Module):
    """sigma * cos(features, weight rows); PILOT's CosineLinear (uniform(+-1/sqrt(D)) init, sigma 1)."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        self.weight.uniform_(-bound, bound)
        self.sigma.fill_(1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * cosine_logits(features, self.weight)


def ridge_weights(gram: torch.Tensor, class_sums: torch.Tensor, ridge: float) -> torch.Tensor:
    """[C, M] head W = ((G + ridge I)^-1 Q)^T from the Gram matrix G [M, M] and class sums Q [M, C],
    in float64 (Cholesky: G + ridge I is symmetric positive definite; LU if rounding says otherwise)."""
    g = gram.double() + ridge * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(class_sums.double(), factor).T
    return torch.linalg.solve(g, class_sums.double()).T


def choose_ridge(features: torch.Tensor, targets: torch.Tensor, grid: Sequence[float] = RIDGE_GRID,
                 train_fraction: float = 0.8) -> tuple[float, list[float]]:
    """RanPAC's lambda: fit on the first ``train_fraction`` of the rows, pick the grid value with the
    least mean squared error on the rest (rows should come shuffled). Returns (lambda, losses).

    One eigendecomposition serves the whole grid: of the Gram matrix F^T F when there are more rows
    than features, else of the kernel F F^T (the same solution, W^T = F^T (F F^T + l I)^-1 Y).
    """
    x, y = features.double(), targets.double()
    n_fit = int(len(x) * train_fraction)
    fit, held, y_fit, y_held = x[:n_fit], x[n_fit:], y[:n_fit], y[n_fit:]
    if n_fit >= x.shape[1]:  # primal: W^T = V diag(1/(e + l)) V^T F^T Y
        values, vectors = torch.linalg.eigh(fit.T @ fit)
        left, right = held @ vectors, vectors.T @ (fit.T @ y_fit)
    else:  # dual: held F^T U diag(1/(e + l)) U^T Y
        values, vectors = torch.linalg.eigh(fit @ fit.T)
        left, right = (held @ fit.T) @ vectors, vectors.T @ y_fit
    values = values.clamp(min=0)
    losses = [float(((left / (values + ridge)) @ right - y_held).pow(2).mean()) for ridge in grid]
    return float(grid[min(range(len(grid)), key=losses.__getitem__)]), losses
