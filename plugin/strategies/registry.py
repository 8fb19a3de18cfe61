"""Strategies by name: the built-ins, ones registered at run time, and third-party strategies
found through the ``prunequant.strategies`` entry-point group (looked up on every call, loaded
only when asked for by name). Built-ins and registered strategies take precedence over an
entry point of the same name."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

from graph_passes.errors import ConfigError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "prunequant.strategies"

# name -> "module:Class" (imported lazily: a strategy module may need torch or optional extras)
_BUILTINS: dict[str, str] = {
    "gradient": "plugin.strategies.gradient:GradientStrategy",
    "uniform": "plugin.strategies.uniform:UniformStrategy",
    "sequential": "plugin.strategies.sequential:SequentialStrategy",
    "bayesian": "plugin.strategies.bayesian:BayesianStrategy",
    "geta": "plugin.strategies.geta:GetaStrategy",
    "rl": "plugin.strategies.rl:RLStrategy",
}
_REGISTERED: dict[str, type] = {}

_REQUIRED = ("name", "summary", "search")


def _check(obj: object, source: str) -> type:
    missing = [a for a in _REQUIRED if not hasattr(obj, a)]
    if missing:
        raise ConfigError(f"{source} is not a prunequant strategy: it lacks {', '.join(missing)} "
                          "(see plugin/strategies/base.py)")
    return obj  # type: ignore[return-value]


def register_strategy(strategy: type, replace: bool = False) -> type:
    """Register a strategy class (also usable as a decorator)."""
    _check(strategy, repr(strategy))
    name = strategy.name
    if not replace and (name in _BUILTINS or name in _REGISTERED):
        raise ConfigError(f"a strategy named {name!r} is already registered; pass replace=True")
    _REGISTERED[name] = strategy
    return strategy


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    """Every strategy name: built-in, registered and installed through entry points."""
    return sorted(set(_BUILTINS) | set(_REGISTERED) | set(_entry_points()))


def get_strategy(name: str) -> type:
    """The strategy class called ``name``; ConfigError listing the known names otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTINS:
        module, _, attr = _BUILTINS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    entry = _entry_points().get(name)
    if entry is None:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())} "
                          "(`prunequant strategies` describes them)")
    try:
        loaded = entry.load()
    except Exception as exc:  # a broken third-party package: say which
        raise ConfigError(f"strategy {name!r} (entry point {entry.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}") from None
    if loaded.name != name:
        logger.warning("entry point %r loads a strategy that calls itself %r", name, loaded.name)
    return _check(loaded, f"entry point {entry.value}")


__all__ = ["ENTRY_POINT_GROUP", "available_strategies", "get_strategy", "register_strategy"]
