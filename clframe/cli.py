"""The ``clframe`` command line: run, list, compare, ui.

Every user-fixable problem surfaces as one ``error:`` line on stderr and exit code 1 (usage
errors that click catches exit 2, an interrupted run 130 or 143); a traceback means a bug.
"""
from __future__ import annotations

import os
import sys

import click

from clframe.config import RunConfig, builtin_config_names, field_help, resolve_config
from clframe.errors import ClframeError

HELP = field_help(RunConfig)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clframe")
def cli() -> None:
    """clframe: continual-learning experiments on timm ViTs, tracked in MLflow."""


def _resolve(options: dict, config_file: str | None, sets: tuple[str, ...], base: dict | None = None):
    from clframe.registry import SCENARIOS, STRATEGIES

    scenario = SCENARIOS.get(options["scenario"])
    strategy = STRATEGIES.get(options["strategy"])
    config = resolve_config(options, config_file, list(sets), scenario.config_cls, strategy.config_cls, base)
    if os.environ.get("RANK", "0") == "0":
        for note in config.notes:  # e.g. a module:Class subclass taking its built-in's configs/<name>.yaml
            click.echo(note, err=True)
    return config


def _resume_base(target: str, options: dict, config_file: str | None, sets: tuple[str, ...]) -> tuple[str, dict]:
    """``--resume RUN``: the checkpoint's config is the starting point, so the bare command resumes;
    options given now are checked against it by the runner (any difference is refused)."""
    from click.core import ParameterSource

    from clframe.checkpoint import locate

    path, base = locate(target, config_file, sets)
    ctx = click.get_current_context()
    saved = base.get("run", {})
    for name, param in (("scenario", "scenario"), ("strategy", "strategies")):
        if ctx.get_parameter_source(param) in (None, ParameterSource.DEFAULT):
            options[name] = saved[name]
        elif options[name] != saved[name]:
            raise ClframeError(f"--resume {target}: that run used --{name} {saved[name]}, not {options[name]}; "
                               f"leave --{name} out")
    return str(path), base


@cli.command()
@click.option("--scenario", default="split_digits", show_default=True, help=HELP["scenario"])
@click.option("--strategy", "strategies", multiple=True, default=["linear"], show_default=True,
              help=HELP["strategy"] + "; repeat it to sweep (one child run per strategy)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with run:, <scenario>: and <strategy>: sections")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key, e.g. epochs=2 or l2p.pool_size=20 (repeatable)")
@click.option("--model", help=HELP["model"])
@click.option("--pretrained/--no-pretrained", default=None, help=HELP["pretrained"])
@click.option("--weights", type=click.Path(dir_okay=False), help=HELP["weights"])
@click.option("--epochs", type=int, help=HELP["epochs"])
@click.option("--batch-size", type=int, help=HELP["batch_size"])
@click.option("--lr", type=float, help=HELP["lr"])
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help=HELP["device"])
@click.option("--seed", type=int, help=HELP["seed"])
@click.option("--seeds", metavar="0,1,2", help="run once per seed, as child runs of one parent run that logs their "
              "per-task mean and std (with several --strategy: every strategy x seed)")
@click.option("--data-root", help=HELP["data_root"])
@click.option("--tracking-uri", help=HELP["tracking_uri"])
@click.option("--experiment", help=HELP["experiment"])
@click.option("--run-name", help=HELP["run_name"])
@click.option("--joint", is_flag=True, default=None, help=HELP["joint"])
@click.option("--resume", metavar="RUN", help="continue a run from its last task-boundary checkpoint (MLflow run id or .pt path)")
@click.option("--no-progress", is_flag=True, help="hide the progress bars")
@click.option("--sweep", "sweep_file", type=click.Path(dir_okay=False), help="YAML file of runs (runs: list and/or grid:) to run in turn as child runs of one parent run; see clframe/sweep.py")
@click.option("--fail-fast", is_flag=True, help="stop a sweep at its first failing run (default: record it FAILED and go on)")
@click.option("--gpus", "nproc", type=click.IntRange(min=1), metavar="N",
              help="data-parallel over N processes: launches torchrun --nproc-per-node N with the same arguments "
                   "(one per GPU; with --device cpu, N CPU processes over gloo)")
@click.option("--parallel", type=click.IntRange(min=1), metavar="N",
              help="run up to N of a sweep's runs at once on this machine, through Ray (pip install -e .[sweep])")
