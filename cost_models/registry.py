"""Cost models by name: the built-ins, models registered at run time, and third-party models
found through the ``prunequant.cost_models`` entry point group.

Precedence: built-ins and models registered with :func:`register_cost_model` come first; an
entry point whose name is already taken is ignored with a warning. Entry points are looked up
on every call (no cache) and loaded only when asked for by name.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from graph_passes.errors import CostModelError

from . import bops, horowitz_energy, mpic, mpic_energy, ne16, size
from ._math import Scalar
from .base import CostFunction, CostModel
from .spec import CostInputs, LayerSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "prunequant.cost_models"

BUILTIN_COST_MODELS: tuple[CostModel, ...] = (
    size.COST_MODEL,
    bops.COST_MODEL,
    mpic.COST_MODEL,
    mpic_energy.COST_MODEL,
    ne16.COST_MODEL,
    horowitz_energy.COST_MODEL,
)

_REGISTRY: dict[str, CostModel] = {model.name: model for model in BUILTIN_COST_MODELS}
_WARNED_SHADOWED: set[str] = set()


def as_cost_model(obj: Any, source: str = "object") -> CostModel:
    """Wrap anything with ``name``, ``unit`` and ``cost(spec, inputs)`` as a :class:`CostModel`."""
    if isinstance(obj, CostModel):
        return obj
    missing = [attr for attr in ("name", "unit", "cost") if not hasattr(obj, attr)]
    if missing:
        raise CostModelError(
            f"{source} is not a cost model: it lacks {', '.join(missing)}; "
            f"give it name (str), unit (str) and cost(spec, inputs), or use cost_models.CostModel"
        )
    return CostModel(obj.name, obj.unit, obj.cost, getattr(obj, "description", "") or "")


def register_cost_model(
    model: Any = None,
    *,
    name: str | None = None,
    unit: str | None = None,
    description: str = "",
    replace: bool = False,
) -> Any:
    """Register a cost model, as a function or as a decorator.

    ``register_cost_model(model)`` registers a :class:`CostModel` (or any object with ``name``,
    ``unit`` and ``cost``) and returns the :class:`CostModel`.
    ``@register_cost_model(name="my_chip", unit="cycles")`` on a ``cost(spec, inputs)`` function
    registers it and returns the function unchanged. A taken name is an error unless
    ``replace=True``.
    """
    if model is not None:
        if name is not None or unit is not None:
            raise CostModelError(
                "register_cost_model: pass either a model or name=/unit=, not both"
            )
        return _register(as_cost_model(model, "register_cost_model argument"), replace)
    if name is None or unit is None:
        raise CostModelError("register_cost_model: as a decorator it needs name= and unit=")

    def decorator(function: CostFunction) -> CostFunction:
        _register(CostModel(name, unit, function, description), replace)
        return function

    return decorator


def _register(model: CostModel, replace: bool) -> CostModel:
    if model.name in _REGISTRY and not replace:
        raise CostModelError(
            f"a cost model named {model.name!r} is already registered; "
            f"pick another name or pass replace=True"
        )
    _REGISTRY[model.name] = model
    logger.debug("registered cost model %r (%s)", model.name, model.unit)
    return model


def unregister_cost_model(name: str) -> None:
    """Remove a model registered at run time (built-ins included); unknown names are an error."""
    if name not in _REGISTRY:
        raise CostModelError(f"no registered cost model named {name!r} to remove")
    del _REGISTRY[name]


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the group whose names are not taken by registered models."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _REGISTRY:
            if entry_point.name not in _WARNED_SHADOWED:
                _WARNED_SHADOWED.add(entry_point.name)
                logger.warning(
                    "cost model entry point %r (%s) ignored: the name is already registered",
                    entry_point.name,
                    entry_point.value,
                )
            continue
        found.setdefault(entry_point.name, entry_point)
    return found


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> CostModel:
    source = f"cost model entry point {entry_point.name!r} ({entry_point.value})"
    try:
        loaded = entry_point.load()
    except Exception as exc:  # a broken plugin must not look like an unknown name
        raise CostModelError(
            f"{source} failed to load: {type(exc).__name__}: {exc}; fix or uninstall its package"
        ) from exc
    model = as_cost_model(loaded, source)
    if model.name != entry_point.name:
        raise CostModelError(
            f"{source} loads a cost model named {model.name!r}; make the two names equal"
        )
    logger.debug("loaded %s", source)
    return model


def available_cost_models() -> list[str]:
    """Sorted names of every cost model: registered ones and entry points (not loaded)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_cost_model(name: str) -> CostModel:
    """The cost model called ``name``; :class:`CostModelError` listing the names if unknown."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_points = _entry_points()
    if name in entry_points:
        return _load_entry_point(entry_points[name])
    raise CostModelError(
        f"unknown cost model {name!r}; available: {', '.join(available_cost_models())}"
    )


def evaluate_cost_models(
    layers: Iterable[tuple[LayerSpec, CostInputs]], names: Sequence[str] | None = None
) -> dict[str, Scalar]:
    """``{name: model total}`` for the named cost models (default: every available one)."""
    layers = list(layers)
    selected = available_cost_models() if names is None else list(names)
    return {name: get_cost_model(name).total(layers) for name in selected}

