"""A pool of prompts with learned keys, and the bookkeeping of which prompts were chosen.

Shared by the key-query prompt methods (L2P, DualPrompt's E-prompts, CODA-Prompt's components):

- :class:`PromptPool`: ``M`` prompts of any shape (``[L, D]`` tokens for L2P, ``[layers, 2, L, D]``
  prefixes for DualPrompt) and one key ``[D]`` each; per-image top-N selection by cosine of the
  frozen query to the keys (through a :mod:`clframe.key_index` backend), the reference's batchwise
  majority vote, and the pull term that draws chosen keys toward their queries.
- :class:`SelectionStats`: per-task selection counts at training and evaluation, kept on the device
  (no host sync per step), the histogram as CSV, and task-identification accuracy.

Everything follows l2p-pytorch (JH-LEE-KR, f7bc994): normalisation ``x * rsqrt(max(sum(x²), 1e-12))``,
similarity in fp32, ``topk`` per image, and for the batchwise vote the same ``topk`` over the same
count layout, so ties resolve as the reference resolves them.
"""
from __future__ import annotations

import torch
from torch import nn

from clframe.distributed import all_reduce_sum
from clframe.key_index import KeyIndex, check_backend, l2_normalize, make_key_index

__all__ = ["PromptPool", "SelectionStats", "batch_majority", "task_credit", "l2_normalize"]