@click.option("--ray-address", metavar="ADDR", help="run a sweep's runs on this Ray cluster (default: $RAY_ADDRESS); "
              "several nodes need an http:// --tracking-uri")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), metavar="K",
              help="GPUs for each run of a parallel sweep (default 1 where the cluster has GPUs, 0 with --device cpu)")
@click.option("--cpus-per-run", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="C", help="CPUs (and torch threads) for each run of a parallel sweep")
def run(scenario, strategies, config_file, sets, resume, no_progress, sweep_file, fail_fast, nproc, parallel, ray_address,
        gpus_per_run, cpus_per_run, seeds, **options) -> None:
    """Run one continual-learning experiment and log it to MLflow.

    Defaults come from configs/<strategy>.yaml and configs/<scenario>.yaml; then --config,
    then these options, then --set (highest). Several --strategy values or --sweep FILE run a
    sweep: the runs in turn, as child runs of one parent run (--run-name names the parent).
    """
    from clframe import distributed

    from clframe.runner import format_result, run_experiment
    from clframe.tracking import resolve_uri

    options = dict(options, scenario=scenario, strategy=strategies[0])
    if no_progress:
        options["progress"] = False
    if sweep_file or len(strategies) > 1 or seeds:
        from clframe.parallel_sweep import RayOptions, run_on_ray
        from clframe.sweep import parse_seeds, plan_sweep, run_sweep, sets_seed

        ray_options = RayOptions(parallel, ray_address, gpus_per_run, cpus_per_run)
        plan = plan_sweep(list(strategies), sweep_file, parse_seeds(seeds, "--seeds") if seeds else None)
        if plan.seeds and options.get("seed") is not None:
            raise ClframeError("--seed and --seeds (or seeds: in the sweep file) both choose the seed; keep one")
        if plan.seeds and sets_seed(list(sets)):
            raise ClframeError("--set seed=N and --seeds (or seeds: in the sweep file) both choose the seed; keep one")
        if ray_options.requested or plan.search:  # several runs at once, or a search: on Ray
            if distributed.launched() or (nproc or 1) > 1:
                raise ClframeError("--gpus is for one run; a parallel sweep gives each run --gpus-per-run GPUs")
            run_on_ray(options, config_file, sets, plan, fail_fast, ray_options, resume, echo=click.echo)
            return
        if resume:
            raise ClframeError("--resume continues one run, or a sweep run with --parallel N (give its parent run id); "
                               "a sequential sweep is not resumed: add --parallel 1")
        if distributed.launched() or (nproc or 1) > 1:
            raise ClframeError("a sweep runs on one process; run its runs one by one under torchrun / --gpus")
        run_sweep(options, config_file, sets, plan, fail_fast, echo=click.echo)
        return
    if parallel or ray_address:
        raise ClframeError("--parallel and --ray-address run a sweep's runs at once: give --sweep FILE or several "
                           "--strategy")
    base = None
    if resume:
        resume, base = _resume_base(resume, options, config_file, sets)
    config = _resolve(options, config_file, sets, base)
    if nproc is not None and nproc > 1 and not distributed.launched():
        import torch

        from clframe.engine import resolve_device
        from clframe.registry import STRATEGIES
        from clframe.strategies.baseline import check_one_process

        asked = config.run.device  # auto means GPUs here: --gpus on a machine without them is refused
        distributed.check_processes(nproc, torch.device("cuda") if asked == "auto" else resolve_device(asked))
        check_one_process(STRATEGIES.get(config.run.strategy).obj, nproc)
        _launch_torchrun(nproc)  # the config is known to be good: its errors stay one line
    result = run_experiment(config, resume=resume, echo=click.echo)
    if not distributed.launched() or int(os.environ["RANK"]) == 0:
        click.echo(format_result(result, config, resolve_uri(config.run.tracking_uri)))


def _launch_torchrun(nproc: int) -> None:
    """Replace this process by ``python -m torch.distributed.run --standalone --nproc-per-node N -m
    clframe run <the same arguments without --gpus>``."""
    ctx = click.get_current_context()
    argv = list((ctx.find_root().obj or {}).get("argv", sys.argv[1:]))
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            kept.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "clframe", *kept]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


