"""Trainable parameters of the CLIP strategies on an open_clip model (default ViT-B-16, no
pretrained weights), as a markdown table.

    python bench/param_counts_clip.py [--model ViT-B-16] [--classes 100] [--domains 5]

Each strategy is built as ``clframe run`` builds it (its configs/<name>.yaml defaults, ``--model``,
``--no-pretrained``) on the meta device: shapes only, nothing initialised or downloaded. The
count is ``count_trainable()``, the number the engine logs as ``trainable_params``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clframe.config import resolve_config  # noqa: E402
from clframe.registry import SCENARIOS, STRATEGIES  # noqa: E402
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL  # noqa: E402
from clframe.strategies.base import StreamInfo  # noqa: E402

ROWS = [  # strategy, --set overrides, what trains
    ("zeroshot_clip", [], "nothing"),
    ("coop", [], "16 context vectors"),
    ("coop", ["coop.class_specific=true"], "16 context vectors per class (CSC)"),
    ("cocoop", [], "4 context vectors + Meta-Net (Linear-ReLU-Linear, width/16)"),
    ("dapl", [], "16 shared + 16 of the current domain's context vectors, per task"),
]


def build(name: str, sets: list[str], model: str, n_classes: int, n_domains: int):
    kind, scenario = (DOMAIN_IL if name == "dapl" else CLASS_IL), "split_cifar100"  # its config only
    config = resolve_config({"scenario": scenario, "strategy": name, "model": model, "pretrained": False,
                             "device": "cpu"}, None, ["image_size=null", *sets],
                            SCENARIOS.get(scenario).config_cls, STRATEGIES.get(name).config_cls)
    n_tasks = n_domains if kind == DOMAIN_IL else 10
    domains = [f"domain {d}" for d in range(n_domains)] if kind == DOMAIN_IL else None
    info = StreamInfo(kind, n_classes, [f"object {i}" for i in range(n_classes)], domains, n_tasks)
    with torch.device("meta"):
        return STRATEGIES.get(name).obj(config.strategy, config.run, info)


def clip_param_counts(model: str = "ViT-B-16", n_classes: int = 100, n_domains: int = 5) -> str:
    """The markdown table: trainable parameters per task and in total after every task."""
    lines = [f"| strategy | trainable per task ({model}, {n_classes} classes) | learned in total | % of CLIP "
             f"| what trains |", "|---|---:|---:|---:|---|"]
    for name, sets, what in ROWS:
        strategy = build(name, sets, model, n_classes, n_domains)
        backbone = sum(p.numel() for p in strategy.backbone.parameters())
        trainable = strategy.count_trainable()
        total = sum(p.numel() for n, p in strategy.named_parameters() if not n.startswith("backbone."))
        label = f"`{name}`" + (f" ({', '.join(s.split('.', 1)[1] for s in sets)})" if sets else "")
        note = f" ({n_domains} domains)" if name == "dapl" else ""
        lines.append(f"| {label} | {trainable:,} | {total:,}{note} | {100 * total / backbone:.3f} | {what} |")
    lines.append(f"\n{model} CLIP itself: {backbone:,} parameters, all frozen.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--domains", type=int, default=5, help="domains of DAPL's domain-IL stream")
    args = parser.parse_args(argv)
    print(clip_param_counts(args.model, args.classes, args.domains))


if __name__ == "__main__":
    main()
