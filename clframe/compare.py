"""``clframe compare``: the runs of an experiment side by side, as a paper's table needs them.

Runs are shown in sections of one scenario, task count and evaluation class set (results of
different streams are never ranked together), best final ``acc_avg`` first. Per run: its seed,
epochs and the config keys that differ between the runs shown (computed, not a fixed list); the
model with its parameter count when ``model_kwargs`` changed it; joint runs labelled. With
``--group-by`` runs that differ only in seed become one row: mean ± std (sample std, ddof 1) and n
over the complete seeds, the others named in ``note``. Formats: a terminal table, CSV, JSON,
Markdown and LaTeX (booktabs, best per column in bold). ``--plot`` draws acc_avg and forgetting
against the task, per run or per group (mean with a ± std band). Any MLflow store works.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from clframe.errors import ClframeError
from clframe.runsets import (HIGHER_IS_BETTER, PARENT_TAG, TASK_METRICS, RunRecord, differing_keys, group_records,
                             is_parent, short_key, to_record)
from clframe.tracking import check_reachable, check_sqlite_intact, sqlite_file

FORMATS = ("table", "csv", "json", "markdown", "latex")
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")
GROUP_FIELDS = ("strategy", "scenario", "model", "epochs")  # besides any config key


@dataclass
class Column:
    name: str  # key in a row
    header: str
    kind: str  # "text", "metric" (a number or mean/std), "count", "int", "float1", "rate"


METRIC_COLUMNS = [Column(name, name, "metric") for name in TASK_METRICS] + [
    Column("trainable_params", "params", "int"), Column("wall_time_s", "wall_s", "float1"),
    Column("train_img_s", "train_img/s", "rate"), Column("eval_img_s", "eval_img/s", "rate")]


@dataclass
class Section:
    title: str
    columns: list[Column]
    rows: list[dict]


def open_store(uri: str):
    """An MlflowClient on ``uri``; refuses, in one line, to create an empty local store by reading a
    missing one, and to read a damaged one."""
    path = sqlite_file(uri)  # the file of sqlite:///FILE, any ?query left out
    if path is not None and not path.exists():
        raise ClframeError(f"no MLflow store at {uri} (run clframe run here first, or pass --tracking-uri)")
    check_sqlite_intact(uri)
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _is_clframe_run(run) -> bool:
    return not is_parent(run) and ("acc_avg" in run.data.metrics or "strategy" in run.data.tags)


def select_runs(client, experiment: str, refs: list[str]) -> list:
    """The runs named by ``refs`` (run id, unique id prefix, run name, or a sweep's parent run for
    its children); with no refs, every clframe run of the experiment (sweep parents left out)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ClframeError(f"no experiment '{experiment}' in this store (experiments: {names}); "
                           f"pick one with --experiment")
    runs = _all_runs(client, found.experiment_id)
    if not refs:
        chosen = [run for run in runs if _is_clframe_run(run)]
        if not any("acc_avg" in run.data.metrics for run in chosen):
            raise ClframeError(f"no run in experiment '{experiment}' has results yet")
        return chosen
    picked: dict[str, object] = {}
    for ref in refs:
        matches = [r for r in runs if r.info.run_id == ref or r.info.run_name == ref]
        matches = matches or [r for r in runs if r.info.run_id.startswith(ref)]
        if not matches and re.fullmatch(r"[0-9a-f]{32}", ref):
            matches = [client.get_run(ref)]  # a run of another experiment, by its full id
        if not matches:
            raise ClframeError(f"no run '{ref}' in experiment '{experiment}' (give a run id, a unique prefix of "
                               f"one, or a run name; clframe compare lists the runs)")
        if len({r.info.run_id for r in matches}) > 1:
            listed = ", ".join(f"{r.info.run_id[:8]} ({r.info.run_name})" for r in matches[:5])
            raise ClframeError(f"'{ref}' matches {len(matches)} runs: {listed}; give more of the run id")
        run = matches[0]
        children = [r for r in runs if r.data.tags.get(PARENT_TAG) == run.info.run_id]
        for chosen in children if children else [run]:
            picked.setdefault(chosen.info.run_id, chosen)
    return list(picked.values())