@cli.command(name="list")
@click.argument("name", required=False)
@click.option("--scenario", help="with a strategy NAME: resolve its config on this scenario (default: split_digits)")
@click.option("--strategy", help="with a scenario NAME: resolve its config with this strategy (default: linear)")
def list_components(name, scenario, strategy) -> None:
    """List scenarios, strategies (with the stream kinds each serves) and built-in config files;
    with NAME (a strategy or scenario), every config key with its value, where that value comes
    from, and its help."""
    from clframe.registry import SCENARIOS, STRATEGIES, strategy_traits
    from clframe.scenarios.base import KIND_NAMES

    if name:
        click.echo(describe_config(name, scenario, strategy))
        return

    def first_line(obj) -> str:
        return ((obj.__doc__ or "").strip().splitlines() or [""])[0]

    click.echo("scenarios:")
    for entry_name in SCENARIOS.names():
        entry = SCENARIOS.get(entry_name) if not entry_name.endswith(":") else SCENARIOS._entries[entry_name]
        click.echo(f"  {entry_name + ('<Name>' if entry_name.endswith(':') else ''):24s} {first_line(entry.obj)}")
    click.echo("strategies (the stream kinds each serves; clframe list NAME shows its config):")
    for entry_name in STRATEGIES.names():
        kinds = "+".join(KIND_NAMES.get(k, k) for k in strategy_traits(entry_name)[0])
        click.echo(f"  {entry_name:14s} {kinds:18s} {first_line(STRATEGIES.get(entry_name).obj)}")
    click.echo("configs (configs/*.yaml):")
    click.echo("  " + " ".join(builtin_config_names()))


def describe_config(name: str, scenario: str | None, strategy: str | None) -> str:
    """Every key of a strategy's (or scenario's) section and of the run section, as ``clframe run``
    resolves them for that pair: value, where it comes from, help."""
    import dataclasses

    import yaml

    from clframe.config import ResolvedConfig
    from clframe.errors import closest
    from clframe.registry import SCENARIOS, STRATEGIES, strategy_traits
    from clframe.scenarios.base import KIND_NAMES

    STRATEGIES.names()  # loads the built-ins
    if name in STRATEGIES._entries or (":" in name and name not in SCENARIOS._entries
                                       and name.partition(":")[0] + ":" not in SCENARIOS._entries):
        if strategy:
            raise ClframeError(f"{name} is a strategy: give the scenario with --scenario, not --strategy")
        pair = {"scenario": scenario or "split_digits", "strategy": name}
        section = name
    elif name in SCENARIOS._entries or name.partition(":")[0] + ":" in SCENARIOS._entries:
        if scenario:
            raise ClframeError(f"{name} is a scenario: give the strategy with --strategy, not --scenario")
        pair = {"scenario": name, "strategy": strategy or "linear"}
        section = name
    else:
        known = list(STRATEGIES._entries) + list(SCENARIOS._entries)
        raise ClframeError(f"no strategy or scenario '{name}'{closest(name, known)}; clframe list shows them")
    config: ResolvedConfig = resolve_config(pair, None, [], SCENARIOS.get(pair["scenario"]).config_cls,
                                            STRATEGIES.get(pair["strategy"]).config_cls)

    def show(value) -> str:
        if isinstance(value, str):
            return value if value else "''"
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")

    lines = []
    if section == pair["strategy"]:
        kinds, backbone = strategy_traits(name)
        lines.append(f"strategy {name}: serves {', '.join(KIND_NAMES.get(k, k) for k in kinds)} streams; "
                     f"{backbone} backbone")
    else:
        lines.append(f"scenario {name}")
    lines.append(f"values as `clframe run --scenario {pair['scenario']} --strategy {pair['strategy']}` resolves them "
                 f"({'--scenario' if section == pair['strategy'] else '--strategy'} picks another); "
                 f"change one with --set {'KEY' if section == 'run' else section + '.KEY'}=VALUE")
    lines.extend(config.notes)
    for title, obj in ((section, config.strategy if section == pair["strategy"] else config.scenario),
                       ("run", config.run)):
        fields = dataclasses.fields(obj)
        rows = [(f.name, show(getattr(obj, f.name)), config.origin(f"{title}.{f.name}"), f.metadata.get("help", ""))
                for f in fields]
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
        lines.append("")
        lines.append(f"{title}:" + ("" if rows else " (no keys)"))
        lines.extend(f"  {k:{widths[0]}s}  {v:{min(widths[1], 30)}s}  {o:{widths[2]}s}  {h}" for k, v, o, h in rows)
    return "\n".join(lines)


