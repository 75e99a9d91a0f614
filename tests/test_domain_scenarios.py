"""Domain-IL and bring-your-own-data scenarios: digits domains, image folders, Avalanche, CORe50."""
from __future__ import annotations

import csv
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from clframe.config import RunConfig
from clframe.errors import ClframeError
from conftest import clframe_subprocess, tiny_run_options
from clframe.scenarios.avalanche_streams import AvalancheConfig, avalanche_benchmark, benchmark_to_stream, dataset_to_tensors
from clframe.scenarios.core50 import Core50Config, core50
from clframe.scenarios.digits_domains import CorruptedDigitsConfig, RotatedDigitsConfig, corrupted_digits, rotated_digits
from clframe.scenarios.base import class_order_record
from clframe.scenarios.folders import FolderClassesConfig, FolderDomainsConfig, folder_classes, folder_domains


def image_keys(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ----- digits domains -----
DIGIT_SCENARIOS = [(rotated_digits, RotatedDigitsConfig, ["rotate_0", "rotate_45", "rotate_90", "rotate_135",
                                                          "rotate_180"]),
                   (corrupted_digits, CorruptedDigitsConfig, ["clean", "noise", "colour", "scale", "invert"])]


@pytest.mark.parametrize("builder, config_cls, domains", DIGIT_SCENARIOS)
def test_digit_domains_structure(builder, config_cls, domains):
    stream = builder(config_cls(), RunConfig(seed=0))
    assert stream.kind == "domain_il" and stream.n_classes == 10 and stream.n_tasks == len(domains)
    assert stream.domain_names == domains == [e.domain for e in stream.experiences]
    used = set()
    for task_id, exp in enumerate(stream.experiences):
        assert exp.task_id == task_id and exp.classes == list(range(10))
        assert set(exp.train_labels.tolist()) == set(exp.test_labels.tolist()) == set(range(10))
        assert exp.train_images.dtype == torch.uint8 and exp.train_images.shape[1:] == (3, 32, 32)
        train_ids, test_ids = stream.info["source_indices"][task_id]
        assert len(train_ids) == len(exp.train_labels) and len(test_ids) == len(exp.test_labels)
        ids = set(train_ids) | set(test_ids)
        assert not ids & used and not set(train_ids) & set(test_ids)  # no digit in two domains or splits
        used |= ids
    assert len(used) == 1797


def test_digit_domains_are_deterministic_per_seed():
    a = rotated_digits(RotatedDigitsConfig(shuffle_domains=True), RunConfig(seed=4))
    b = rotated_digits(RotatedDigitsConfig(shuffle_domains=True), RunConfig(seed=4))
    orders = {tuple(rotated_digits(RotatedDigitsConfig(shuffle_domains=True), RunConfig(seed=s)).domain_names)
              for s in range(5)}
    assert a.domain_names == b.domain_names and len(orders) > 1
    for x, y in zip(a.experiences, b.experiences):
        assert torch.equal(x.train_images, y.train_images) and torch.equal(x.test_labels, y.test_labels)
    c = corrupted_digits(CorruptedDigitsConfig(), RunConfig(seed=1))
    d = corrupted_digits(CorruptedDigitsConfig(), RunConfig(seed=1))
    e = corrupted_digits(CorruptedDigitsConfig(), RunConfig(seed=2))
    assert all(torch.equal(x.train_images, y.train_images) for x, y in zip(c.experiences, d.experiences))
    assert c.info["source_indices"] != e.info["source_indices"]


def test_domains_transform_the_same_digits():
    stream = rotated_digits(RotatedDigitsConfig(angles=[0, 90, 180], disjoint=False), RunConfig(seed=0))
    upright, quarter, half = (e.train_images.int() for e in stream.experiences)
    assert torch.equal(stream.experiences[0].train_labels, stream.experiences[2].train_labels)
    assert (half - upright.flip(-1, -2)).abs().max() <= 1  # 180 degrees = both axes flipped
    assert (quarter - upright.rot90(1, dims=(-2, -1))).abs().float().mean() < 2  # counter-clockwise
    corrupted = corrupted_digits(CorruptedDigitsConfig(domains=["clean", "invert", "colour"], disjoint=False),
                                 RunConfig(seed=0))
    clean, inverted, colour = (e.train_images for e in corrupted.experiences)
    assert ((255 - clean.int()) - inverted.int()).abs().max() <= 1
    assert not torch.equal(colour[:, 0], colour[:, 1])  # grey digits became coloured


@pytest.mark.parametrize("builder, config, expected", [
    (corrupted_digits, CorruptedDigitsConfig(domains=["clean", "fog"]), "unknown fog; choose from"),
    (rotated_digits, RotatedDigitsConfig(angles=[0, 0]), "repeats an angle"),
    (rotated_digits, RotatedDigitsConfig(angles=list(range(30))), "at most 20"),
])
def test_digit_domains_bad_config(builder, config, expected):
    with pytest.raises(ClframeError) as exc:
        builder(config, RunConfig())
    assert_one_line(exc, expected)


# ----- image folders -----
CLASS_COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.RandomState, mode: str = "RGB") -> None:
    """A noisy image of one colour, so every file is unique and its class is visible in its mean."""
    pixels = np.clip(np.array(colour) + rng.randint(-20, 21, size=(12, 16, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def make_domain_folders(root: Path, domains=("photo", "sketch", "clipart"), per_class: int = 5) -> Path:
    rng = np.random.RandomState(0)
    for d, domain in enumerate(domains):
        for name, colour in CLASS_COLOURS.items():
            for i in range(per_class):
                suffix = ".png" if (i + d) % 2 else ".jpg"
                mode = "L" if domain == "sketch" and i == 0 else "RGBA" if i == 1 and suffix == ".png" else "RGB"
                write_image(root / domain / name / f"{i:03d}{suffix}", colour, rng, mode)
    (root / "photo" / "cat" / "notes.txt").write_text("not an image")
    (root / "photo" / ".DS_Store").write_bytes(b"\0")
    return root


def test_folder_domains_structure(tmp_path):
    root = make_domain_folders(tmp_path / "domains")
    cfg = FolderDomainsConfig(root=str(root), image_size=8, test_fraction=0.4)
    stream = folder_domains(cfg, RunConfig(seed=0))
    assert stream.kind == "domain_il" and stream.class_names == ["cat", "dog", "fox"]
    assert stream.domain_names == ["clipart", "photo", "sketch"]  # by name unless configured
    for exp in stream.experiences:
        assert exp.classes == [0, 1, 2]
        assert len(exp.train_labels) == 9 and len(exp.test_labels) == 6
        assert exp.train_images.dtype == torch.uint8 and exp.train_images.shape[1:] == (3, 8, 8)
        assert not image_keys(exp.train_images) & image_keys(exp.test_images)
        for images, labels in ((exp.train_images, exp.train_labels), (exp.test_images, exp.test_labels)):
            for image, label in zip(images, labels):  # the pixels are the file's class colour
                colour = torch.tensor(CLASS_COLOURS[stream.class_names[label]], dtype=torch.float)
                if torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]):  # a grey file, replicated
                    colour = (colour * torch.tensor([0.299, 0.587, 0.114])).sum().expand(3)
                assert (image.float().mean(dim=(1, 2)) - colour).abs().max() < 25
    ordered = folder_domains(FolderDomainsConfig(root=str(root), image_size=8, domains=["sketch", "photo"]),
                             RunConfig(seed=0))
    assert ordered.domain_names == ["sketch", "photo"] and ordered.n_tasks == 2
    again = folder_domains(cfg, RunConfig(seed=0))
    other = folder_domains(cfg, RunConfig(seed=1))
    assert all(torch.equal(a.test_images, b.test_images) for a, b in zip(stream.experiences, again.experiences))
    assert any(not torch.equal(a.test_images, b.test_images) for a, b in zip(stream.experiences, other.experiences))


def test_folder_classes_structure(tmp_path):
    rng = np.random.RandomState(1)
    names = [f"class_{k}" for k in range(6)]
    for k, name in enumerate(names):
        for i in range(5):
            write_image(tmp_path / "imgs" / name / f"{i}{'.png' if i % 2 else '.jpg'}", (40 * k, 255 - 40 * k, 99), rng)
    cfg = FolderClassesConfig(root=str(tmp_path / "imgs"), n_tasks=3, image_size=8)
    stream = folder_classes(cfg, RunConfig(seed=0))
    assert stream.kind == "class_il" and stream.class_names == names and stream.n_tasks == 3
    seen, images = set(), set()
    for exp in stream.experiences:
        assert len(exp.classes) == 2 and not seen & set(exp.classes)
        seen |= set(exp.classes)
        assert set(exp.train_labels.tolist()) == set(exp.test_labels.tolist()) == set(exp.classes)
        assert len(exp.train_labels) == 8 and len(exp.test_labels) == 2
        keys = image_keys(exp.train_images) | image_keys(exp.test_images)
        assert len(keys) == 10 and not keys & images  # no sample in two tasks or in both splits
        images |= keys
    assert seen == set(range(6))
    orders = {tuple(tuple(e.classes) for e in folder_classes(cfg, RunConfig(seed=s)).experiences) for s in range(4)}
    assert len(orders) > 1
    assert [e.classes for e in folder_classes(cfg, RunConfig(seed=2)).experiences] == \
           [e.classes for e in folder_classes(cfg, RunConfig(seed=2)).experiences]
    partial = folder_classes(FolderClassesConfig(root=str(tmp_path / "imgs"), n_tasks=2, classes_per_task=2,
                                                 image_size=8), RunConfig(seed=0))
    assert partial.n_classes == 6 and [len(e.classes) for e in partial.experiences] == [2, 2]
    # one id space: a folder's position by name, for class_order, the labels and class_order.json alike
    ordered = folder_classes(FolderClassesConfig(root=str(tmp_path / "imgs"), n_tasks=2, classes_per_task=2,
                                                 image_size=8), RunConfig(class_order=[5, 0, 3, 1, 2, 4]))
    assert [e.classes for e in ordered.experiences] == [[5, 0], [3, 1]]
    assert [sorted(set(e.test_labels.tolist())) for e in ordered.experiences] == [[0, 5], [1, 3]]
    record = json.loads(class_order_record(ordered, RunConfig(class_order=[5, 0, 3, 1, 2, 4])))
    assert record["order"] == [5, 0, 3, 1] and record["names"] == ["class_5", "class_0", "class_3", "class_1"]
    with pytest.raises(ClframeError) as exc:
        folder_classes(FolderClassesConfig(root=str(tmp_path / "imgs"), n_tasks=4), RunConfig())
    assert_one_line(exc, "6 class folders", "4 tasks")


def test_folder_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ClframeError) as exc:
        folder_domains(FolderDomainsConfig(), RunConfig(data_root=str(tmp_path / "absent")))
    assert_one_line(exc, "absent is not a folder", "<domain>/<class>/<image>", "--data-root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClframeError) as exc:
        folder_classes(FolderClassesConfig(root=str(tmp_path / "empty")), RunConfig())
    assert_one_line(exc, "holds no subfolders", "<class>/<image>")
    root = make_domain_folders(tmp_path / "d", per_class=2)
    with pytest.raises(ClframeError) as exc:
        folder_domains(FolderDomainsConfig(root=str(root), domains=["photo", "painting"]), RunConfig())
    assert_one_line(exc, "unknown painting", "available: clipart, photo, sketch")
    (root / "photo" / "cat" / "000.jpg").unlink()
    (root / "photo" / "cat" / "001.png").unlink()
    with pytest.raises(ClframeError) as exc:
        folder_domains(FolderDomainsConfig(root=str(root)), RunConfig())
    assert_one_line(exc, str(root / "photo" / "cat"), "holds no images")
    (root / "photo" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ClframeError) as exc:
        folder_domains(FolderDomainsConfig(root=str(root)), RunConfig())
    assert_one_line(exc, "cannot read image", "broken.png")


# ----- Avalanche -----
def test_tensor_benchmark_to_stream():
    from avalanche.benchmarks import tensors_benchmark

    g = torch.Generator().manual_seed(0)
    train = [[torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 4] for _ in range(3)]
    test = [[torch.rand(8, 1, 8, 8, generator=g), torch.arange(8) % 4] for _ in range(3)]
    stream = benchmark_to_stream(tensors_benchmark(train, test, task_labels=[0, 0, 0]), "tensors")
    assert stream.kind == "domain_il" and stream.n_classes == 4 and stream.domain_names == [
        "experience_0", "experience_1", "experience_2"]
    for exp, (x, y), (xt, yt) in zip(stream.experiences, train, test):
        assert exp.classes == [0, 1, 2, 3] and torch.equal(exp.train_labels, y) and torch.equal(exp.test_labels, yt)
        expected = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # grey -> 3 channels
        assert exp.train_images.dtype == torch.uint8 and torch.equal(exp.train_images, expected)
    # One complete test set: shared by every domain, split by classes for class-IL.
    shared = benchmark_to_stream(tensors_benchmark(train, test[:1], task_labels=[0, 0, 0],
                                                   complete_test_set_only=True), "shared")
    assert all(e.test_images is shared.experiences[0].test_images for e in shared.experiences)
    class_train = [[x[y < 2], y[y < 2]] for x, y in train[:1]] + [[x[y >= 2], y[y >= 2]] for x, y in train[1:2]]
    split = benchmark_to_stream(tensors_benchmark(class_train, test[:1], task_labels=[0, 0],
                                                  complete_test_set_only=True), "split")
    assert split.kind == "class_il" and [e.classes for e in split.experiences] == [[0, 1], [2, 3]]
    assert [sorted(set(e.test_labels.tolist())) for e in split.experiences] == [[0, 1], [2, 3]]
    with pytest.raises(ClframeError) as exc:
        benchmark_to_stream(tensors_benchmark([[x * 4, y] for x, y in train], test, task_labels=[0, 0, 0]), "bad")
    assert_one_line(exc, "must lie in [0, 1]")


def test_plain_dataset_of_pil_images_to_tensors():
    grey = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), mode="L")
    rgba = Image.new("RGBA", (10, 4), (10, 20, 30, 128))
    images, labels = dataset_to_tensors([(grey, 3), (grey, 1)])
    assert images.shape == (2, 3, 6, 8) and labels.tolist() == [3, 1]
    assert torch.equal(images[0, 0], torch.from_numpy(np.asarray(grey))) and torch.equal(images[0, 0], images[0, 2])
    resized, _ = dataset_to_tensors([(grey, 0), (rgba, 1)], image_size=5)
    assert resized.shape == (2, 3, 5, 5) and resized[1, :, 2, 2].tolist() == [10, 20, 30]
    with pytest.raises(ClframeError) as exc:
        dataset_to_tensors([(grey, 0), (rgba, 1)])
    assert_one_line(exc, "several sizes", "set image_size")


