"""The nearest-key index: every backend agrees, never serves stale keys, and fails clearly."""
import sys

import numpy as np
import pytest
import torch

from clframe import key_index
from clframe.errors import ClframeError
from clframe.key_index import available_backends, l2_normalize, make_key_index, resolve_backend

CPU_BACKENDS = [name for name in ("torch", "faiss_cpu") if name in available_backends("cpu")]


def brute_force(queries: torch.Tensor, keys: torch.Tensor, k: int, bias=None) -> np.ndarray:
    """float64 cosine top-k, written independently of the index code."""
    q = queries.double().numpy()
    b = keys.detach().double().numpy()
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    if bias is not None:
        scores = scores + bias.double().numpy()
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_l2_normalize_is_the_reference_formula():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]])
    out = l2_normalize(x)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))  # no NaN for a zero vector
    assert torch.allclose(out[2], torch.tensor([1e-7 / 1e-6, 0.0]))  # rsqrt(max(1e-14, 1e-12)) = 1e6


@pytest.mark.parametrize("n_keys", [10, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_return_the_same_ids(n_keys, with_bias):
    torch.manual_seed(n_keys)
    keys = torch.randn(n_keys, 24)
    queries = torch.randn(64, 24)
    bias = torch.rand(n_keys) * 0.3 if with_bias else None
    expected = brute_force(queries, keys, 5, bias)
    results = {}
    for name in CPU_BACKENDS:
        scores, ids = make_key_index(name, keys).search(queries, 5, bias)
        assert ids.dtype == torch.int64 and ids.shape == (64, 5) and scores.dtype == torch.float32
        assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
        np.testing.assert_array_equal(ids.numpy(), expected)
        results[name] = scores
    for scores in results.values():
        torch.testing.assert_close(scores, results["torch"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("update", ["adam", "adam_fused", "sgd", "data_write", "rebind"])
def test_index_never_serves_stale_keys(update):
    torch.manual_seed(1)
    keys = torch.nn.Parameter(torch.randn(50, 16))
    queries = torch.randn(32, 16)
    indexes = {name: make_key_index(name, keys) for name in CPU_BACKENDS}
    before = brute_force(queries, keys, 3)
    for index in indexes.values():
        np.testing.assert_array_equal(index.search(queries, 3)[1].numpy(), before)
    if update == "data_write":  # bypasses the version counter on purpose
        keys.data.mul_(-1.0)
    elif update == "rebind":
        keys = torch.nn.Parameter(torch.randn(60, 16))
        for index in indexes.values():
            index.set_keys(keys)
    else:
        kwargs = {"fused": True} if update == "adam_fused" else {}
        optimizer = (torch.optim.SGD([keys], lr=5.0) if update == "sgd"
                     else torch.optim.Adam([keys], lr=1.0, **kwargs))
        for _ in range(3):
            optimizer.zero_grad()
            (l2_normalize(keys) @ l2_normalize(queries).t()).sum().backward()  # pushes keys away
            optimizer.step()
    after = brute_force(queries, keys, 3)
    assert not np.array_equal(after, before)  # the update changed the answer
    for name, index in indexes.items():
        np.testing.assert_array_equal(index.search(queries, 3)[1].numpy(), after, err_msg=name)


def test_missing_faiss_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    for name in ("faiss", "faiss_cpu", "faiss_gpu"):
        with pytest.raises(ClframeError) as info:
            make_key_index(name, torch.randn(4, 8))
        message = str(info.value)
        assert "\n" not in message and "faiss" in message and "key_index=torch" in message
    assert available_backends("cpu") == ["torch"]
    assert resolve_backend("auto", torch.device("cpu"), 10**6) == "torch"  # auto never needs faiss


@pytest.mark.skipif(key_index.faiss_has_gpu(), reason="this faiss has GPU support")
def test_forced_faiss_gpu_without_gpu_support_is_one_clear_error():
    with pytest.raises(ClframeError, match="faiss_gpu.*GPU support") as info:
        make_key_index("faiss_gpu", torch.randn(4, 8))
    assert "\n" not in str(info.value)


def test_auto_and_faiss_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, 10) == "torch"
    assert resolve_backend("torch", cpu, 10**6) == "torch"
    if "faiss_cpu" in CPU_BACKENDS:
        assert resolve_backend("faiss", cpu, 10) == "faiss_cpu"
        monkeypatch.setitem(key_index.AUTO_FAISS_MIN_KEYS, "cpu", 100)
        assert resolve_backend("auto", cpu, 99) == "torch"
        assert resolve_backend("auto", cpu, 100) == "faiss_cpu"
    with pytest.raises(ClframeError, match="unknown key index"):
        resolve_backend("annoy", cpu, 10)


def test_bad_search_arguments():
    index = make_key_index("torch", torch.randn(4, 8))
    with pytest.raises(ValueError, match="k=5"):
        index.search(torch.randn(2, 8), 5)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        index.search(torch.randn(2, 7), 2)
