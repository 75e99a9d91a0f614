"""Explicit registries of scenarios and strategies.

``@register_strategy("name")`` and ``@register_scenario("name", config=...)`` record a built-in
under a unique name (a duplicate is refused). A user's own class or builder runs without
registering, by ``package.module:Name``. Built-ins are registered when ``strategies`` and
``scenarios`` are imported, which :func:`load_builtins` does lazily.

:func:`strategy_lineage` names the registered strategies a class descends from (itself first when
it is registered), which is how a user's ``module:Class`` subclass of a built-in finds that
built-in's ``configs/<name>.yaml`` (clframe.config.resolve_config).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from clframe.errors import ClframeError, closest

_NAME = re.compile(r"^[a-z][a-z0-9_]*:?$")  # a trailing ':' names a family


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    config_cls: type


class Registry:
    """A name -> (object, config dataclass) table for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, obj: Any, config_cls: type) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case")
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].obj!r}")
        self._entries[name] = Entry(name, obj, config_cls)

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        """Look up a registered name, a ``prefix:`` family, or import ``module:Name``."""
        load_builtins()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            prefix, _, rest = name.partition(":")
            family = self._entries.get(prefix + ":")
            if family is not None:
                return Entry(name, family.obj, family.config_cls)
            return self._import(name)
        raise ClframeError(f"unknown {self.kind} '{name}'{closest(name, self._entries)}; choices: "
                           f"{', '.join(sorted(self._entries))} (or module:Name)")

    def _import(self, dotted: str) -> Entry:
        module_name, _, attr = dotted.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ClframeError(f"cannot import {self.kind} module '{module_name}' ({exc}); check the "
                               f"path is importable (PYTHONPATH) and written as module:Name") from None
        obj = getattr(module, attr, None)
        if obj is None:
            raise ClframeError(f"module '{module_name}' has no {self.kind} '{attr}'")
        config_cls = getattr(obj, "config_cls", None) or getattr(obj, "__clframe_config__", None)
        if config_cls is None:
            raise ClframeError(f"{dotted} is not a clframe {self.kind} (it has no config_cls)")
        return Entry(dotted, obj, config_cls)


STRATEGIES = Registry("strategy")
SCENARIOS = Registry("scenario")


def strategy_lineage(name: str) -> list[str]:
    """Registered strategy names along the class hierarchy of strategy ``name``, nearest first.

    ``l2p`` -> ``["l2p"]``; a user's ``my_mod:MyL2P`` subclassing L2P -> ``["l2p"]``; a class that
    descends from no built-in -> ``[]``.
    """
    cls = STRATEGIES.get(name).obj
    by_class: dict[Any, str] = {}
    for entry in STRATEGIES._entries.values():
        by_class.setdefault(entry.obj, entry.name)
    lineage = [name] if name in STRATEGIES._entries else []
    for ancestor in getattr(cls, "__mro__", ())[1 if lineage else 0:]:
        registered = by_class.get(ancestor)
        if registered is not None and registered not in lineage:
            lineage.append(registered)
    return lineage


def strategy_traits(name: str) -> tuple[tuple[str, ...], str]:
    """(stream kinds it serves, backbone kind) of strategy ``name``, from its class attributes."""
    cls = STRATEGIES.get(name).obj
    return tuple(getattr(cls, "kinds", ())), str(getattr(cls, "backbone_kind", "timm"))


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a Strategy subclass available as ``--strategy name``."""
    def wrap(cls: type) -> type:
        cls.name = name
        STRATEGIES.add(name, cls, cls.config_cls)
        return cls
    return wrap


def register_scenario(name: str, *, config: type) -> Callable[[Callable], Callable]:
    """Function decorator: make a stream builder ``fn(cfg, run) -> Stream`` available by name.

    A name ending in ':' registers a family (``avalanche:`` takes ``avalanche:SplitMNIST``).
    """
    def wrap(fn: Callable) -> Callable:
        fn.__clframe_config__ = config
        SCENARIOS.add(name, fn, config)
        return fn
    return wrap


def load_builtins() -> None:
    importlib.import_module("clframe.strategies")
    importlib.import_module("clframe.scenarios")