def filter_records(records: list[RunRecord], scenarios=(), strategies=(), statuses=()) -> list[RunRecord]:
    wanted_status = {s.upper() for s in statuses}
    unknown = wanted_status - set(STATUSES)
    if unknown:
        raise ClframeError(f"--status {', '.join(sorted(unknown))}: choose among {', '.join(STATUSES)}")
    kept = [r for r in records if (not scenarios or r.scenario in scenarios)
            and (not strategies or r.strategy in strategies) and (not wanted_status or r.status in wanted_status)]
    if not kept:
        raise ClframeError("no run matches --scenario/--strategy/--status (clframe compare without them lists all)")
    return kept


# ----- rows -----
def model_label(record: RunRecord, counts: dict) -> str:
    """The model name, with its parameter count when ``model_kwargs`` changed the architecture."""
    if record.model_kwargs in ("", "{}", "None"):
        return record.model
    key = (record.model, record.model_kwargs, record.image_size)
    if key not in counts:
        counts[key] = count_parameters(*key)
    count = counts[key]
    return f"{record.model} ({_si(count)} params)" if count is not None else f"{record.model} {record.model_kwargs}"


def count_parameters(model: str, kwargs_text: str, image_size: str) -> int | None:
    """The backbone's parameter count (no head), built on the meta device: no memory, no weights."""
    import ast

    try:
        import timm
        import torch

        kwargs = ast.literal_eval(kwargs_text)
        if image_size not in ("", "None"):
            kwargs["img_size"] = int(image_size)
        with torch.device("meta"):
            backbone = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        return sum(p.numel() for p in backbone.parameters())
    except Exception:  # noqa: BLE001 - a label, not a result: fall back to showing the kwargs
        return None


def _si(count: int) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return str(count)


def _strategy_label(record: RunRecord) -> str:
    return f"{record.strategy} (joint)" if record.joint else record.strategy


def _section_title(members: list[RunRecord]) -> str:
    record = next((r for r in members if r.n_tasks is not None), members[0])
    title = f"{record.scenario} · {record.n_tasks} tasks" if record.n_tasks else record.scenario
    if record.kind != "domain_il":
        title += f" · eval classes: {record.eval_classes}"
    return title


def _sections(records: list[RunRecord]) -> list[list[RunRecord]]:
    """Records by (scenario, task count, eval classes); a run that failed before it knew its stream
    (no task count) joins its scenario's section when there is one."""
    known: dict[tuple, set] = {}
    for record in records:
        if record.n_tasks is not None:
            known.setdefault((record.scenario, record.eval_classes), set()).add(record.n_tasks)
    by_section: dict[tuple, list[RunRecord]] = {}
    for record in records:
        counts = known.get((record.scenario, record.eval_classes), set())
        key = record.section
        if record.n_tasks is None and len(counts) == 1:
            key = (record.scenario, next(iter(counts)), record.eval_classes)
        by_section.setdefault(key, []).append(record)
    return [by_section[key] for key in sorted(by_section, key=lambda k: tuple(str(part) for part in k))]


def run_sections(records: list[RunRecord]) -> list[Section]:
    """One row per run, in sections of comparable runs: complete runs first, best final acc_avg first."""
    counts: dict = {}
    sections = []
    for members in _sections(records):
        keys = differing_keys(members)
        columns = ([Column("run_id", "run", "id"), Column("strategy", "strategy", "text"),
                    Column("model", "model", "text"), Column("seed", "seed", "int"), Column("epochs", "epochs", "int")]
                   + [Column(key, short_key(key), "text") for key in keys]
                   + [Column("tasks", "tasks", "text")] + METRIC_COLUMNS + [Column("status", "status", "text")])
        rows = []
        for r in sorted(members, key=_run_order):
            tasks = "joint" if r.joint else f"{r.tasks_done or 0}/{r.n_tasks}" if r.n_tasks else str(r.tasks_done or "")
            rows.append(dict(r.final, run_id=r.run_id, run_name=r.run_name, strategy=_strategy_label(r),
                             model=model_label(r, counts), seed=r.seed, epochs=r.epochs, tasks=tasks,
                             status=r.status, scenario=r.scenario, n_tasks=r.n_tasks, tasks_done=r.tasks_done,
                             joint=r.joint, eval_classes=r.eval_classes,
                             **{key: r.config.get(key, "") for key in keys}))
        sections.append(Section(_section_title(members), columns, rows))
    return sections


