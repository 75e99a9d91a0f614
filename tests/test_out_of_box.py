"""Out of the box (issue 19): every registered strategy runs, with no option at all, on every offline
scenario of a kind it serves, logs to MLflow and learns there; a strategy refuses a kind it cannot
serve in one line; the reference settings stay as they are on Split CIFAR-100 and explicit options
always win; a user's ``module:Class`` runs from their own folder, with its built-in parent's defaults.

The strategies come from the registry, so one added later is tested here without a word.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clframe.cli import cli, describe_config
from clframe.config import builtin_config, resolve_config
from clframe.errors import ClframeError
from clframe.registry import SCENARIOS, STRATEGIES, strategy_traits
from clframe.scenarios.base import CLASS_IL, DOMAIN_IL

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"split_digits": CLASS_IL, "rotated_digits": DOMAIN_IL, "corrupted_digits": DOMAIN_IL}

# "Learns" means the final acc_avg clears chance by three standard errors. Each offline stream has 10
# classes, so a guess among them scores 10% (in class-IL a guess among the classes seen: all 10 after the
# last task). The final row is measured on the stream's ~450 test digits, so a chance-level strategy's
# score has a standard error of 100 * sqrt(0.1 * 0.9 / n) ~ 1.4 points, and 3 of them put the bar at
# ~14.2%. Forgetting all but the last task, as plain fine-tuning does in class-IL, scores ~20%: it learned.
CHANCE = 10.0


def learning_bar(scenario: str) -> float:
    from clframe.config import RunConfig

    entry = SCENARIOS.get(scenario)
    n = sum(len(e.test_labels) for e in entry.obj(entry.config_cls(), RunConfig(image_size=16)).experiences)
    return CHANCE + 3 * 100 * (CHANCE / 100 * (1 - CHANCE / 100) / n) ** 0.5


def must_learn(strategy: str) -> bool:
    """Offline there are no CLIP weights, so the CLIP strategies get a random CLIP whose image features
    hardly tell two digits apart (mean cosine ~0.97 between digits' features): zero-shot CLIP trains
    nothing, and CoOp, CoCoOp and DAPL learn a few context vectors that have nothing to separate. They
    must run and log here; they learn with real CLIP weights (tests/test_clip.py checks the machinery)."""
    return strategy_traits(strategy)[1] != "open_clip"


def offline_pairs() -> list[tuple[str, str]]:
    return [(strategy, scenario) for strategy in STRATEGIES.names() for scenario, kind in OFFLINE.items()
            if kind in strategy_traits(strategy)[0]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One working folder for every run: its ./mlflow.db and ./.clframe are the defaults' own."""
    path = tmp_path_factory.mktemp("out_of_box")
    before = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(before)


def clframe(*args: str) -> None:
    """``clframe ARGS`` in this process, as the console script parses it (errors raise)."""
    cli.main(args=list(args), standalone_mode=False, obj={"argv": list(args)})


@pytest.mark.parametrize(("strategy", "scenario"), offline_pairs(), ids=[f"{a}-{b}" for a, b in offline_pairs()])
def test_every_strategy_learns_on_every_offline_scenario_it_serves_with_no_option(strategy, scenario, folder,
                                                                                    capsys):
    if strategy_traits(strategy)[1] == "open_clip" and importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install -e .[clip])")
    clframe("run", "--strategy", strategy, "--scenario", scenario, "--no-progress")
    out = capsys.readouterr().out
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) in experiment", out).group(1)
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{folder}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["strategy"], run.data.tags["scenario"]) == (strategy, scenario)
    assert run.data.params["run.epochs"] == str(builtin_config(scenario)["run"]["epochs"])  # defaults only
    acc_avg = run.data.metrics["acc_avg"]  # the last task's value
    assert f"average accuracy {acc_avg:.2f}" in out
    if must_learn(strategy):
        assert acc_avg > learning_bar(scenario), f"{strategy} on {scenario}: final acc_avg {acc_avg:.2f}"


def test_the_offline_scenarios_are_of_the_kinds_the_pairs_assume():
    from clframe.config import RunConfig

    for scenario, kind in OFFLINE.items():
        entry = SCENARIOS.get(scenario)
        assert entry.obj(entry.config_cls(), RunConfig(image_size=16)).kind == kind


