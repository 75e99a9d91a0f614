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
    return resolve_config(options, config_file, list(sets), scenario.config_cls, strategy.config_cls, base)


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
        from clframe.sweep import parse_seeds, plan_sweep, run_sweep

        ray_options = RayOptions(parallel, ray_address, gpus_per_run, cpus_per_run)
        plan = plan_sweep(list(strategies), sweep_file, parse_seeds(seeds, "--seeds") if seeds else None)
        if plan.seeds and options.get("seed") is not None:
            raise ClframeError("--seed and --seeds (or seeds: in the sweep file) both choose the seed; keep one")
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

        asked = config.run.device  # auto means GPUs here: --gpus on a machine without them is refused
        distributed.check_processes(nproc, torch.device("cuda") if asked == "auto" else resolve_device(asked))
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
def list_components() -> None:
    """List scenarios, strategies and built-in config files."""
    from clframe.registry import SCENARIOS, STRATEGIES

    def first_line(obj) -> str:
        return ((obj.__doc__ or "").strip().splitlines() or [""])[0]

    click.echo("scenarios:")
    for name in SCENARIOS.names():
        entry = SCENARIOS.get(name) if not name.endswith(":") else SCENARIOS._entries[name]
        click.echo(f"  {name + ('<Name>' if name.endswith(':') else ''):24s} {first_line(entry.obj)}")
    click.echo("strategies:")
    for name in STRATEGIES.names():
        click.echo(f"  {name:24s} {first_line(STRATEGIES.get(name).obj)}")
    click.echo("configs (configs/*.yaml):")
    click.echo("  " + " ".join(builtin_config_names()))


@cli.command()
@click.argument("runs", nargs=-1, metavar="[RUN]...")
@click.option("--experiment", default="clframe", show_default=True, help="MLflow experiment to read")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="output format")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="also draw average accuracy and forgetting per task for these runs")
def compare(runs, experiment, tracking_uri, fmt, plot) -> None:
    """Compare runs, best final average accuracy first.

    RUN is a run id, a unique prefix of one, a run name, or a sweep's parent run (for its
    children); without RUN, every run of the experiment that has results.
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
            raise ClframeError(f"--plot {plot}: the folder {Path(plot).parent} does not exist; create it or choose another path")
        check_writable_file(Path(plot), "--plot", "choose a writable path")
    try:
        table = compare_runs(uri, experiment, list(runs), fmt, plot)
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
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui(backend_store_uri, port, host) -> None:
    """Open the MLflow UI on the local store (Ctrl-C to stop)."""
    from clframe.tracking import resolve_uri

    uri = backend_store_uri or resolve_uri(None)
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    click.echo(f"MLflow UI for {uri} at http://{host}:{port}")
    os.execv(sys.executable, args)


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
