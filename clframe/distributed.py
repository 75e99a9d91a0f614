"""Data-parallel runs under ``torchrun``: one process per GPU (or per CPU process with gloo).

``torchrun --nproc-per-node N -m clframe run ...`` (or ``clframe run --gpus N``, which launches
it) starts N copies of the same run. Each joins the process group that torchrun's environment
describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on CUDA, with
the rank's GPU taken from ``LOCAL_RANK``; gloo on the CPU. Every rank walks the same global
batches (same seeded permutation and augmentation draws) and keeps its contiguous :func:`shard`
of each; gradients are summed by :func:`all_reduce_grads`; evaluation counts and selection
statistics by :func:`all_reduce_sum`. Outside torchrun every helper is a no-op, so the
single-process path is untouched.

No state lives here besides what ``torch.distributed`` itself holds.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from clframe.errors import ClframeError


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs to MLflow, writes checkpoints, shows progress."""
    return rank() == 0


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (if launched by it) and yield this rank's device.

    On CUDA the device is ``cuda:LOCAL_RANK`` and the backend NCCL; on the CPU, gloo. A group that
    is already initialised (by the caller) is used as it is and left open."""
    if not launched() or active():
        yield _rank_device(device) if active() else device
        return
    device = _rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def check_processes(processes: int, device: torch.device) -> None:
    """Refuse, in one line, more GPU processes than visible GPUs (before torchrun starts any of them):
    ``--gpus N`` on a machine with no GPU, or with fewer than N."""
    if device.type != "cuda":
        return
    visible = torch.cuda.device_count()
    if processes > visible:
        raise ClframeError(f"--gpus {processes} asks for {processes} GPUs but {visible} "
                           f"{'is' if visible == 1 else 'are'} visible; use --gpus {max(visible, 1)}, or "
                           f"--device cpu for {processes} CPU processes")


def _rank_device(device: torch.device) -> torch.device:
    if device.type != "cuda":
        return device
    check_processes(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))), device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def shard(first: int, end: int) -> tuple[int, int]:
    """This rank's contiguous part of rows ``[first, end)``: sizes differ by at most one, the first
    ranks take the extra rows, and a rank gets none when there are fewer rows than ranks."""
    size, count, position = end - first, world(), rank()
    base, extra = divmod(size, count)
    start = first + position * base + min(position, extra)
    return start, start + base + (1 if position < extra else 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place and return it (unchanged when not distributed)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks, one flat buffer per dtype.

    Each rank's loss is already weighted by its share of the global batch, so the sum is the
    gradient of the global-batch mean. A parameter that got no gradient on any rank keeps
    ``grad = None`` (so the optimizer skips it, as in one process)."""
    if not active() or not params:
        return
    device = params[0].device
    had_grad = all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device))
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, used in zip(params, had_grad.tolist()):
        if not used:
            p.grad = None


def reduce_selection_stats(module: torch.nn.Module, train_task: int | None) -> None:
    """Sum the :class:`~clframe.prompt_pool.SelectionStats` of ``module`` over the ranks: the training
    counts of ``train_task`` (earlier rows are already global) or, with ``None``, the evaluation
    round's counts, images and task-id credit. Every rank counted only its own images."""
    if not active():
        return
    from clframe.prompt_pool import SelectionStats

    for stats in module.modules():
        if not isinstance(stats, SelectionStats):
            continue
        if train_task is not None:
            if 0 <= train_task < stats.train_counts.shape[0]:
                all_reduce_sum(stats.train_counts[train_task])
        else:
            for buffer in (stats.eval_counts, stats.eval_credit, stats.eval_images):
                all_reduce_sum(buffer)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
