"""Domain-incremental streams from scikit-learn's bundled digits: no download, real data.

Every experience holds the same ten digit classes seen through a new domain: a rotation
(``rotated_digits``) or a corruption such as noise, colour, scale or inversion
(``corrupted_digits``). The 8x8 digits are upsampled to ``image_size`` before the domain
transform so rotations and shrinking do not destroy them. One seeded train/test split is made
first; with ``disjoint`` (default) each domain then draws its own share of both, so no digit
image appears in two experiences and no test image is ever trained on.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from clframe.config import RunConfig, option
from clframe.errors import ClframeError
from clframe.registry import register_scenario
from clframe.scenarios.base import DOMAIN_IL, Experience, Stream
from clframe.scenarios.split_digits import DIGIT_NAMES, load_digits_uint8, stratified_split

# A domain transform: float images [N, 3, S, S] in [0, 1] and a generator -> the same, transformed.
DomainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class RotatedDigitsConfig:
    angles: list[float] = option(None, "one domain per rotation, in degrees counter-clockwise, in this order",
                                 factory=lambda: [0.0, 45.0, 90.0, 135.0, 180.0])
    shuffle_domains: bool = option(False, "order the domains by the run seed (else as listed)")
    disjoint: bool = option(True, "each domain gets its own share of the digits (else all of them, rotated)")
    test_fraction: float = option(0.25, "share of each class held out for testing", min=0.05)
    image_size: int = option(32, "stored resolution; digits are upsampled before the domain transform", min=8)


CORRUPTIONS = ("clean", "noise", "colour", "scale", "invert")


@dataclass
class CorruptedDigitsConfig:
    domains: list[str] = option(None, f"corruptions, one domain each, in this order (from {', '.join(CORRUPTIONS)})",
                                factory=lambda: list(CORRUPTIONS))
    shuffle_domains: bool = option(False, "order the domains by the run seed (else as listed)")
    disjoint: bool = option(True, "each domain gets its own share of the digits (else all of them, corrupted)")
    test_fraction: float = option(0.25, "share of each class held out for testing", min=0.05)
    image_size: int = option(32, "stored resolution; digits are upsampled before the domain transform", min=8)


# ----- domain transforms -----
def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(angle: float) -> DomainTransform:
    """Rotate about the centre; the digit is first shrunk to 1/sqrt(2) of the side so that no angle
    cuts its corners off (every angle, 0 included, sees the same digit size)."""
    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # noqa: ARG001
        radians = math.radians(angle)
        cos, sin = math.sqrt(2) * math.cos(radians), math.sqrt(2) * math.sin(radians)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(len(images), 2, 3)
        return _affine(images, theta)
    return apply


def _noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return images + 0.3 * torch.randn(images.shape, generator=generator)


def _colour(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Strokes and background each get a random colour per image (background = stroke hue shifted by half)."""
    grey = images.mean(dim=1, keepdim=True)
    stroke = torch.rand(len(images), 3, 1, 1, generator=generator)
    background = (stroke + 0.5) % 1.0
    return grey * stroke + (1 - grey) * background


