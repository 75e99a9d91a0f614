"""Typed configuration: dataclasses filled from YAML defaults, a user file, CLI options and ``--set``.

Every section is a dataclass whose fields carry a default and a one-line ``help`` in their
metadata (and optionally ``choices`` or a ``min``). Values from YAML or ``--set`` are coerced to
the field's annotated type here, so a typo or a wrong type fails before any work starts, with
one line that lists what is valid. ``flatten()`` of the resolved config is what MLflow logs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clframe.errors import ClframeError, closest


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so ``amp: off`` stays the string 'off'."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           factory: Any = None, max: float | None = None, nonempty: bool = False) -> Any:
    """A dataclass field with the metadata the config machinery understands (``nonempty``: a
    string that must hold more than blanks)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "nonempty": nonempty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Settings of one run that every scenario and strategy shares (the ``run`` section)."""

    scenario: str = option("split_digits", "scenario name (clframe list) or module:function")
    strategy: str = option("linear", "strategy name (clframe list) or module:Class")
    model: str = option("vit_tiny_patch16_224", "timm model name")
    model_kwargs: dict = option(None, "extra keyword arguments for timm.create_model", factory=dict)
    pretrained: bool = option(False, "load timm's pretrained weights (needs network or the HF cache)")
    weights: str | None = option(None, "local checkpoint file (.pth/.bin/.safetensors) for the backbone")
    image_size: int | None = option(None, "input resolution; None means the model's default", min=8)
    normalize: bool = option(True, "normalise inputs with the model's mean/std (reference L2P does not)")
    epochs: int = option(1, "training epochs per task", min=0)
    batch_size: int = option(32, "training batch size", min=1)
    eval_batch_size: int = option(256, "evaluation batch size", min=1)
    lr: float = option(0.01, "learning rate (before batch scaling)", min=0.0)
    lr_batch_scale: bool = option(False, "use lr x batch_size / 256, as the L2P reference does")
    optimizer: str = option("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    momentum: float = option(0.9, "SGD momentum", min=0.0)
    weight_decay: float = option(0.0, "weight decay", min=0.0)
    grad_clip: float = option(1.0, "clip the global grad norm to this; 0 disables", min=0.0)
    train_aug: bool = option(True, "random-resized-crop + horizontal flip at training")
    crop_scale_min: float = option(0.08, "smallest crop area of the training random-resized-crop", min=0.01)
    test_crop: float = option(1.0, "test: resize to size/test_crop, keep the centre (0.875 = Resize 256 + "
                              "CenterCrop 224); 1 = plain resize", min=0.1)
    device: str = option("auto", "where to run", choices=("auto", "cpu", "cuda"))
    cpu_threads: int | None = option(None, "threads torch computes with on the CPU; None = torch's default (one per "
                                     "core). A small model runs faster on one (the offline scenarios set 1)", min=1)
    amp: str = option("auto", "mixed precision: bf16 autocast on CUDA when auto", choices=("auto", "bf16", "off"))
    frozen_bf16: bool = option(True, "under bf16 autocast, hold frozen Linear/Conv weights in bf16 (same "
                               "products, fewer casts)")
    compile: str = option("auto", "torch.compile the backbone's blocks: auto = on CUDA (+28% L2P train img/s "
                          "on an H100), on, off", choices=("auto", "on", "off"))
    cuda_graph: str = option("auto", "capture each task's training step (forward, backward, clipping, update) as "
                             "one CUDA graph and replay it: auto = on CUDA, one process, strategies that allow "
                             "it, batches below 128 (where it pays); on (any batch); off", choices=("auto", "on", "off"))
    seed: int = option(0, "seed for class order, initialisation, batches and augmentation", min=0, max=2**32 - 1)
    data_root: str = option("./data", "folder holding the data sets (e.g. cifar-100-python/)")
    tracking_uri: str | None = option(None, "MLflow tracking URI; None means sqlite:///mlflow.db here")
    experiment: str = option("clframe", "MLflow experiment name", nonempty=True)
    run_name: str | None = option(None, "MLflow run name; None means <strategy>-<scenario>-<time>")
    checkpoint_dir: str = option(".clframe/checkpoints", "where task-boundary checkpoints go")
    joint: bool = option(False, "train on the union of all tasks as one task (upper bound)")
    eval_classes: str = option("seen", "class-IL evaluation: argmax over the classes seen so far, or over every "
                               "class of the stream (l2p-pytorch)", choices=("seen", "all"))
    class_order: str | list[int] = option("seed", "class-IL class order: seed (permutation by --seed), pycil "
                                          "(PyCIL/PILOT: np.random.seed(1993)), l2p (l2p-pytorch: 0..n-1), a list "
                                          "[3, 1, ...] or a file holding one")
    system_metrics: bool = option(True, "log MLflow system metrics (CPU, memory, GPU) every 10 s where psutil "
                                  "(and pynvml for GPUs) are installed")
    progress: bool = option(True, "show a progress bar per task")
    keep_full_checkpoint: bool = option(False, "keep the optimizer state in the last task's checkpoint (default: "
                                        "trainable state only once the run is done; it is the one copy)")


# The run keys that say where and how fast a run goes, never what it computes: they may differ between a
# run and its resumption (clframe.runner), and they never split a seed group in clframe compare
# (clframe.runsets.NEUTRAL adds the seed and the names of where results and data live).
RESUME_FREE_KEYS = frozenset({"run.progress", "run.tracking_uri", "run.checkpoint_dir", "run.eval_batch_size",
                              "run.run_name", "run.device", "run.compile", "run.frozen_bf16", "run.cuda_graph",
                              "run.keep_full_checkpoint", "run.system_metrics", "run.cpu_threads"})


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise a ClframeError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ClframeError as exc:
                errors.append(str(exc))
        raise ClframeError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ClframeError(f"config key '{key}' wants true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ClframeError(f"config key '{key}' wants an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ClframeError(f"config key '{key}' wants an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ClframeError(f"config key '{key}' wants an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ClframeError(f"config key '{key}' wants a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ClframeError(f"config key '{key}' wants a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ClframeError(f"config key '{key}' wants a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ClframeError(f"config key '{key}' wants a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml_load(value)
        if not isinstance(value, dict):
            raise ClframeError(f"config key '{key}' wants a mapping like {{a: 1}}, got {value!r}")
        return dict(value)
    if tp is list or origin in (list, tuple):
        if isinstance(value, str):
            value = yaml_load(value)
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ClframeError(f"config key '{key}' wants a list like [1, 2], got {value!r}")
        args = typing.get_args(tp)
        if args:  # list[X] or tuple[X, ...]
            value = [_coerce(v, args[0], key) for v in value]
        return tuple(value) if origin is tuple else list(value)
    return value


def _check(instance: Any, section: str) -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ClframeError(f"config key '{section}.{f.name}' must be one of "
                               f"{', '.join(map(str, choices))}; got {value!r}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if low is not None and value is not None and value < low:
            raise ClframeError(f"config key '{section}.{f.name}' must be >= {low}; got {value!r}")
        if high is not None and value is not None and value > high:
            raise ClframeError(f"config key '{section}.{f.name}' must be <= {high}; got {value!r}")
        if f.metadata.get("nonempty") and (value is None or not str(value).strip()):
            raise ClframeError(f"config key '{section}.{f.name}' must not be empty; got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # a default or a value set in code
            raise ClframeError(f"config key '{section}.{f.name}' wants a finite number, got {value!r}")


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, coercing types and checking choices."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ClframeError(f"unknown config key '{section}.{key}'{closest(key, names)}; "
                               f"valid keys: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        instance = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ClframeError(f"config section '{section}': {exc}") from None
    _check(instance, section)
    return instance


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set key=value`` (value read as YAML, so 3, 0.1, true, [1, 2] keep their type)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(c.isspace() for c in key):
        raise ClframeError(f"malformed --set {item!r}: write --set key=value, e.g. --set epochs=2 "
                           f"or --set l2p.pool_size=20")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: Path | str, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ClframeError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        data = yaml_load(text) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ClframeError(f"{what} {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ClframeError(f"{what} {path} must hold a mapping of sections (run:, <strategy>:, ...)")
    return data


def builtin_config(name: str) -> dict[str, Any]:
    """The packaged ``configs/<name>.yaml`` (empty when there is none); works after a wheel install."""
    resource = resources.files("clframe.configs").joinpath(f"{name}.yaml")
    if not resource.is_file():
        return {}
    with resources.as_file(resource) as path:
        return load_yaml(path, "built-in config")


def builtin_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("clframe.configs").iterdir() if p.name.endswith(".yaml"))


DEFAULT_ORIGIN = "default"  # a value nobody set: the dataclass field's default


@dataclass
class ResolvedConfig:
    """The run section plus the chosen scenario's and strategy's sections.

    ``origins`` maps ``section.key`` to where its value came from (a config file, the command line,
    ``--set``; absent = the dataclass default); ``notes`` are lines worth telling the user, e.g.
    that a subclass took the defaults of the built-in it extends.
    """

    run: RunConfig
    scenario: Any
    strategy: Any
    origins: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def flatten(self) -> dict[str, Any]:
        flat = {}
        for section, obj in (("run", self.run), (self.run.scenario, self.scenario),
                             (self.run.strategy, self.strategy)):
            for key, value in dataclasses.asdict(obj).items():
                flat[f"{section}.{key}"] = value
        return flat

    def origin(self, key: str) -> str:
        return self.origins.get(key, DEFAULT_ORIGIN)

    def to_yaml(self) -> str:
        data = {"run": dataclasses.asdict(self.run),
                self.run.scenario: dataclasses.asdict(self.scenario),
                self.run.strategy: dataclasses.asdict(self.strategy)}
        return yaml.safe_dump(data, sort_keys=False)


@dataclass
class _Layers:
    """Sections merged so far, and where each key's value came from."""

    sections: set[str]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def merge(self, layer: dict[str, Any], origin: str) -> None:
        for section, values in layer.items():
            if section not in self.sections:
                raise ClframeError(f"unknown config section '{section}' in {origin}; valid sections: "
                                   f"{', '.join(sorted(self.sections))}")
            if not isinstance(values, dict):
                raise ClframeError(f"section '{section}' in {origin} must be a mapping")
            self.set(section, values, origin)

    def set(self, section: str, values: dict[str, Any], origin: str) -> None:
        self.values.setdefault(section, {}).update(values)
        self.origins.update({f"{section}.{key}": origin for key in values})