def _run_order(r: RunRecord) -> tuple:
    """Complete runs first; best acc_avg, then least forgetting; runs without results last."""
    forgetting = r.final["forgetting"]
    return (not r.complete, r.final["acc_avg"] is None, -(r.final["acc_avg"] or 0.0),
            forgetting if forgetting is not None else math.inf, r.run_name, r.run_id)


def _group_by_keys(by: list[str], records: list[RunRecord]) -> list[str]:
    """Config keys named by ``--group-by`` (lr -> run.lr), checked against the runs' params."""
    known = {key for r in records for key in r.config}
    keys = []
    for name in by:
        if name in GROUP_FIELDS:
            continue
        key = name if name in known else f"run.{name}"
        if key not in known:
            raise ClframeError(f"--group-by {name}: not a field ({', '.join(GROUP_FIELDS)}) nor a config key of "
                               f"these runs (e.g. lr, l2p.pool_size)")
        keys.append(key)
    return keys


def group_sections(records: list[RunRecord], by: list[str]) -> list[Section]:
    """One row per group of runs that differ only in seed: mean ± std and n over complete runs."""
    counts: dict = {}
    named = _group_by_keys(by, records)
    sections = []
    for members in _sections(records):
        groups = group_records(members)
        expected = {r.seed for r in members if r.seed is not None}
        keys = named + [key for key in differing_keys(members) if key not in named]
        columns = ([Column("strategy", "strategy", "text"), Column("model", "model", "text"),
                    Column("epochs", "epochs", "int")] + [Column(key, short_key(key), "text") for key in keys]
                   + [Column("seeds", "seeds", "text"), Column("n", "n", "int")] + METRIC_COLUMNS
                   + [Column("note", "note", "text")])
        rows = []
        for group in groups:
            first = group.first
            row = {"strategy": _strategy_label(first), "model": model_label(first, counts), "epochs": first.epochs,
                   "seeds": ",".join(map(str, group.seeds)), "n": len(group.complete), "note": group.note(expected),
                   "runs": [r.run_id for r in group.records], "scenario": first.scenario, "n_tasks": first.n_tasks,
                   "joint": first.joint, "eval_classes": first.eval_classes,
                   **{key: first.config.get(key, "") for key in keys}}
            for column in METRIC_COLUMNS:
                row[column.name] = group.stats(column.name)
            rows.append(row)
        rows.sort(key=lambda row: (math.isnan(row["acc_avg"][0]), -_finite(row["acc_avg"][0]), row["strategy"]))
        sections.append(Section(_section_title(members), columns, rows))
    return sections