def _scale(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shrink to 40-70% of the side and place at a random position."""
    draws = torch.rand(len(images), 3, generator=generator)
    scale = 0.4 + 0.3 * draws[:, 0]
    room = 1 / scale - 1  # how far the shrunken digit can move, in grid units of the output
    theta = torch.zeros(len(images), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = room * (2 * draws[:, 1] - 1)
    theta[:, 1, 2] = room * (2 * draws[:, 2] - 1)
    return _affine(images, theta)


CORRUPTION_TRANSFORMS: dict[str, DomainTransform] = {
    "clean": lambda images, generator: images,
    "noise": _noise,
    "colour": _colour,
    "scale": _scale,
    "invert": lambda images, generator: 1 - images,
}


# ----- the stream -----
def _deal(indices: torch.Tensor, labels: torch.Tensor, n_domains: int,
          rng: np.random.RandomState) -> list[torch.Tensor]:
    """Split ``indices`` into ``n_domains`` disjoint, class-balanced shares (seeded)."""
    shares: list[list[int]] = [[] for _ in range(n_domains)]
    for c in sorted(set(labels[indices].tolist())):
        members = indices[labels[indices] == c].numpy().copy()
        rng.shuffle(members)
        for position, index in enumerate(members):
            shares[(position + c) % n_domains].append(int(index))
    return [torch.tensor(sorted(share), dtype=torch.long) for share in shares]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def digit_domain_stream(name: str, domains: list[tuple[str, DomainTransform]], cfg, run: RunConfig) -> Stream:
    """A domain-IL stream: one experience per (domain name, transform), over all ten digits."""
    if not domains:
        raise ClframeError(f"{name}: no domains configured")
    n_domains = len(domains)
    if cfg.disjoint and n_domains > 20:
        raise ClframeError(f"{name}: {n_domains} disjoint domains leave too few digits each; use at most 20 "
                           f"or --set {name}.disjoint=false")
    images, labels = load_digits_uint8()
    size = cfg.image_size
    upsampled = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, run.seed)
    rng = np.random.RandomState(run.seed)
    if cfg.disjoint:
        train_shares, test_shares = _deal(train_idx, labels, n_domains, rng), _deal(test_idx, labels, n_domains, rng)
    else:
        train_shares, test_shares = [train_idx] * n_domains, [test_idx] * n_domains
    order = rng.permutation(n_domains).tolist() if cfg.shuffle_domains else list(range(n_domains))
    experiences = []
    for task_id, domain_index in enumerate(order):
        domain, transform = domains[domain_index]
        # The domain's randomness depends on the seed and the domain's name, not on its position.
        generator = torch.Generator().manual_seed(run.seed * 1_000_003 + zlib.crc32(domain.encode()))
        train_share, test_share = train_shares[task_id], test_shares[task_id]
        train_images = _to_uint8(transform(upsampled[train_share], generator))
        test_images = _to_uint8(transform(upsampled[test_share], generator))
        experiences.append(Experience(task_id, list(range(10)), train_images, labels[train_share],
                                      test_images, labels[test_share], domain=domain))
    domain_names = [e.domain for e in experiences]
    info = {"domain_order": domain_names,
            "source_indices": [(train_shares[t].tolist(), test_shares[t].tolist()) for t in range(n_domains)]}
    return Stream(name, DOMAIN_IL, list(DIGIT_NAMES), experiences, domain_names=domain_names, info=info)


@register_scenario("rotated_digits", config=RotatedDigitsConfig)
def rotated_digits(cfg: RotatedDigitsConfig, run: RunConfig) -> Stream:
    """Domain-IL, offline: the bundled digits, one rotation angle per experience."""
    names = [f"rotate_{angle:g}" for angle in cfg.angles]
    if len(set(names)) != len(names):
        raise ClframeError(f"rotated_digits.angles repeats an angle: {cfg.angles}")
    return digit_domain_stream("rotated_digits", [(n, rotate(a)) for n, a in zip(names, cfg.angles)], cfg, run)


@register_scenario("corrupted_digits", config=CorruptedDigitsConfig)
def corrupted_digits(cfg: CorruptedDigitsConfig, run: RunConfig) -> Stream:
    """Domain-IL, offline: the bundled digits, one corruption (noise, colour, scale, ...) per experience."""
    unknown = [d for d in cfg.domains if d not in CORRUPTION_TRANSFORMS]
    if unknown:
        raise ClframeError(f"corrupted_digits.domains: unknown {', '.join(unknown)}; choose from "
                           f"{', '.join(CORRUPTIONS)}")
    if len(set(cfg.domains)) != len(cfg.domains):
        raise ClframeError(f"corrupted_digits.domains repeats a domain: {cfg.domains}")
    return digit_domain_stream("corrupted_digits", [(d, CORRUPTION_TRANSFORMS[d]) for d in cfg.domains], cfg, run)