def write_fake_mnist(root: Path, per_class_train: int = 6, per_class_test: int = 3) -> Path:
    """MNIST's raw idx files (torchvision's layout), tiny, so Avalanche's classic MNIST benchmarks load offline."""
    rng = np.random.RandomState(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.randint(0, 256, size=(len(labels), 28, 28)).astype(np.uint8)
        images[:, :, :14] //= 8  # a dark left half, so rotations are visible
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(labels), 28, 28)
                                                         + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())
    return root


def test_avalanche_classic_benchmarks_offline(tmp_path):
    root = write_fake_mnist(tmp_path)
    split = avalanche_benchmark(AvalancheConfig(n_experiences=5), RunConfig(scenario="avalanche:SplitMNIST",
                                                                           data_root=str(root), seed=3))
    assert split.kind == "class_il" and split.n_tasks == 5 and split.class_names[0] == "0 - zero"
    seen = set()
    for exp in split.experiences:
        assert len(exp.classes) == 2 and not seen & set(exp.classes)
        seen |= set(exp.classes)
        assert set(exp.test_labels.tolist()) == set(exp.classes)
        assert len(exp.train_labels) == 12 and exp.train_images.shape[1:] == (3, 28, 28)
    same = avalanche_benchmark(AvalancheConfig(), RunConfig(scenario="avalanche:SplitMNIST", data_root=str(root),
                                                            seed=3))
    orders = {tuple(tuple(e.classes) for e in avalanche_benchmark(
        AvalancheConfig(), RunConfig(scenario="avalanche:SplitMNIST", data_root=str(root), seed=s)).experiences)
        for s in range(3)}
    assert [e.classes for e in same.experiences] == [e.classes for e in split.experiences] and len(orders) > 1
    rotated = avalanche_benchmark(AvalancheConfig(n_experiences=3, image_size=16),
                                  RunConfig(scenario="avalanche:RotatedMNIST", data_root=str(root), seed=0))
    assert rotated.kind == "domain_il" and rotated.n_tasks == 3 and rotated.n_classes == 10
    first, second = rotated.experiences[:2]
    assert first.train_images.shape[1:] == (3, 16, 16)
    assert torch.equal(first.train_labels, second.train_labels) and len(first.test_labels) == 30
    assert not torch.equal(first.train_images, second.train_images)  # the same digits, rotated otherwise
    with pytest.raises(ClframeError) as exc:
        avalanche_benchmark(AvalancheConfig(), RunConfig(scenario="avalanche:SplitMNSIT"))
    assert_one_line(exc, "unknown Avalanche benchmark 'SplitMNSIT'", "did you mean SplitMNIST")


