"""Continual-learning metrics from the accuracy matrix, as the README defines them.

``A[i][j]`` is the accuracy (percent) on task j's test set after training on task i (j <= i), and
``n_j`` the size of task j's test set. Papers say "average accuracy" for two different things, so
each gets its own name here:

- ``acc_avg``: mean over j <= i of A[i][j], every task counting the same (l2p-pytorch's "Acc@1"
  of ``evaluate_till_now``, the mean of its accuracy matrix's row);
- ``acc_seen``: accuracy over all test samples of the tasks seen, sum_j n_j A[i][j] / sum_j n_j
  (PyCIL/PILOT's top-1 after a task; equals acc_avg when the test sets have equal sizes);
- ``acc_inc_avg``: mean of acc_seen over the steps 0..i (PyCIL/PILOT's "average accuracy" of the
  CNN/NME curve, the "average incremental accuracy" of iCaRL).

Pure numpy: this module knows nothing of torch modules.
"""
from __future__ import annotations

import io

import numpy as np


def average_accuracy(acc_matrix: np.ndarray, i: int) -> float:
    """Mean over j <= i of A[i][j]."""
    return float(np.mean(acc_matrix[i, : i + 1]))


def forgetting(acc_matrix: np.ndarray, i: int) -> float:
    """Mean over j < i of (max_{k in [j, i-1]} A[k][j]) - A[i][j]; 0 after the first task."""
    if i == 0:
        return 0.0
    drops = [np.max(acc_matrix[j:i, j]) - acc_matrix[i, j] for j in range(i)]
    return float(np.mean(drops))


def backward_transfer(acc_matrix: np.ndarray, i: int) -> float:
    """Mean over j < i of A[i][j] - A[j][j]; 0 after the first task."""
    if i == 0:
        return 0.0
    return float(np.mean([acc_matrix[i, j] - acc_matrix[j, j] for j in range(i)]))


def weighted_accuracy(accuracies: np.ndarray, test_sizes: list[int] | np.ndarray) -> float:
    """Sample-weighted mean of per-task accuracies, skipping tasks not evaluated (NaN)."""
    accuracies = np.asarray(accuracies, dtype=float)
    sizes = np.asarray(test_sizes, dtype=float)[: len(accuracies)]
    done = ~np.isnan(accuracies) & (sizes > 0)
    return float(np.sum(accuracies[done] * sizes[done]) / np.sum(sizes[done])) if done.any() else float("nan")


def seen_accuracy(acc_matrix: np.ndarray, i: int, test_sizes: list[int] | np.ndarray) -> float:
    """Accuracy over all test samples of tasks 0..i after training task i (sample-weighted)."""
    return weighted_accuracy(acc_matrix[i, : i + 1], test_sizes)


def incremental_average_accuracy(acc_matrix: np.ndarray, i: int, test_sizes: list[int] | np.ndarray) -> float:
    """Mean over steps k <= i of ``seen_accuracy(A, k)``."""
    return float(np.mean([seen_accuracy(acc_matrix, k, test_sizes) for k in range(i + 1)]))


def summary(acc_matrix: np.ndarray, i: int, test_sizes: list[int] | np.ndarray | None = None) -> dict[str, float]:
    """Every metric of step i; ``acc_seen``/``acc_inc_avg`` need the test-set sizes."""
    values = {"acc_avg": average_accuracy(acc_matrix, i), "forgetting": forgetting(acc_matrix, i),
              "bwt": backward_transfer(acc_matrix, i)}
    if test_sizes is not None:
        values.update(acc_seen=seen_accuracy(acc_matrix, i, test_sizes),
                      acc_inc_avg=incremental_average_accuracy(acc_matrix, i, test_sizes))
    return values


STD_DDOF = 1  # sample standard deviation over seeds (n - 1 in the denominator), as numpy's std(ddof=1)


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample std with ``STD_DDOF``, n) of the finite values; std is None for fewer than 2."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(finite):
        return float("nan"), None, 0
    std = float(np.std(finite, ddof=STD_DDOF)) if len(finite) > STD_DDOF else None
    return float(np.mean(finite)), std, len(finite)


def matrix_csv(acc_matrix: np.ndarray, rows_done: int) -> str:
    """CSV with a header ``after_task,task_0,...``; entries above the diagonal stay empty."""
    n = acc_matrix.shape[1]
    out = io.StringIO()
    out.write("after_task," + ",".join(f"task_{j}" for j in range(n)) + "\n")
    for i in range(rows_done):
        cells = [f"{acc_matrix[i, j]:.4f}" if not np.isnan(acc_matrix[i, j]) else "" for j in range(n)]
        out.write(f"{i}," + ",".join(cells) + "\n")
    return out.getvalue()


def format_matrix(acc_matrix: np.ndarray, rows_done: int) -> str:
    """A fixed-width table for the terminal."""
    n = acc_matrix.shape[1]
    lines = ["after  " + " ".join(f"T{j:<5d}" for j in range(n))]
    for i in range(rows_done):
        cells = [f"{acc_matrix[i, j]:6.2f}" if not np.isnan(acc_matrix[i, j]) else "     -" for j in range(n)]
        lines.append(f"T{i:<5d} " + " ".join(cells))
    return "\n".join(lines)


def new_matrix(n_tasks: int) -> np.ndarray:
    return np.full((n_tasks, n_tasks), np.nan)
