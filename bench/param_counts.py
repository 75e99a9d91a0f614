"""Trainable parameters of every registered strategy on ViT-B/16, as a markdown table.

    python bench/param_counts.py [--model vit_base_patch16_224] [--classes 100] [--strategies a,b]

Each strategy is built exactly as ``clframe run --scenario split_cifar100 --no-pretrained`` would
build it (its configs/<name>.yaml defaults, 100 classes), on the meta device where it can be:
shapes only, so no memory, no initialisation cost and no weights to download. The count is the strategy's own
``count_trainable()``, the number the engine logs as ``trainable_params``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clframe.config import builtin_config, resolve_config  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL  # noqa: E402
from clframe.strategies.base import StrategyConfig, StreamInfo  # noqa: E402

COMMON_FIELDS = {f.name for f in dataclasses.fields(StrategyConfig)}


@dataclass
class Row:
    name: str
    trainable: int | None
    backbone: int | None
    what: str
    defaults: str = ""


def describe(cls: type) -> str:
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
    return (doc.strip().splitlines() or [""])[0]


def build(name: str, model: str, n_classes: int, kind: str, device: str, scenario: str = "split_cifar100"):
    entry = STRATEGIES.get(name)
    sets = [f"model={model}", "pretrained=false", "weights=null", "device=cpu"]
    config = resolve_config({"scenario": scenario, "strategy": name}, None, sets,
                            SCENARIOS.get(scenario).config_cls, entry.config_cls)
    names = [f"category {i}" for i in range(n_classes)]  # words, not placeholders: CLIP strategies prompt with them
    info = StreamInfo(kind, n_classes, names, ["domain_0", "domain_1"], 10)
    with torch.device(device):
        return entry.obj(config.strategy, config.run, info), config


def count(name: str, model: str, n_classes: int) -> Row:
    """Build ``name`` on ``model`` on the meta device; a strategy with its own kind of backbone
    (open_clip) is built on the model its configs/<name>.yaml names, one that needs a domain-IL
    stream on one, and one that cannot live on the meta device on the CPU."""
    own_model = (builtin_config(name).get("run") or {}).get("model")
    models = [model] + ([own_model] if own_model and own_model != model else [])
    error = None
    for candidate, kind, device in itertools.product(models, (CLASS_IL, DOMAIN_IL), ("meta", "cpu")):
        try:
            strategy, config = build(name, candidate, n_classes, kind, device)
            break
        except Exception as exc:  # report it in the table rather than stop
            error = error or exc
    else:
        return Row(name, None, None, f"(not built: {type(error).__name__}: {error})"[:120])
    backbone = getattr(strategy, "backbone", None)
    total = sum(p.numel() for p in backbone.parameters()) if backbone is not None else None
    defaults = ", ".join(f"{f.name}={getattr(config.strategy, f.name)}" for f in dataclasses.fields(config.strategy)
                         if f.name not in COMMON_FIELDS)
    on = "" if candidate == model else f" (on {candidate})"
    return Row(name, strategy.count_trainable(), total, describe(STRATEGIES.get(name).obj) + on, defaults)


def markdown(rows: list[Row], model: str, n_classes: int) -> str:
    lines = [f"| strategy | trainable parameters ({model}, {n_classes} classes) | % of backbone | what trains | "
             f"defaults |", "|---|---:|---:|---|---|"]
    for row in sorted(rows, key=lambda r: (r.trainable is None, r.trainable or 0, r.name)):
        number = f"{row.trainable:,}" if row.trainable is not None else "–"
        share = f"{100 * row.trainable / row.backbone:.3f}" if row.trainable is not None and row.backbone else "–"
        cells = [f"`{row.name}`", number, share, row.what, row.defaults]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--classes", type=int, default=100, help="classes the head covers")
    parser.add_argument("--strategies", help="comma-separated names (default: every registered strategy)")
    args = parser.parse_args(argv)
    names = args.strategies.split(",") if args.strategies else STRATEGIES.names()
    print(markdown([count(name, args.model, args.classes) for name in names], args.model, args.classes))


if __name__ == "__main__":
    main()
