"""``clframe compare --plot``: average accuracy and forgetting against the task index.

One line per run, or with ``--group-by`` one line per group of seeds: the mean over its complete
runs with a shaded band of ± one standard deviation (ddof 1). Legends name the strategy, the
scenario, the seed(s) and the config keys that tell the lines apart.
"""
from __future__ import annotations

from pathlib import Path

from clframe.runsets import Group, RunRecord, differing_keys, group_records, short_key, step_curves

PANELS = (("acc_avg", "average accuracy acc_avg (%)"), ("forgetting", "forgetting (%)"))


def _label(record: RunRecord, keys: list[str], seeds: str) -> str:
    parts = [record.strategy + (" (joint)" if record.joint else ""), record.scenario]
    if record.n_tasks:
        parts[-1] += f" ({record.n_tasks} tasks)"
    parts += [f"{short_key(key)}={record.config.get(key, '')}" for key in keys] + [seeds]
    return " · ".join(part for part in parts if part)


def plot_curves(client, records: list[RunRecord], path: str | Path, grouped: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = differing_keys(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    if grouped:
        lines = [(group, _label(group.first, keys, f"seeds {','.join(map(str, group.seeds))}"))
                 for group in group_records(records) if group.complete]
    else:
        lines = [(Group([r]), _label(r, keys, f"seed {r.seed}")) for r in records]
        labels = [label for _, label in lines]
        lines = [(g, label if labels.count(label) == 1 else f"{label} [{g.first.run_id[:8]}]") for g, label in lines]
    for group, label in lines:
        curves = step_curves(client, group, tuple(k for k, _ in PANELS)) if grouped else _single(client, group.first)
        for ax, (key, _) in zip(axes, PANELS):
            by_step = curves.get(key, {})
            steps = sorted(by_step)
            means = [by_step[s][0] for s in steps]
            drawn = ax.plot(steps, means, marker="o", label=label)[0]
            stds = [by_step[s][1] for s in steps]
            if grouped and all(std is not None for std in stds) and steps:
                ax.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                                color=drawn.get_color(), alpha=0.2, linewidth=0)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title + (": mean ± std over seeds" if grouped else ""))
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=min(2, max(len(texts), 1)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(texts) + 1) // 2), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _single(client, record: RunRecord) -> dict[str, dict[int, tuple]]:
    """One run's curves in step_curves' shape (any status: a failed run shows what it reached)."""
    curves = {}
    for key, _ in PANELS:
        history = sorted(client.get_metric_history(record.run_id, key), key=lambda m: (m.step, m.timestamp))
        curves[key] = {step: (value, None, 1) for step, value in {m.step: m.value for m in history}.items()}
    return curves
