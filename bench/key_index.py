"""Nearest-key lookup time vs pool size, for every key-index backend available here.

    python bench/key_index.py                       # CPU, and CUDA when visible
    python bench/key_index.py --device cuda --dim 768 --sizes 10 100 1000 10000 100000

Prints one JSON object per line: backend, device, pool size, batch, width, k, and the median
milliseconds of one ``search`` with the keys unchanged since the last search (``static``, the
evaluation case) and with the keys changed in place before every search (``updated``, the training
case: an optimizer step between lookups; backends with a stored index pay their refresh here).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clframe.key_index import available_backends, make_key_index  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_search(index, queries, k, keys, updated: bool, budget_s: float, max_reps: int) -> float:
    for _ in range(2):  # warm-up (and the first index build)
        index.search(queries, k)
    times = []
    spent = 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < max_reps):
        if updated:
            with torch.no_grad():
                keys.add_(1e-3)  # stands in for an optimizer step
        sync(queries.device)
        start = time.perf_counter()
        index.search(queries, k)
        sync(queries.device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="*", default=None, help="cpu and/or cuda (default: all visible)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[10, 100, 1000, 10000, 100000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=768, help="key width (ViT-B/16: 768)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--max-reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if "faiss_cpu" in available_backends("cpu"):
            import faiss

            faiss.omp_set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for name in devices:
        device = torch.device(name)
        for size in args.sizes:
            generator = torch.Generator().manual_seed(size)
            keys = torch.nn.Parameter(torch.randn(size, args.dim, generator=generator).to(device))
            queries = torch.randn(args.batch, args.dim, generator=generator).to(device)
            for backend in available_backends(device):
                index = make_key_index(backend, keys)
                row = {"backend": backend, "device": name, "pool_size": size, "batch": args.batch, "dim": args.dim,
                       "k": args.k, "threads": torch.get_num_threads()}
                for mode in ("static", "updated"):
                    row[f"{mode}_ms"] = round(time_search(index, queries, args.k, keys, mode == "updated",
                                                          args.budget, args.max_reps), 4)
                row["host"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
