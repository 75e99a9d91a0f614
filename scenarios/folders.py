"""Bring-your-own-data streams from folders of image files.

- ``folder_domains``: ``root/<domain>/<class>/<image>`` (DomainNet-like), one domain per
  experience, the same classes throughout (domain-IL).
- ``folder_classes``: ``root/<class>/<image>`` (ImageNet-R-like), split into ``n_tasks`` tasks of
  ``classes_per_task`` classes in an order fixed by the seed (class-IL). Class ids are the class
  folders' positions by name, among all of them: ``run.class_order`` (a list, a file or a name)
  orders these ids, the first ``n_tasks x classes_per_task`` classes of that order are used, and
  ``class_order.json`` and the logged labels carry the same ids. Folders left out keep their id (and
  a head output that no task trains; ``eval_classes=all`` counts them too) but are never read.

Class names are the folder names. Every image is read once with PIL, converted to RGB,
centre-cropped to a square and resized to ``image_size``, then held as uint8. Images of more than
8 bits (PIL modes ``I;16``, ``I``, ``F``), which PIL's own conversion would saturate to white or
black, are rescaled to 8 bits first (see ``to_8bit``). Each class (per
domain) is split into train and test by the seed. Hidden entries and files whose extension is not
an image's are skipped; an empty folder or an unreadable image is an error naming it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.registry import register_scenario
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL, Experience, Stream, class_order, split_by_classes
from clframe.scenarios.split_digits import stratified_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class FolderDomainsConfig:
    root: str | None = option(None, "folder holding <domain>/<class>/<image>; None means --data-root")
    domains: list[str] | None = option(None, "domain folders in training order; None means all, by name")
    shuffle_domains: bool = option(False, "order the domains by the run seed instead")
    image_size: int = option(64, "images are centre-cropped and resized to this square size once", min=8)
    test_fraction: float = option(0.2, "share of each class (per domain) held out for testing", min=0.01)
    max_per_class: int | None = option(None, "keep at most this many images per class and domain (seeded)", min=2)
    workers: int = option(4, "threads decoding images", min=1)


@dataclass
class FolderClassesConfig:
    root: str | None = option(None, "folder holding <class>/<image>; None means --data-root")
    n_tasks: int = option(10, "number of tasks", min=1)
    classes_per_task: int | None = option(None, "classes per task; None means all classes split evenly (fewer: the "
                                          "first n_tasks x classes_per_task of the class order)", min=1)
    shuffle_classes: bool = option(True, "class order fixed by the run seed (else by name)")
    image_size: int = option(64, "images are centre-cropped and resized to this square size once", min=8)
    test_fraction: float = option(0.2, "share of each class held out for testing", min=0.01)
    max_per_class: int | None = option(None, "keep at most this many images per class (seeded)", min=2)
    workers: int = option(4, "threads decoding images", min=1)


# ----- reading folders and files -----
def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def subfolders(folder: Path, layout: str) -> list[Path]:
    if not folder.is_dir():
        raise ClframeError(f"{folder} is not a folder; expected {layout} (pass --data-root DIR)")
    found = [p for p in _entries(folder) if p.is_dir()]
    if not found:
        raise ClframeError(f"{folder} holds no subfolders; expected {layout}")
    return found


def image_files(folder: Path) -> list[Path]:
    found = [p for p in _entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ClframeError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); remove the folder or add images")
    return found


def to_8bit(array: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A grey image of more than 8 bits as uint8, by a documented rule (never by saturation):

    - ``I;16*`` (16-bit files): the type's range, 0..65535 -> 0..255;
    - ``I`` (32-bit integers; PIL also opens some 16-bit files so): 0..65535 when every value lies
      there, else the image's own min..max;
    - ``F`` (floats): 0..1 when every value lies there, else the image's own min..max.

    A constant image outside those ranges becomes black; NaN or infinite pixels are refused."""
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ClframeError(f"image {path} (PIL mode {mode}) holds NaN or infinite pixels; fix or remove it")
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.round(scaled).clip(0, 255).astype(np.uint8)


def read_image(path: Path, size: int) -> np.ndarray:
    """One file as uint8 [3, size, size]: RGB, centre-cropped to a square, resized."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I") or image.mode == "F":  # more than 8 bits: convert would saturate
                image = Image.fromarray(to_8bit(np.asarray(image), image.mode, path))  # uint8: mode L
            rgb = image.convert("RGB")
            rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ClframeError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:80]}); fix or "
                           f"remove it") from None
    return np.asarray(rgb).transpose(2, 0, 1)


def read_images(paths: list[Path], size: int, workers: int) -> torch.Tensor:
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, array in enumerate(pool.map(lambda p: read_image(p, size), paths)):
            images[i] = array
    return torch.from_numpy(images)


def _cap(files: list[Path], limit: int | None, rng: np.random.RandomState) -> list[Path]:
    if limit is None or len(files) <= limit:
        return files
    return sorted(files[i] for i in rng.choice(len(files), limit, replace=False))


def load_labelled(class_folders: dict[str, Path], class_ids: dict[str, int], size: int, workers: int,
                  limit: int | None, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<class>/<image>`` files of the given class folders: images and global class ids."""
    paths, labels = [], []
    for name, folder in class_folders.items():
        files = _cap(image_files(folder), limit, rng)
        paths += files
        labels += [class_ids[name]] * len(files)
    return read_images(paths, size, workers), torch.tensor(labels, dtype=torch.long)