def batch_majority(ids: torch.Tensor, pool_size: int, n: int) -> torch.Tensor:
    """The ``n`` prompt ids chosen most often in ``ids`` [B, N] (a [n] tensor), without a host sync.

    l2p-pytorch runs ``topk`` over ``torch.unique(ids, return_counts=True)``'s counts (present ids
    ascending) padded with zeros to the pool size; the same values in the same layout are built
    here from a fixed-size count, so ties between equally frequent prompts break identically.
    Under torchrun the counts are summed over the ranks first, so the vote is the global batch's
    (every rank must call this at the same points: it is a collective then).
    """
    counts = torch.zeros(pool_size, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
    all_reduce_sum(counts)
    order = torch.sort((counts == 0).to(torch.int32), stable=True).indices  # present ids first, ascending
    return order[torch.topk(counts[order], n).indices]


def task_credit(ids: torch.Tensor, train_counts: torch.Tensor, true_task: int) -> torch.Tensor:
    """Per image [B], how much its chosen prompts identify ``true_task`` (1, 0, or 1/ties).

    Each trained task t has a usage profile: the share of its training selections that went to each
    prompt. An image's task guess is the task whose profile puts the most mass on the prompts the
    image chose; tasks that tie share the credit, so a pool that every task uses alike scores chance.
    Prompts that no trained task used (e.g. untrained keys searched with ``eval_keys=all``) identify
    nothing: an image that chose only those gets 0, not a share of a tie of zeros.
    """
    freq = train_counts.float() / train_counts.sum(dim=1, keepdim=True).clamp_min(1)  # [T, M]
    chosen = torch.zeros(ids.shape[0], train_counts.shape[1], device=ids.device).scatter_(1, ids, 1.0)
    score = chosen @ freq.t()  # [B, T]
    best = score.max(dim=1, keepdim=True).values
    tied = (score >= best - 1e-6) & (best > 0)
    return tied[:, true_task].float() / tied.sum(dim=1).clamp_min(1)


class PromptPool(nn.Module):
    """``size`` prompts of ``prompt_shape`` with one learned key of width ``key_dim`` each."""

    def __init__(self, size: int, key_dim: int, top_n: int, prompt_shape: tuple[int, ...],
                 init: str = "uniform", key_index: str = "auto") -> None:
        super().__init__()
        if not 1 <= top_n <= size:
            raise ValueError(f"top_n={top_n} must be between 1 and the pool size {size}")
        check_backend(key_index)
        self.size, self.top_n, self.key_index_name = size, top_n, key_index
        self.prompts = nn.Parameter(torch.empty(size, *prompt_shape))
        self.keys = nn.Parameter(torch.empty(size, key_dim))
        for parameter in (self.prompts, self.keys):
            nn.init.uniform_(parameter, -1.0, 1.0) if init == "uniform" else nn.init.zeros_(parameter)
        self._index: KeyIndex | None = None
        self._index_device: torch.device | None = None

    @property
    def index(self) -> KeyIndex:
        """The key index, (re)built when the keys moved device or were replaced; it reads the live keys."""
        if self._index is None or self._index.keys is not self.keys or self._index_device != self.keys.device:
            self._index, self._index_device = make_key_index(self.key_index_name, self.keys), self.keys.device
        return self._index

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """Cosine of each query to each key, [B, M] in fp32 (gradient flows to the keys)."""
        with torch.autocast(query.device.type, enabled=False):
            return l2_normalize(query.float()) @ l2_normalize(self.keys.float()).t()

    @torch.no_grad()
    def select(self, query: torch.Tensor, mode: str = "image", bias: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt ids [B, N]: each image's top-N keys, or with ``mode="batch"`` the batch's N most
        chosen for every image. ``bias`` [M] is added to the cosine before ranking."""
        _, ids = self.index.search(query, self.top_n, bias)
        if mode == "batch":
            ids = batch_majority(ids, self.size, self.top_n).unsqueeze(0).expand(ids.shape[0], -1)
        return ids

    def key_similarity(self, query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cosine of each image's chosen keys to its query, [B, N] (gradient flows to the keys only)."""
        with torch.autocast(query.device.type, enabled=False):
            chosen = l2_normalize(self.keys.float())[ids]  # [B, N, D]
            return (chosen * l2_normalize(query.detach().float()).unsqueeze(1)).sum(dim=-1)

    def reduce_sim(self, query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The reference's ``reduce_sim``: the sum of chosen-key cosines divided by the batch size."""
        return self.key_similarity(query, ids).sum() / query.shape[0]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """The chosen prompts, [B, N, *prompt_shape]."""
        return self.prompts[ids]


class SelectionStats(nn.Module):
    """Which prompts were chosen, per task: training counts (checkpointed) and the counts, images
    and task-identification credit of the current evaluation round (reset by :meth:`reset_eval`)."""

    def __init__(self, n_tasks: int, pool_size: int) -> None:
        super().__init__()
        self.register_buffer("train_counts", torch.zeros(n_tasks, pool_size, dtype=torch.long))
        self.register_buffer("eval_counts", torch.zeros(n_tasks, pool_size, dtype=torch.long), persistent=False)
        self.register_buffer("eval_credit", torch.zeros(n_tasks), persistent=False)
        self.register_buffer("eval_images", torch.zeros(n_tasks, dtype=torch.long), persistent=False)

    @staticmethod
    def _count(row: torch.Tensor, ids: torch.Tensor) -> None:
        flat = ids.reshape(-1)
        row.index_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def observe_train(self, task: int, ids: torch.Tensor) -> None:
        self._count(self.train_counts[task], ids)

    @torch.no_grad()
    def observe_eval(self, task: int, ids: torch.Tensor, n_trained: int) -> None:
        """Count an evaluation batch of test set ``task``; tasks ``0..n_trained-1`` have profiles."""
        if not 0 <= task < self.eval_counts.shape[0]:
            return
        self._count(self.eval_counts[task], ids)
        self.eval_images[task] += ids.shape[0]
        if task < n_trained:
            self.eval_credit[task] += task_credit(ids, self.train_counts[:n_trained], task).sum()

    def train_frequency(self, tasks: int) -> torch.Tensor:
        """Share of the selections of tasks ``0..tasks-1`` that went to each prompt, [M]."""
        counts = self.train_counts[:tasks].sum(dim=0).float()
        return counts / counts.sum().clamp_min(1)

    def reset_eval(self) -> None:
        for buffer in (self.eval_counts, self.eval_credit, self.eval_images):
            buffer.zero_()

    def summary(self, task: int) -> dict[str, float]:
        """Distinct prompts used training ``task`` and in this evaluation round."""
        return {"distinct_prompts": float((self.train_counts[task] > 0).sum()),
                "distinct_prompts_eval": float((self.eval_counts.sum(dim=0) > 0).sum())}

    def task_id_accuracy(self) -> dict[str, float]:
        """Task-identification accuracy (%) of this evaluation round: ``task_id_acc`` over every test
        image, and ``task_id_acc/task_<j>`` per test set (to see which task's images go astray)."""
        images = int(self.eval_images.sum())
        if not images:
            return {}
        values = {"task_id_acc": 100.0 * float(self.eval_credit.sum()) / images}
        for j, (credit, count) in enumerate(zip(self.eval_credit.tolist(), self.eval_images.tolist())):
            if count:
                values[f"task_id_acc/task_{j}"] = 100.0 * credit / count
        return values

    def report(self, task: int, prefix: str, task_id_acc: bool = True) -> tuple[dict[str, float], str]:
        """The task step's metrics and the histogram CSV, then a fresh evaluation round. Metrics are
        named ``<prefix>/<name>``, except the task-identification accuracies, which every
        key-selection strategy logs under the same names (left out with ``task_id_acc=False``, e.g.
        for a joint run's single task)."""
        metrics = {f"{prefix}/{name}": value for name, value in self.summary(task).items()}
        if task_id_acc:
            metrics.update(self.task_id_accuracy())
        histogram = self.histogram_csv(task + 1)
        self.reset_eval()
        return metrics, histogram

    def histogram_csv(self, tasks: int) -> str:
        """One row per prompt: its training count in each task so far, then its count on each test
        set in this evaluation round."""
        train, evals = self.train_counts[:tasks].cpu(), self.eval_counts[:tasks].cpu()
        header = ["prompt"] + [f"train_task_{t}" for t in range(tasks)] + [f"eval_task_{t}" for t in range(tasks)]
        rows = [",".join(header)]
        for prompt in range(train.shape[1]):
            rows.append(",".join(map(str, [prompt, *train[:, prompt].tolist(), *evals[:, prompt].tolist()])))
        return "\n".join(rows) + "\n"
