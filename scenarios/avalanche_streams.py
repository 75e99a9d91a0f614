"""Avalanche benchmarks as clframe streams: ``avalanche:<Name>`` wraps any function of
``avalanche.benchmarks.classic`` (``avalanche:SplitMNIST``, ``avalanche:RotatedMNIST``, ...).

:func:`benchmark_to_stream` turns any Avalanche benchmark object (classic, ``nc_benchmark``,
``tensors_benchmark``, ``benchmark_from_datasets``, ...) into a :class:`Stream`: each experience is
read once, without the benchmark's own train/eval transforms (clframe normalises and augments on
the device) but with its frozen ones (RotatedMNIST's rotation, PermutedMNIST's permutation), and
stored as uint8 ``[N, 3, H, W]``; grey images are replicated to three channels. Avalanche is
imported only when one of these scenarios is built: it is slow to import.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clframe.config import RunConfig, option
from clframe.errors import ClframeError, closest
from clframe.registry import register_scenario
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience, Stream


@dataclass
class AvalancheConfig:
    n_experiences: int | None = option(5, "passed as n_experiences when the benchmark function takes it", min=1)
    kwargs: dict = option(None, "more keyword arguments for the benchmark function, e.g. {fixed_class_order: "
                          "[...]}", factory=dict)
    kind: str = option("auto", "class_il, domain_il, or auto: domain_il when every experience has the same "
                       "classes", choices=("auto", CLASS_IL, DOMAIN_IL))
    image_size: int | None = option(None, "resize images to this square size once (needed when sizes differ)",
                                    min=8)
    workers: int = option(0, "DataLoader worker processes for the one-off conversion to uint8", min=0)


# ----- one sample -> uint8 [3, H, W] -----
def to_uint8_image(x: Any, size: int | None = None) -> torch.Tensor:
    """A PIL image, array or tensor (CHW or HW; float in [0, 1] or integer in [0, 255]) as uint8
    ``[3, H, W]``, resized to ``size`` x ``size`` when given."""
    from PIL import Image

    if isinstance(x, Image.Image):
        x = torch.from_numpy(np.array(x.convert("RGB"))).permute(2, 0, 1)
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
            x = x.permute(2, 0, 1)  # numpy images are usually HWC
    if not isinstance(x, torch.Tensor):
        raise ClframeError(f"an experience holds {type(x).__name__} inputs; clframe needs images (PIL, arrays "
                           f"or tensors)")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
        raise ClframeError(f"an experience holds inputs of shape {tuple(x.shape)}; clframe needs images "
                           f"[C, H, W] with 1, 3 or 4 channels")
    if x.dtype.is_floating_point:
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ClframeError(f"float images must lie in [0, 1] (ToTensor's convention); got values in "
                               f"[{low:.3g}, {high:.3g}]: pass unnormalised data")
        x = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        if int(x.min()) < 0 or int(x.max()) > 255:
            raise ClframeError(f"integer images must lie in [0, 255]; got values in [{int(x.min())}, {int(x.max())}]")
        x = x.to(torch.uint8)
    x = x[:3] if x.shape[0] == 4 else x.expand(3, -1, -1) if x.shape[0] == 1 else x
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


class _ToUint8:
    """The transform put in place of a benchmark's own (a class, so DataLoader workers can pickle it)."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, x: Any) -> torch.Tensor:
        return to_uint8_image(x, self.size)


def _collate(items: list) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    images = [item[0] for item in items]
    same_shape = all(isinstance(x, torch.Tensor) and x.shape == images[0].shape for x in images)
    return (torch.stack(images) if same_shape else images), torch.tensor([int(item[1]) for item in items])