@cli.command()
@click.argument("runs", nargs=-1, metavar="[RUN]...")
@click.option("--experiment", default="clframe", show_default=True, help="MLflow experiment to read")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown", "latex"]), default="table",
              show_default=True, help="output format (latex: a booktabs tabular, best per column in bold)")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="also draw acc_avg and forgetting per task (per group: mean with a ± std band)")
@click.option("--group-by", metavar="FIELDS", help="one row per group of runs that differ only in seed: mean ± std "
              "(sample std, ddof 1) and n; FIELDS (strategy, scenario, model, epochs or config keys such as lr, "
              "comma-separated) come first; runs differing in any other config key stay apart")
@click.option("--scenario", "scenarios", multiple=True, help="only runs of this scenario (repeatable)")
@click.option("--strategy", "strategies", multiple=True, help="only runs of this strategy (repeatable)")
@click.option("--status", "statuses", multiple=True, help="only runs with this status: FINISHED, FAILED, KILLED, "
              "RUNNING (repeatable)")
def compare(runs, experiment, tracking_uri, fmt, plot, group_by, scenarios, strategies, statuses) -> None:
    """Compare runs: sections of one scenario and task count, best final acc_avg first.

    RUN is a run id, a unique prefix of one, a run name, or a sweep's parent run (for its
    children); without RUN, every run of the experiment (sweep parents left out).
    """
    from pathlib import Path

    from clframe.compare import compare_runs
    from clframe.runfiles import check_writable_file
    from clframe.tracking import check_sqlite_intact, refuse_file_store, resolve_uri, store_failure

    uri = resolve_uri(tracking_uri)
    refuse_file_store(uri)
    check_sqlite_intact(uri)  # a damaged mlflow.db: one line naming it, not a traceback
    if plot:
        if not Path(plot).parent.is_dir():
            raise ClframeError(f"--plot {plot}: the folder {Path(plot).parent} does not exist; create it or "
                               f"choose another path")
        check_writable_file(Path(plot), "--plot", "choose a writable path")
    try:
        by = [name.strip() for name in group_by.split(",") if name.strip()] if group_by is not None else None
        if by is not None and not by:
            raise ClframeError("--group-by needs a field, e.g. --group-by strategy")
        table = compare_runs(uri, experiment, list(runs), fmt, plot, group_by=by, scenarios=scenarios,
                             strategies=strategies, statuses=statuses)
    except Exception as exc:
        failure = store_failure(uri, exc)
        if failure is None:
            raise
        raise failure from None
    click.echo(table)
    if plot:
        click.echo(f"plot written to {plot}", err=True)


@cli.command()
@click.option("--backend-store-uri", default=None, help="store to browse (default: sqlite:///mlflow.db here)")
@click.option("--experiment", default="clframe", show_default=True, help="experiment whose runs the UI opens on")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="server processes (mlflow ui's default of 4 plus its job runner is ~15 processes, 1.9 GiB)")
@click.option("--open", "open_browser", is_flag=True, help="also open the page in a web browser")
def ui(backend_store_uri, experiment, port, host, workers, open_browser) -> None:
    """Serve the MLflow UI on a store, opened on the experiment's runs (Ctrl-C to stop)."""
    from clframe.tracking import refuse_file_store, resolve_uri
    from clframe.ui import serve

    uri = backend_store_uri or resolve_uri(None)
    refuse_file_store(uri)
    serve(uri, experiment, host, port, workers, open_browser, click.echo)


def main(argv: list[str] | None = None) -> None:
    """The console script: every failure a user can cause ends as one ``error:`` line on stderr.

    The working directory goes first on ``sys.path`` (as ``python -m`` does), so ``--strategy
    my_module:MyStrategy`` finds the user's own module in the folder they run from, ahead of any
    installed package of the same name."""
    if os.getcwd() not in sys.path[:1]:
        sys.path.insert(0, os.getcwd())
    try:
        code = cli.main(args=argv, standalone_mode=False, obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except click.ClickException as exc:  # usage errors: unknown option, a value click cannot convert
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except ClframeError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it
            click.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