def test_a_strategy_refuses_a_kind_it_cannot_serve_in_one_line_before_any_run(folder):
    runs_before = sorted((folder / ".clframe").rglob("*.pt")) if (folder / ".clframe").exists() else []
    with pytest.raises(ClframeError) as refused:
        clframe("run", "--strategy", "dapl", "--scenario", "split_digits", "--no-progress")
    message = str(refused.value)
    assert "\n" not in message and "dapl needs a domain-IL scenario" in message and "not a class-IL one" in message
    assert (sorted((folder / ".clframe").rglob("*.pt")) if (folder / ".clframe").exists() else []) == runs_before


def test_clframe_list_shows_the_kinds_each_strategy_serves(capsys):
    clframe("list")
    out = capsys.readouterr().out
    section = out[out.index("\nstrategies"):out.index("\nconfigs")]
    lines = {line.split()[0]: line for line in section.splitlines() if line.startswith("  ")}
    assert "domain-IL" in lines["dapl"] and "class-IL" not in lines["dapl"]
    for name in STRATEGIES.names():
        kinds = strategy_traits(name)[0]
        assert ("class-IL" in lines[name]) == (CLASS_IL in kinds) and ("domain-IL" in lines[name]) == (DOMAIN_IL in kinds)


def test_clframe_list_name_prints_every_key_with_its_value_origin_and_help(capsys):
    clframe("list", "l2p")
    out = capsys.readouterr().out
    l2p = STRATEGIES.get("l2p").config_cls
    for f in dataclasses.fields(l2p):
        line = next(line for line in out.splitlines() if line.split()[:1] == [f.name])
        assert f.metadata["help"][:30] in line
    assert re.search(r"^  pool_size +10 +configs/l2p\.yaml +number of prompts", out, re.M)
    assert re.search(r"^  model_kwargs +.*configs/split_digits\.yaml", out, re.M)
    assert re.search(r"^  seed +0 +default +seed", out, re.M)
    assert re.search(r"^  lr +0\.03 +configs/l2p\.yaml", out, re.M)
    text = describe_config("coda_prompt", "rotated_digits", None)
    assert re.search(r"^  pool_size +50 +configs/rotated_digits\.yaml \(strategies\.coda_prompt\)", text, re.M)
    with pytest.raises(ClframeError, match="no strategy or scenario 'l2q' \\(did you mean l2p"):
        describe_config("l2q", None, None)


def resolved(scenario: str, strategy: str, *sets: str, config: str | None = None, **options):
    """The config ``clframe run`` resolves (``options`` are the command-line options, ``sets`` --set)."""
    return resolve_config({"scenario": scenario, "strategy": strategy, **options}, config, list(sets),
                          SCENARIOS.get(scenario).config_cls, STRATEGIES.get(strategy).config_cls)


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_the_reference_settings_apply_unchanged_on_split_cifar100(strategy):
    """Everything a strategy's own file sets reaches the run on Split CIFAR-100, except the model keys
    the scenario picks (ViT-B/16 at 224, or its CLIP counterpart)."""
    assert set(builtin_config("split_cifar100")) <= {"run", "backbones"}  # no per-strategy adjustments there
    config = resolved("split_cifar100", strategy)
    flat, own = config.flatten(), builtin_config(strategy)
    scenario_run = builtin_config("split_cifar100")["run"]
    for section, values in own.items():
        for key, value in values.items():
            if section == "run" and key in scenario_run:
                continue
            assert config.origin(f"{section}.{key}") == f"configs/{strategy}.yaml", (section, key)
            assert flat[f"{section}.{key}"] == (list(value) if isinstance(value, tuple) else value) or \
                str(flat[f"{section}.{key}"]) == str(value), (section, key)
    backbone = strategy_traits(strategy)[1]
    assert config.run.model == ("ViT-B-16" if backbone == "open_clip" else "vit_base_patch16_224")


def test_offline_defaults_fit_the_reference_block_lists_and_give_clip_its_tiny_model():
    for scenario in OFFLINE:
        config = resolved(scenario, "dualprompt")
        assert config.strategy.e_blocks == [2, 3, 4] and config.run.model_kwargs["depth"] >= 5
        assert resolved(scenario, "coop").run.model == "clip_tiny"
        assert resolved(scenario, "coop").origin("run.model") == f"configs/{scenario}.yaml (backbones.open_clip)"