def dataset_to_tensors(dataset: Any, image_size: int | None = None, workers: int = 0,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an Avalanche (or any map-style ``(x, y, ...)``) dataset once into uint8 images and labels."""
    if hasattr(dataset, "replace_current_transform_group"):
        dataset = dataset.replace_current_transform_group(_ToUint8(image_size))
        convert = None
    else:
        convert = _ToUint8(image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate)
    images, labels, filled = None, torch.empty(len(dataset), dtype=torch.long), 0
    for batch_images, batch_labels in loader:
        for image in map(convert, batch_images) if convert else batch_images:
            if images is None:  # one allocation: a large data set is never held twice
                images = torch.empty((len(dataset), *image.shape), dtype=torch.uint8)
            if image.shape != images.shape[1:]:
                raise ClframeError(f"images come in several sizes ({tuple(images.shape[1:])}, {tuple(image.shape)}); "
                                   f"set image_size to store them at one size")
            images[filled] = image
            filled += 1
        labels[filled - len(batch_labels):filled] = batch_labels
    if images is None:
        return torch.zeros(0, 3, image_size or 1, image_size or 1, dtype=torch.uint8), labels
    return images, labels


# ----- a whole benchmark -----
def _find_class_names(dataset: Any, n_classes: int, depth: int = 0, seen: set | None = None) -> list[str] | None:
    """The ``classes`` list of the torchvision-style dataset an Avalanche dataset wraps, if any."""
    seen = set() if seen is None else seen
    if dataset is None or depth > 10 or id(dataset) in seen:
        return None
    seen.add(id(dataset))
    names = getattr(dataset, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) == n_classes and all(isinstance(n, str) for n in names):
        return list(names)
    for attr in ("_flat_data", "_datasets", "dataset", "datasets"):
        children = getattr(dataset, attr, None)
        for child in children if isinstance(children, (list, tuple)) else [children]:
            found = _find_class_names(child, n_classes, depth + 1, seen)
            if found:
                return found
    return None


def benchmark_to_stream(benchmark: Any, name: str, kind: str = "auto", class_names: list[str] | None = None,
                        domain_names: list[str] | None = None, image_size: int | None = None,
                        workers: int = 0) -> Stream:
    """Convert an Avalanche benchmark's ``train_stream`` / ``test_stream`` into a :class:`Stream`.

    Test experiences pair with train experiences by position. A benchmark with one complete test
    set (``complete_test_set_only``) gives it to every domain-IL experience as the same tensors;
    in class-IL each experience gets the part of it that holds its classes. ``kind`` "auto" means
    domain-IL when there are several experiences and all have the same classes.
    """
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_stream:
        raise ClframeError(f"{name}: the benchmark has no training experiences")
    if len(test_stream) not in (1, len(train_stream)):
        raise ClframeError(f"{name}: {len(train_stream)} train but {len(test_stream)} test experiences; need one "
                           f"test experience per train experience or one complete test set")
    train = [dataset_to_tensors(exp.dataset, image_size, workers) for exp in train_stream]
    test = [dataset_to_tensors(exp.dataset, image_size, workers) for exp in test_stream]
    class_sets = [sorted(set(labels.tolist())) for _, labels in train]
    if kind == "auto":
        kind = DOMAIN_IL if len(train) > 1 and all(c == class_sets[0] for c in class_sets) else CLASS_IL
    n_classes = max(1 + max(int(labels.max()) for _, labels in train + test if len(labels)), len(class_names or ()))
    experiences = []
    for task_id, ((train_images, train_labels), classes) in enumerate(zip(train, class_sets)):
        test_images, test_labels = test[task_id] if len(test) > 1 else test[0]
        if len(test) == 1 and kind == CLASS_IL:
            keep = torch.isin(test_labels, torch.tensor(classes))
            test_images, test_labels = test_images[keep], test_labels[keep]
        domain = domain_names[task_id] if domain_names else (f"experience_{task_id}" if kind == DOMAIN_IL else None)
        experiences.append(Experience(task_id, classes, train_images, train_labels, test_images, test_labels,
                                      domain=domain))
    if class_names is None:
        class_names = _find_class_names(train_stream[0].dataset, n_classes)
    if class_names is None or len(class_names) != n_classes:
        class_names = [f"class_{c}" for c in range(n_classes)]
    names = [e.domain for e in experiences] if kind == DOMAIN_IL else None
    info = {"class_order": [c for cs in class_sets for c in cs]} if kind == CLASS_IL else {}
    return Stream(name, kind, list(class_names), experiences, domain_names=names, info=info)


def import_classic() -> Any:
    """``avalanche.benchmarks.classic``, imported quietly (it warns about optional solvers it lacks)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import avalanche.benchmarks.classic as classic
    except ImportError:
        raise ClframeError("this scenario needs avalanche-lib, an optional extra: pip install 'clframe[avalanche]' "
                           "(or pip install -e '.[avalanche]' in the repository)") from None
    return classic


def _classic_benchmarks() -> dict[str, Any]:
    classic = import_classic()
    return {n: getattr(classic, n) for n in dir(classic) if n[:1].isupper() and inspect.isfunction(getattr(classic, n))}


@register_scenario("avalanche:", config=AvalancheConfig)
def avalanche_benchmark(cfg: AvalancheConfig, run: RunConfig) -> Stream:
    """Any avalanche.benchmarks.classic benchmark, e.g. avalanche:SplitMNIST (data in --data-root)."""
    benchmark_name = run.scenario.partition(":")[2]
    benchmarks = _classic_benchmarks()
    if benchmark_name not in benchmarks:
        raise ClframeError(f"unknown Avalanche benchmark '{benchmark_name}'{closest(benchmark_name, benchmarks)}; "
                           f"choices: {', '.join(sorted(benchmarks))}")
    function = benchmarks[benchmark_name]
    accepted = inspect.signature(function).parameters
    kwargs = {}
    for key, value in (("seed", run.seed), ("dataset_root", run.data_root), ("n_experiences", cfg.n_experiences)):
        if key in accepted and value is not None:
            kwargs[key] = value
    kwargs.update(cfg.kwargs)
    try:
        benchmark = function(**kwargs)
    except TypeError as exc:
        raise ClframeError(f"avalanche:{benchmark_name} rejects its arguments ({exc}); set them with --set "
                           f"'avalanche:{benchmark_name}.kwargs={{...}}'") from None
    except (OSError, RuntimeError, ValueError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ClframeError(f"avalanche:{benchmark_name} could not load its data under --data-root "
                           f"{run.data_root} ({type(exc).__name__}: {first}); Avalanche downloads it there when "
                           f"online, else put the files there first") from None
    return benchmark_to_stream(benchmark, run.scenario, cfg.kind, image_size=cfg.image_size, workers=cfg.workers)