# ----- CORe50 -----
def write_fake_core50(root: Path, n_objects: int = 4) -> Path:
    """CORe50's on-disk layout (as Avalanche downloads it), a few tiny frames per object and session."""
    folder = root / "core50"
    train_sessions = [1, 2, 4, 5, 6, 8, 9, 11]
    rng = np.random.RandomState(0)
    batches, paths, labels = [], [], []
    for session in train_sessions + [3, 7, 10]:
        lines = []
        for obj in range(n_objects):
            for frame in range(2):
                rel = f"s{session}/o{obj + 1}/C_{session:02d}_{obj + 1:02d}_{frame:03d}.png"
                pixels = rng.randint(0, 256, size=(6, 6, 3)).astype(np.uint8)
                (folder / "core50_128x128" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / "core50_128x128" / rel)
                lines.append(f"{rel} {obj}")
                paths.append(rel)
                labels.append(obj)
        batches.append(lines)
    for run in range(10):
        run_dir = folder / "batches_filelists" / "NI_inc" / f"run{run}"
        run_dir.mkdir(parents=True)
        order = np.random.RandomState(run).permutation(8)
        for b, session_index in enumerate(order):
            (run_dir / f"train_batch_{b:02d}_filelist.txt").write_text("\n".join(batches[session_index]) + "\n")
        (run_dir / "test_filelist.txt").write_text("\n".join(sum(batches[8:], [])) + "\n")
    per_batch = len(paths) // 11
    indices = [list(range(b * per_batch, (b + 1) * per_batch)) for b in range(8)]
    indices.append(list(range(8 * per_batch, len(paths))))
    for name, content in (("paths.pkl", paths),
                          ("labels.pkl", {"ni": [[labels[i[0]:i[-1] + 1] for i in indices]] * 10}),
                          ("LUP.pkl", {"ni": [indices] * 10}),
                          ("labels2names.pkl", {"ni": [{k: f"object{k // 5}_{k % 5 + 1}" for k in range(50)}] * 10})):
        with (folder / name).open("wb") as handle:
            pickle.dump(content, handle)
    return root