def test_explicit_options_always_win(tmp_path):
    user_file = tmp_path / "mine.yaml"
    user_file.write_text("coda_prompt: {pool_size: 20}\nrun: {epochs: 2}\n")
    config = resolved("split_digits", "coda_prompt", "lr=0.2", config=str(user_file), model="vit_small_patch16_224")
    assert (config.strategy.pool_size, config.run.epochs, config.run.lr, config.run.model) == \
        (20, 2, 0.2, "vit_small_patch16_224")
    assert [config.origin(k) for k in ("coda_prompt.pool_size", "run.lr", "run.model")] == \
        [str(user_file), "--set", "command line"]
    assert resolved("rotated_digits", "coda_prompt", "coda_prompt.pool_size=10").strategy.pool_size == 10
    assert resolved("split_digits", "coop", model="ViT-B-16").run.model == "ViT-B-16"


MY_STRATEGY = """
    from dataclasses import dataclass

    from clframe.strategies.finetune import Finetune, FinetuneConfig


    @dataclass
    class MyConfig(FinetuneConfig):
        pass


    class MyFinetune(Finetune):
        config_cls = MyConfig
"""


def test_a_subclass_of_a_built_in_takes_its_config_file_and_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_finetune.py").write_text(textwrap.dedent(MY_STRATEGY))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = resolved("split_digits", "my_finetune:MyFinetune")
    assert config.run.lr == builtin_config("finetune")["run"]["lr"] == 0.0001
    assert config.strategy.train_mask == "seen" and config.origin("run.lr") == "configs/finetune.yaml"
    assert config.notes == ["my_finetune:MyFinetune takes the defaults of configs/finetune.yaml (it subclasses "
                            "the built-in strategy finetune)"]
    cosine = resolved("split_digits", "examples.cosine_linear:CosineLinear")
    assert cosine.strategy.train_mask == "current" and cosine.strategy.scale == 16.0  # linear.yaml's mask
    assert cosine.origin("examples.cosine_linear:CosineLinear.train_mask") == "configs/linear.yaml"


USER_STRATEGY = """
    from clframe.strategies.linear import Linear


    class MyStrat(Linear):
        '''A user's own strategy, in the folder they run clframe from.'''
"""


def test_module_class_runs_from_the_users_folder_and_the_readme_example_from_the_repo_root(tmp_path):
    """The console script as a user starts it: no PYTHONPATH, the working directory decides. Both
    processes run at once (each is mostly start-up)."""
    mine = tmp_path / "mystrats"
    mine.mkdir()
    (mine / "my_strat.py").write_text(textwrap.dedent(USER_STRATEGY))
    script = Path(sys.executable).with_name("clframe")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    quick = ["--no-progress", "--epochs", "1", "--set", "split_digits.n_tasks=1"]
    commands = {
        mine: [str(script), "run", "--strategy", "my_strat:MyStrat", *quick],  # its ./mlflow.db, ./.clframe
        REPO: [str(script), "run", "--strategy", "examples.cosine_linear:CosineLinear", "--set",
               "examples.cosine_linear:CosineLinear.scale=10", *quick, "--tracking-uri",
               f"sqlite:///{tmp_path}/mlflow.db", "--set", f"checkpoint_dir={tmp_path}/checkpoints"],
    }
    processes = {cwd: subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for cwd, command in commands.items()}
    outputs = {cwd: process.communicate(timeout=300) for cwd, process in processes.items()}
    for cwd, (out, err) in outputs.items():
        assert processes[cwd].returncode == 0, err[-3000:]
        assert "average accuracy" in out
    assert "my_strat:MyStrat takes the defaults of configs/linear.yaml" in outputs[mine][1]
    assert "examples.cosine_linear:CosineLinear takes the defaults of configs/linear.yaml" in outputs[REPO][1]


def test_start_up_imports_nothing_heavy_where_nothing_needs_it():
    """``clframe --help`` / ``run --help`` / ``list``'s parser import no torch, mlflow, timm, open_clip,
    matplotlib, sklearn or avalanche (issue 19, item 12)."""
    probe = ("import sys\nfrom clframe.cli import cli\n"
             "try:\n    cli.main(args=['run', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
             "heavy = ('torch', 'mlflow', 'timm', 'open_clip', 'matplotlib', 'sklearn', 'avalanche', 'faiss')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