def _finite(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value


# ----- formats -----
def _plain(value, kind: str) -> str:
    """One cell for the table and Markdown: ``83.77 ± 0.21`` for a group's metric."""
    if isinstance(value, tuple):
        mean, std, n = value
        if not n:
            return ""
        shown_std = std is not None and not (kind == "int" and std == 0)  # "330", not "330 ± 0" for params
        return _plain(mean, kind) + (f" ± {_plain(std, kind)}" if shown_std else "")
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "id":
        return str(value)[:8]
    if kind == "metric":
        return f"{value:.2f}"
    if kind == "int":
        return f"{int(value):,d}"
    if kind == "float1":
        return f"{value:.1f}"
    if kind == "rate":
        return f"{value:.0f}"
    return str(value)


def _grid(section: Section) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers and cells of the columns that hold anything (an all-empty column is left out)."""
    cells = [[_plain(row.get(c.name), c.kind) for c in section.columns] for row in section.rows]
    keep = [k for k, c in enumerate(section.columns) if c.kind in ("id", "text") and c.name in ("strategy", "run_id")
            or any(line[k] for line in cells)]
    headers = [section.columns[k].header for k in keep]
    left = [section.columns[k].kind in ("text", "id") and section.columns[k].name not in ("seeds",) for k in keep]
    return headers, [[line[k] for k in keep] for line in cells], left


def format_table(sections: list[Section]) -> str:
    blocks = []
    for section in sections:
        headers, cells, left = _grid(section)
        widths = [max(len(h), *(len(line[k]) for line in cells)) for k, h in enumerate(headers)]

        def join(values: list[str]) -> str:
            return "  ".join(v.ljust(w) if is_left else v.rjust(w)
                             for v, w, is_left in zip(values, widths, left)).rstrip()

        blocks.append("\n".join([section.title, join(headers)] + [join(line) for line in cells]))
    return "\n\n".join(blocks)


def format_markdown(sections: list[Section]) -> str:
    blocks = []
    for section in sections:
        headers, cells, left = _grid(section)
        lines = [f"**{section.title}**", "", "| " + " | ".join(headers) + " |",
                 "|" + "|".join(":---" if is_left else "---:" for is_left in left) + "|"]
        blocks.append("\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells]))
    return "\n\n".join(blocks)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text)).replace("±", r"$\pm$")


def format_latex(sections: list[Section]) -> str:
    """A booktabs tabular: method columns, then the per-task metrics; the best value of each metric
    column (highest; lowest forgetting) in bold within its section."""
    skipped = ("run_id", "status", "note", "seeds", "tasks", "n")
    by_name = {c.name: c for s in sections for c in s.columns if c.kind in ("text", "int") and c.name not in skipped}
    label_columns = [c for c in by_name.values()  # the ones that tell rows apart (strategy always)
                     if c.name == "strategy" or len({str(row.get(c.name, "")) for s in sections for row in s.rows}) > 1]
    metrics = [Column(name, name, "metric") for name in TASK_METRICS]
    counts = [Column("n", "n", "int")] if any("n" in row for s in sections for row in s.rows) else []
    header = [latex_escape(c.header) for c in label_columns + metrics + counts]
    lines = [r"\begin{tabular}{" + "l" * len(label_columns) + "r" * (len(metrics) + len(counts)) + "}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    for k, section in enumerate(sections):
        if len(sections) > 1:
            if k:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(header)}}}{{l}}{{\emph{{{latex_escape(section.title)}}}}} \\")
        best = {m.name: _best(section.rows, m.name) for m in metrics}
        for row in section.rows:
            cells = [latex_escape(_plain(row.get(c.name), c.kind)) for c in label_columns]
            for m in metrics:
                text = latex_escape(_plain(row.get(m.name), "metric"))
                cells.append(rf"\textbf{{{text}}}" if text and _mean(row.get(m.name)) == best[m.name] else text)
            cells += [_plain(row.get(c.name), c.kind) for c in counts]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def _mean(value) -> float | None:
    value = value[0] if isinstance(value, tuple) else value
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 2)


def _best(rows: list[dict], name: str) -> float | None:
    values = [v for v in (_mean(row.get(name)) for row in rows) if v is not None]
    if not values:
        return None
    return max(values) if HIGHER_IS_BETTER[name] else min(values)


def _flat(section: Section, row: dict) -> dict:
    """A row for CSV/JSON: every field, numbers unrounded; a group's metric as mean/std/n."""
    flat = {"scenario": row["scenario"], "n_tasks": row["n_tasks"], "eval_classes": row["eval_classes"]}
    for column in section.columns:
        value = row.get(column.name)
        if isinstance(value, tuple):
            flat.update({f"{column.name}_mean": None if math.isnan(value[0]) else value[0],
                         f"{column.name}_std": value[1]})
        else:
            flat[column.name] = value
    for extra in ("run_name", "tasks_done", "joint", "runs"):
        if extra in row:
            flat[extra] = row[extra]
    return flat


def format_rows(sections: list[Section], fmt: str = "table") -> str:
    if fmt == "table":
        return format_table(sections)
    if fmt == "markdown":
        return format_markdown(sections)
    if fmt == "latex":
        return format_latex(sections)
    flat = [_flat(section, row) for section in sections for row in section.rows]
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        fields = list(dict.fromkeys(key for row in flat for key in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (";".join(v) if isinstance(v, list) else v) for k, v in row.items()} for row in flat)
        return out.getvalue().rstrip("\n")
    raise ClframeError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")


def compare_runs(uri: str, experiment: str, refs: list[str] | None = None, fmt: str = "table",
                 plot: str | Path | None = None, group_by: list[str] | None = None, scenarios=(), strategies=(),
                 statuses=()) -> str:
    """The formatted comparison (and the plot, when asked) of the chosen runs."""
    if fmt not in FORMATS:
        raise ClframeError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    client = open_store(uri)
    records = [to_record(client, run) for run in select_runs(client, experiment, list(refs or []))]
    records = filter_records(records, scenarios, strategies, statuses)
    sections = group_sections(records, group_by) if group_by else run_sections(records)
    if plot:
        from clframe.compare_plot import plot_curves

        plot_curves(client, records, plot, grouped=bool(group_by))
    return format_rows(sections, fmt)
