"""Nearest-key lookup: top-k cosine search of a batch of queries against a *live* key tensor.

A prompt pool's keys are trained, so an index that keeps its own copy can serve stale keys. Here
an index is bound to the key tensor itself (usually an ``nn.Parameter``) and every search sees
its current values:

- ``torch``: normalised matmul + ``topk`` on the keys' device, in fp32; reads the parameter at
  every call, no copy. Exactly the reference L2P computation.
- ``faiss_gpu``: ``faiss.knn_gpu`` (brute-force inner product, ``StandardGpuResources``) on the
  CUDA tensors themselves, no stored index, so nothing to go stale. Needs a faiss build with GPU
  support (``faiss.get_num_gpus() > 0``).
- ``faiss_cpu``: a ``faiss.IndexFlatIP`` over the normalised keys, rebuilt whenever the keys'
  *content* differs from what it was built from (a full compare, because fused optimizers and
  ``p.data`` writes do not bump ``Tensor._version``). Queries and results cross to the host.
- ``faiss``: ``faiss_gpu`` when the keys are on CUDA and faiss has GPU support, else ``faiss_cpu``.
- ``auto``: ``torch`` for pools below :data:`AUTO_FAISS_MIN_KEYS` (every prompt pool in
  practice; on CPU always), otherwise faiss when installed (GPU build for CUDA keys), else ``torch``.

A forced backend that cannot run raises :class:`ClframeError` with one line naming the fix; there
is no silent fallback. All backends return the same ids on the same data (up to float rounding
on exact ties) with scores in descending order. Normalisation is the reference L2P's
``x * rsqrt(max(sum(x²), 1e-12))``.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from clframe.errors import ClframeError

BACKENDS = ("auto", "torch", "faiss", "faiss_cpu", "faiss_gpu")
# Pool size from which ``auto`` prefers faiss over torch, per device type. On CPU, bench/key_index.py
# measured torch faster at every size from 10 to 100 000 keys (faiss's BLAS path lost 2-8x), so
# never; on CUDA, from 2^20 keys, where torch's [B, M] score matrix grows large (512 MB at B=128)
# and faiss's tiled GPU search does not materialise it.
AUTO_FAISS_MIN_KEYS = {"cpu": 1 << 62, "cuda": 1 << 20}


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x * rsqrt(max(sum(x²), eps))`` along ``dim``, as l2p-pytorch computes it."""
    square_sum = x.pow(2).sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(square_sum.clamp_min(eps))


def _import_faiss(backend: str):
    try:
        import faiss
    except ImportError:
        raise ClframeError(f"key index '{backend}' needs the faiss package (pip install faiss-cpu, or a GPU "
                           f"build of faiss); or use key_index=torch") from None
    return faiss


def faiss_has_gpu() -> bool:
    try:
        faiss = _import_faiss("faiss")
    except ClframeError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can search keys held on ``device``."""
    names = ["torch"]
    try:
        _import_faiss("faiss")
        names.append("faiss_cpu")
    except ClframeError:
        return names
    if torch.device(device).type == "cuda" and faiss_has_gpu():
        names.append("faiss_gpu")
    return names


def check_backend(name: str) -> None:
    """Fail early, with one line, if a forced backend cannot run on this machine."""
    if name not in BACKENDS:
        raise ClframeError(f"unknown key index '{name}'; choices: {', '.join(BACKENDS)}")
    if name in ("faiss", "faiss_cpu", "faiss_gpu"):
        _import_faiss(name)
    if name == "faiss_gpu" and not faiss_has_gpu():
        raise ClframeError("key index 'faiss_gpu' needs a faiss build with GPU support and a visible GPU "
                           "(faiss.get_num_gpus() is 0 here); use key_index=faiss (CPU) or torch")


def resolve_backend(name: str, device: torch.device, n_keys: int) -> str:
    """The concrete backend ``name`` means for ``n_keys`` keys on ``device``."""
    check_backend(name)
    if name == "auto":
        if n_keys < AUTO_FAISS_MIN_KEYS.get(device.type, 1 << 62):
            return "torch"
        wanted = "faiss_gpu" if device.type == "cuda" else "faiss_cpu"  # never copy CUDA keys to the host
        return wanted if wanted in available_backends(device) else "torch"
    if name == "faiss":
        return "faiss_gpu" if device.type == "cuda" and faiss_has_gpu() else "faiss_cpu"
    return name


class KeyIndex(abc.ABC):
    """Top-k cosine search against a live key tensor ``[M, D]`` (see the module docstring)."""

    backend: ClassVar[str] = "base"

    def __init__(self, keys: torch.Tensor) -> None:
        self.set_keys(keys)

    def set_keys(self, keys: torch.Tensor) -> None:
        """Bind the key tensor (again, e.g. after a pool grew); later searches read it as it is then."""
        if keys.dim() != 2:
            raise ValueError(f"keys must be [M, D], got {tuple(keys.shape)}")
        self.keys = keys

    def __len__(self) -> int:
        return self.keys.shape[0]

    @abc.abstractmethod
    def search(self, queries: torch.Tensor, k: int,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, k] fp32, ids [B, k] int64), best first, on the queries' device.

        Score = cosine(query, key) + ``bias`` [M] (optional, e.g. a penalty or -inf for masked keys).
        """

    def _check(self, queries: torch.Tensor, k: int) -> None:
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the number of keys ({len(self)})")
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queries must be [B, {self.keys.shape[1]}], got {tuple(queries.shape)}")


