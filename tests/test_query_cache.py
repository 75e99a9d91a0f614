import torch

from clframe.query_cache import FrozenQueryCache
from clframe.strategies.base import Batch


def test_cache_computes_each_eval_slice_once_and_never_caches_training():
    calls = []

    def compute(images):
        calls.append(len(images))
        return images.sum(dim=(1, 2, 3))

    cache = FrozenQueryCache()
    images = torch.randn(4, 3, 2, 2)
    test_batch = Batch(images, torch.zeros(4, dtype=torch.long), 1, False, eval_slice=(0, 4))
    first = cache(test_batch, compute)
    second = cache(test_batch, compute)
    assert torch.equal(first, second) and calls == [4]
    other_task = Batch(images, torch.zeros(4, dtype=torch.long), 2, False, eval_slice=(0, 4))
    cache(other_task, compute)
    train = Batch(images, torch.zeros(4, dtype=torch.long), 1, True)
    cache(train, compute)
    cache(train, compute)
    assert calls == [4, 4, 4, 4] and len(cache) == 2
    assert not torch.equal(FrozenQueryCache(enabled=False)(test_batch, lambda x: x.mean(dim=(1, 2, 3))), first)
