"""Continual-learning metrics from the accuracy matrix, exactly as DESIGN.md defines them.

``A[i][j]`` is the accuracy (percent) on task j's test set after training on task i (j <= i).
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


def summary(acc_matrix: np.ndarray, i: int) -> dict[str, float]:
    return {"acc_avg": average_accuracy(acc_matrix, i), "forgetting": forgetting(acc_matrix, i),
            "bwt": backward_transfer(acc_matrix, i)}


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