def _root(cfg, run: RunConfig) -> Path:
    return Path(cfg.root if cfg.root is not None else run.data_root).expanduser()


# ----- the scenarios -----
@register_scenario("folder_domains", config=FolderDomainsConfig)
def folder_domains(cfg: FolderDomainsConfig, run: RunConfig) -> Stream:
    """Domain-IL from your images: root/<domain>/<class>/<image>, one domain per experience."""
    root = _root(cfg, run)
    layout = f"{root}/<domain>/<class>/<image>"
    available = {p.name: p for p in subfolders(root, layout)}
    names = list(cfg.domains) if cfg.domains is not None else sorted(available)
    unknown = [d for d in names if d not in available]
    if unknown:
        raise ClframeError(f"folder_domains.domains: unknown {', '.join(unknown)} in {root}; available: "
                           f"{', '.join(sorted(available))}")
    if not names or len(set(names)) != len(names):
        raise ClframeError(f"folder_domains.domains must list distinct domains; got {names}")
    if cfg.shuffle_domains:
        names = [names[i] for i in np.random.RandomState(run.seed).permutation(len(names))]
    per_domain = {d: {p.name: p for p in subfolders(available[d], layout)} for d in names}
    for domain in names:  # domain-IL learns one label space across domains: each must share it
        others = set().union(*(per_domain[d] for d in names if d != domain))
        if len(names) > 1 and not others & set(per_domain[domain]):
            raise ClframeError(f"folder_domains: domain {domain} shares no class with the other domains "
                               f"({', '.join(sorted(per_domain[domain]))} vs {', '.join(sorted(others))}); domain-IL "
                               f"needs the same class folders in every domain (disjoint classes: folder_classes)")
    class_names = sorted(set().union(*per_domain.values()))
    class_ids = {name: i for i, name in enumerate(class_names)}
    rng = np.random.RandomState(run.seed)
    experiences = []
    for task_id, domain in enumerate(names):
        images, labels = load_labelled(per_domain[domain], class_ids, cfg.image_size, cfg.workers,
                                       cfg.max_per_class, rng)
        train_idx, test_idx = stratified_split(labels, cfg.test_fraction, run.seed + task_id)
        experiences.append(Experience(task_id, sorted(set(labels.tolist())), images[train_idx], labels[train_idx],
                                      images[test_idx], labels[test_idx], domain=domain))
    return Stream("folder_domains", DOMAIN_IL, class_names, experiences, domain_names=names,
                  info={"root": str(root), "domain_order": names})


@register_scenario("folder_classes", config=FolderClassesConfig)
def folder_classes(cfg: FolderClassesConfig, run: RunConfig) -> Stream:
    """Class-IL from your images: root/<class>/<image>, n_tasks tasks of classes ordered by the seed."""
    root = _root(cfg, run)
    folders = {p.name: p for p in subfolders(root, f"{root}/<class>/<image>")}
    per_task = cfg.classes_per_task or len(folders) // cfg.n_tasks
    if per_task < 1 or per_task * cfg.n_tasks > len(folders) or \
            (cfg.classes_per_task is None and len(folders) % cfg.n_tasks):
        raise ClframeError(f"{root} has {len(folders)} class folders, which do not make {cfg.n_tasks} tasks"
                           f"{f' of {cfg.classes_per_task} classes' if cfg.classes_per_task else ' of equal size'}; "
                           f"set folder_classes.n_tasks / classes_per_task")
    class_names = sorted(folders)  # one id space: a class's id is its folder's position by name, used or not
    class_ids = {name: i for i, name in enumerate(class_names)}
    order = class_order(len(class_names), run.seed, cfg.shuffle_classes, run.class_order)[:per_task * cfg.n_tasks]
    rng = np.random.RandomState(run.seed)
    used = sorted(class_names[i] for i in order)  # read by name, so the images kept do not depend on the order
    images, labels = load_labelled({n: folders[n] for n in used}, class_ids, cfg.image_size, cfg.workers,
                                   cfg.max_per_class, rng)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, run.seed)
    experiences = split_by_classes(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                                   order, cfg.n_tasks)
    return Stream("folder_classes", CLASS_IL, class_names, experiences, info={"root": str(root), "class_order": order})