class TorchKeyIndex(KeyIndex):
    backend = "torch"

    def search(self, queries, k, bias=None):
        self._check(queries, k)
        with torch.no_grad(), torch.autocast(queries.device.type, enabled=False):
            scores = l2_normalize(queries.float()) @ l2_normalize(self.keys.detach().float()).t()
            if bias is not None:
                scores = scores + bias.to(scores)
            return torch.topk(scores, k, dim=1)


def _augment(normed: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """Append a column so an inner product adds a per-key bias: [q, 1] · [k, b] = q·k + b."""
    if column is None:
        return normed.contiguous()
    return torch.cat([normed, column.reshape(-1, 1).to(normed)], dim=1).contiguous()


def _finite_bias(bias: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(bias.float(), neginf=-1e4, posinf=1e4)  # faiss wants finite values


class FaissCpuKeyIndex(KeyIndex):
    backend = "faiss_cpu"

    def __init__(self, keys: torch.Tensor) -> None:
        self.faiss = _import_faiss(self.backend)
        self._built_from: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._index = None
        super().__init__(keys)

    def set_keys(self, keys):
        super().set_keys(keys)
        self._built_from = None

    def _fresh_index(self, bias: torch.Tensor | None):
        keys = self.keys.detach().float().cpu()
        bias = None if bias is None else _finite_bias(bias).cpu()
        if self._built_from is not None:
            old_keys, old_bias = self._built_from
            same_bias = (bias is None and old_bias is None) or (
                bias is not None and old_bias is not None and torch.equal(bias, old_bias))
            if same_bias and old_keys.shape == keys.shape and torch.equal(old_keys, keys):
                return self._index
        base = _augment(l2_normalize(keys), bias).numpy()
        index = self.faiss.IndexFlatIP(base.shape[1])
        index.add(base)
        self._index = index
        self._built_from = (keys.clone(), bias)  # a copy: ``keys`` may alias the live parameter
        return index

    def search(self, queries, k, bias=None):
        self._check(queries, k)
        with torch.no_grad():
            index = self._fresh_index(bias)
            q = l2_normalize(queries.detach().float().cpu())
            q = _augment(q, None if bias is None else torch.ones(len(q))).numpy()
            scores, ids = index.search(q, k)
        return (torch.from_numpy(scores).to(queries.device), torch.from_numpy(ids).to(queries.device))


class FaissGpuKeyIndex(KeyIndex):
    backend = "faiss_gpu"

    def __init__(self, keys: torch.Tensor) -> None:
        check_backend(self.backend)
        self.faiss = _import_faiss(self.backend)
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take CUDA tensors, no copies)

        self.resources = self.faiss.StandardGpuResources()
        super().__init__(keys)

    def search(self, queries, k, bias=None):
        self._check(queries, k)
        if not (queries.is_cuda and self.keys.is_cuda):
            raise ClframeError("key index 'faiss_gpu' needs the model on a CUDA device; use faiss_cpu or torch")
        with torch.no_grad(), torch.autocast("cuda", enabled=False):
            base = l2_normalize(self.keys.detach().float())
            q = l2_normalize(queries.detach().float())
            if bias is not None:
                base = _augment(base, _finite_bias(bias))
                q = _augment(q, torch.ones(len(q), device=q.device))
            scores, ids = self.faiss.knn_gpu(self.resources, q.contiguous(), base.contiguous(), k,
                                             metric=self.faiss.METRIC_INNER_PRODUCT,
                                             device=queries.device.index if queries.device.index is not None else -1)
        return scores, ids


_CLASSES = {cls.backend: cls for cls in (TorchKeyIndex, FaissCpuKeyIndex, FaissGpuKeyIndex)}


def make_key_index(name: str, keys: torch.Tensor) -> KeyIndex:
    """An index of backend ``name`` (``auto``/``faiss`` resolved for ``keys``' device and size)."""
    return _CLASSES[resolve_backend(name, keys.device, keys.shape[0])](keys)