def test_core50_ni_from_data_root(tmp_path):
    root = write_fake_core50(tmp_path)
    stream = core50(Core50Config(workers=0, ordering=2), RunConfig(data_root=str(root)))
    assert stream.kind == "domain_il" and stream.n_tasks == 8 and stream.n_classes == 50
    assert stream.class_names[:2] == ["object0_1", "object0_2"]
    expected_order = [f"s{[1, 2, 4, 5, 6, 8, 9, 11][i]}" for i in np.random.RandomState(2).permutation(8)]
    assert stream.domain_names == expected_order
    test_images = stream.experiences[0].test_images
    assert len(test_images) == 24 and test_images.shape[1:] == (3, 6, 6)
    for exp in stream.experiences:
        assert exp.classes == [0, 1, 2, 3] and len(exp.train_labels) == 8
        assert exp.test_images is test_images  # CORe50's held-out sessions, one test set for every domain
    keys = [image_keys(e.train_images) for e in stream.experiences]
    assert len(set().union(*keys)) == 64 and not set().union(*keys) & image_keys(test_images)
    categories = core50(Core50Config(workers=0, object_level=False, ordering=0), RunConfig(data_root=str(root)))
    assert categories.class_names[0] == "object0_" and categories.n_classes == 10


def test_core50_missing_names_the_layout(tmp_path):
    with pytest.raises(ClframeError) as exc:
        core50(Core50Config(), RunConfig(data_root=str(tmp_path)))
    assert_one_line(exc, "CORe50 not found", f"{tmp_path}/core50/core50_128x128/s1..s11", "batches_filelists/NI_inc",
                    "--data-root", "core50.download=true")
    assert not (tmp_path / "core50").exists()  # nothing was downloaded or created


