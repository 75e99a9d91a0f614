import pickle

import pytest
import torch

from clframe.config import RunConfig
from clframe.errors import ClframeError
from conftest import write_fake_cifar100
from clframe.scenarios.split_cifar100 import SplitCifar100Config, split_cifar100
from clframe.scenarios.split_digits import SplitDigitsConfig, split_digits


def test_split_digits_structure():
    stream = split_digits(SplitDigitsConfig(), RunConfig(seed=0))
    assert stream.n_tasks == 5 and stream.n_classes == 10 and stream.kind == "class_il"
    seen = set()
    for exp in stream.experiences:
        assert len(exp.classes) == 2 and not seen & set(exp.classes)
        seen |= set(exp.classes)
        assert set(exp.train_labels.tolist()) == set(exp.classes) == set(exp.test_labels.tolist())
        assert exp.train_images.dtype == torch.uint8 and exp.train_images.shape[1:] == (3, 8, 8)
    assert seen == set(range(10))
    assert sum(len(e.train_labels) + len(e.test_labels) for e in stream.experiences) == 1797


def test_class_order_depends_on_seed_only():
    a = split_digits(SplitDigitsConfig(), RunConfig(seed=1))
    b = split_digits(SplitDigitsConfig(), RunConfig(seed=1))
    c = split_digits(SplitDigitsConfig(), RunConfig(seed=2))
    assert [e.classes for e in a.experiences] == [e.classes for e in b.experiences]
    assert [e.classes for e in a.experiences] != [e.classes for e in c.experiences]
    assert torch.equal(a.experiences[0].train_images, b.experiences[0].train_images)


def test_split_cifar100_reads_the_pickle_layout(fake_cifar):
    stream = split_cifar100(SplitCifar100Config(), RunConfig(data_root=str(fake_cifar), seed=3))
    assert stream.n_tasks == 10 and stream.n_classes == 100
    assert stream.class_names[:2] == ["class_00", "class_01"]
    for exp in stream.experiences:
        assert len(exp.classes) == 10
        assert len(exp.train_labels) == 30 and len(exp.test_labels) == 20
        assert exp.train_images.shape[1:] == (3, 32, 32)
    # The pixels are the archive's bytes, in CHW order.
    with open(fake_cifar / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    first = stream.experiences[0]
    label = first.train_labels[0].item()
    row = [i for i, y in enumerate(raw[b"fine_labels"]) if y == label][0]
    assert torch.equal(first.train_images[0].flatten(), torch.from_numpy(raw[b"data"][row]))


def test_missing_cifar_names_data_root(tmp_path):
    with pytest.raises(ClframeError, match="--data-root"):
        split_cifar100(SplitCifar100Config(download=False), RunConfig(data_root=str(tmp_path)))


def test_truncated_cifar_is_a_clear_error(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(ClframeError, match="corrupted or truncated"):
        split_cifar100(SplitCifar100Config(download=False), RunConfig(data_root=str(tmp_path)))