# Sections of a scenario's config file that apply to some strategies only (see builtin_layers).
BACKBONES, STRATEGIES = "backbones", "strategies"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClframeError(f"{where} must be a mapping")
    return value


def _renamed(layer: dict[str, Any], old: str, new: str, keys: set[str]) -> dict[str, Any]:
    """``layer`` with section ``old`` called ``new`` and cut to ``keys``, the fields of the subclass's
    config (which may drop some of the built-in's)."""
    if old == new or old not in layer:
        return layer
    out = {section: values for section, values in layer.items() if section != old}
    out[new] = {k: v for k, v in _mapping(layer[old], f"section '{old}'").items() if k in keys}
    return out


def builtin_layers(scenario: str, strategy: str, strategy_config_cls: type) -> tuple[list[tuple[dict, str]], list[str]]:
    """The built-in config layers of a (scenario, strategy) pair, lowest first, and notes for the user.

    1. ``configs/<s>.yaml`` of the strategy, or, for a class that is not registered under its own
       file (a user's ``module:Class``), of the nearest registered strategy it subclasses, its
       section renamed to the subclass's;
    2. the scenario's file: its ``run:`` and ``<scenario>:`` sections, for every strategy;
    3. its ``backbones: {<kind>: {run keys}}`` for strategies whose ``backbone_kind`` is that kind
       (``open_clip``: the CLIP strategies take the CLIP counterpart of the scenario's timm model);
    4. its ``strategies: {<name>: {run: ..., <name>: ...}}`` for that strategy or a subclass of it
       (settings a strategy needs on this data, e.g. a learning rate that moves a random backbone).
    """
    from clframe.registry import strategy_lineage, strategy_traits

    lineage = strategy_lineage(strategy) or [strategy]
    keys = {f.name for f in dataclasses.fields(strategy_config_cls)}
    layers, notes = [], []
    source = next((name for name in lineage if builtin_config(name)), None)
    if source is not None:
        layers.append((_renamed(builtin_config(source), source, strategy, keys), f"configs/{source}.yaml"))
        if source != strategy:
            notes.append(f"{strategy} takes the defaults of configs/{source}.yaml (it subclasses the built-in "
                         f"strategy {source})")
    own = builtin_config(scenario)
    where = f"configs/{scenario}.yaml"
    layers.append(({k: v for k, v in own.items() if k not in (BACKBONES, STRATEGIES)}, where))
    backbone = strategy_traits(strategy)[1]
    run_keys = _mapping(_mapping(own.get(BACKBONES), f"{where}: {BACKBONES}").get(backbone), f"{where}: "
                        f"{BACKBONES}.{backbone}")
    if run_keys:
        layers.append(({"run": run_keys}, f"{where} ({BACKBONES}.{backbone})"))
    per_strategy = _mapping(own.get(STRATEGIES), f"{where}: {STRATEGIES}")
    name = next((name for name in lineage if name in per_strategy), None)
    if name is not None:
        layer = _mapping(per_strategy[name], f"{where}: {STRATEGIES}.{name}")
        layers.append((_renamed(layer, name, strategy, keys), f"{where} ({STRATEGIES}.{name})"))
    return layers, notes