# ----- end to end -----
STRATEGIES = ["linear", "l2p"]


@pytest.fixture(scope="module", autouse=True)
def domain_runs(tmp_path_factory, request):
    """One domain-IL CLI run per strategy on the offline rotated digits. They start with this
    module and run in the background while the in-process tests run (a CLI process spends most of
    its time importing); the tests at the end wait for them."""
    from concurrent.futures import ThreadPoolExecutor

    def run(strategy: str, folder: Path):
        return folder, clframe_subprocess(["run", "--scenario", "rotated_digits", "--strategy", strategy, "--set",
                                           "rotated_digits.angles=[0, 90, 180]", *tiny_run_options(folder)],
                                          cwd=folder)

    selected = {item.callspec.params["strategy"] for item in request.session.items
                if item.originalname == "test_domain_il_run_logs_per_domain_accuracy"}
    available = [s for s in STRATEGIES if s in selected
                 and (Path(__file__).parents[1] / "strategies" / f"{s}.py").exists()]
    pool = ThreadPoolExecutor(max(1, len(available)))
    # Folders are made here, not in the threads: mktemp creates the base temp folder lazily, and two
    # threads doing that at once (the first tmp use of an xdist worker) race on its mkdir.
    futures = {strategy: pool.submit(run, strategy, tmp_path_factory.mktemp(strategy)) for strategy in available}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_domain_il_run_logs_per_domain_accuracy(domain_runs, strategy):
    if strategy not in domain_runs:
        pytest.skip(f"strategies/{strategy}.py not there yet")
    tmp_path, result = domain_runs[strategy].result()
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("clframe").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["scenario_kind"] == "domain_il"
    assert run.data.tags["strategy"] == strategy and run.data.params["rotated_digits.angles"] == "[0.0, 90.0, 180.0]"
    local = client.download_artifacts(run.info.run_id, "acc_matrix.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    for j in range(3):
        history = sorted(client.get_metric_history(run.info.run_id, f"acc/task_{j}"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(j, 3))  # domain j is tested after every task from j on
        for metric in history:
            assert 0.0 <= metric.value <= 100.0
            assert float(rows[metric.step][f"task_{j}"]) == pytest.approx(metric.value, abs=1e-3)
    for key in ("acc_avg", "forgetting", "bwt"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]


def test_cli_lists_every_scenario_and_missing_data_is_one_line(tmp_path):
    listing = clframe_subprocess(["list"], cwd=tmp_path)
    for name in ("rotated_digits", "corrupted_digits", "core50", "folder_domains", "folder_classes",
                 "avalanche:<Name>"):
        assert name in listing.stdout
    result = clframe_subprocess(["run", "--scenario", "folder_domains", "--data-root", str(tmp_path / "none"),
                                 "--no-progress"], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "<domain>/<class>/<image>" in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()