def resolve_config(cli_values: dict[str, Any], config_file: str | None, sets: list[str],
                   scenario_config_cls: type, strategy_config_cls: type,
                   base: dict[str, Any] | None = None) -> ResolvedConfig:
    """Merge, lowest first: dataclass defaults, the built-in files (:func:`builtin_layers`: the
    strategy's, then the scenario's, with its sections for the strategy's backbone kind and for the
    strategy itself), ``base`` (a resumed run's saved config), the ``--config`` file, explicit CLI
    options, then ``--set`` overrides.

    The scenario's file comes after the strategy's because it knows the data's compute budget
    (e.g. the offline digits scenarios pick a small random model whatever the strategy); whatever
    the user writes comes after both, so explicit options always win.
    """
    scenario, strategy = cli_values["scenario"], cli_values["strategy"]
    layers = _Layers({"run", scenario, strategy})
    builtin, notes = builtin_layers(scenario, strategy, strategy_config_cls)
    for layer, origin in builtin:
        layers.merge(layer, origin)
    if base:
        layers.merge(base, "the checkpoint's config")
    if config_file:
        layers.merge(load_yaml(config_file, "config file"), config_file)
    layers.set("run", {k: v for k, v in cli_values.items() if v is not None}, "command line")
    for item in sets:
        key, value = parse_set(item)
        section, dot, name = key.rpartition(".")
        section = section if dot else "run"
        if section not in layers.sections:
            raise ClframeError(f"--set {key}: unknown section '{section}'; use run.<key>, "
                               f"{scenario}.<key> or {strategy}.<key>")
        layers.set(section, {name: value}, "--set")
    merged = layers.values
    run_values = merged.get("run", {})
    for fixed in ("scenario", "strategy"):
        if run_values.get(fixed, cli_values[fixed]) != cli_values[fixed]:
            raise ClframeError(f"choose the {fixed} with --{fixed}, not in a config file or --set")
    run = build_section(RunConfig, run_values, "run")
    return ResolvedConfig(
        run=run,
        scenario=build_section(scenario_config_cls, merged.get(scenario, {}), scenario),
        strategy=build_section(strategy_config_cls, merged.get(strategy, {}), strategy),
        origins=dict(layers.origins),
        notes=notes,
    )
