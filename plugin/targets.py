"""Cost targets (``--target``): parsing and formatting of budgets.

A budget says unambiguously whether it is relative or absolute:

* ``NAME=VALUE%``: relative, a fraction of the same model with every weight and activation at
  8 bits and nothing pruned (``size=35%``); 0 < VALUE <= 100.
* ``NAME=VALUE UNIT``: absolute, in a unit of the cost model ``NAME``
  (``cost_models.get_cost_model(NAME).unit`` or one of its aliases below): ``size=40KB``,
  ``size=39KiB``, ``size=320000bit``, ``mpic=1.2e6cycles``, ``mpic_energy=350uJ``,
  ``bops=2e9BOPs``. Spaces around the ``=`` and before the unit are allowed.

A bare number (``size=0.25``, ``size=40000``, ``mpic=1.2e6``) or a multiplier (``size=2x``) is
refused with a :class:`CostModelError` that shows the new form. See plugin/budget.py for how a
budget steers a search.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from cost_models import get_cost_model
from graph_passes.errors import CostModelError

#: The default budget when neither a lambda nor a target is given: this share of the all-8-bit
#: model's cost, measured in the run's ``--cost`` model.
DEFAULT_PERCENT = 35

# per declared unit: accepted spellings -> factor to the declared unit
_UNIT_ALIASES: dict[str, dict[str, float]] = {
    "bit": {"bit": 1, "bits": 1, "kbit": 1e3, "Mbit": 1e6, "B": 8, "byte": 8, "bytes": 8,
            "kB": 8e3, "KB": 8e3, "KiB": 8 * 1024, "MB": 8e6, "MiB": 8 * 1024 * 1024},
    "cycles": {"cycles": 1, "cycle": 1, "kcycles": 1e3, "Mcycles": 1e6, "Gcycles": 1e9},
    "uJ": {"uJ": 1, "µJ": 1, "nJ": 1e-3, "mJ": 1e3, "J": 1e6},
    "bit-op": {"bit-op": 1, "bit-ops": 1, "BOP": 1, "BOPs": 1, "bops": 1, "kBOPs": 1e3, "MBOPs": 1e6,
               "GBOPs": 1e9},
}
# an absolute example per declared unit, for error messages
_EXAMPLE_ABSOLUTE = {"bit": "40KB", "cycles": "1.2e6cycles", "uJ": "350uJ", "bit-op": "2e9BOPs"}

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TARGET = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*=\s*(" + _NUMBER + r")\s*(\S*?)\s*$")
_EXAMPLES = "size=35%, size=40KB, mpic=1.2e6cycles"


@dataclass(frozen=True)
class Budget:
    """A parsed target: ``value`` is relative (a fraction of the 8-bit cost, 0.35 for ``35%``)
    or absolute in the cost model's declared unit (bits for ``size``)."""

    cost_model: str
    value: float
    relative: bool
    text: str

    def absolute(self, cost_before: float) -> float:
        return self.value * cost_before if self.relative else self.value


def default_target(cost: str) -> str:
    """The budget used when neither a lambda nor a target is given, e.g. ``"mpic=35%"``."""
    return f"{cost}={DEFAULT_PERCENT}%"


def unit_aliases(declared: str) -> dict[str, float]:
    """The unit spellings a budget may use for a cost model declaring ``declared``, with each
    one's factor to the declared unit (a third-party unit: itself, and its plural)."""
    if declared in _UNIT_ALIASES:
        return dict(_UNIT_ALIASES[declared])
    aliases = {declared: 1.0}
    if not declared.endswith("s"):
        aliases[declared + "s"] = 1.0
    return aliases


def _example_absolute(declared: str) -> str:
    return _EXAMPLE_ABSOLUTE.get(declared, f"1000{declared}")


def _what(name: str, declared: str) -> str:
    return "an absolute size" if declared == "bit" else f"an absolute {name} cost (in {declared})"


def _new_form(name: str, declared: str, value: float | None, number: str = "") -> str:
    """'use size=25% for a fraction of the all-8-bit model, or size=40KB for an absolute size'."""
    relative = f"{value * 100:g}%" if value is not None and 0 < value <= 1 else f"{DEFAULT_PERCENT}%"
    if value is not None and value > 1:
        if declared == "bit":  # the old grammar read a bare size as bytes
            absolute = f"{number}B or {name}={value / 1000:g}KB"
        else:
            absolute = f"{number}{declared}"
    else:
        absolute = _example_absolute(declared)
    return (f"use {name}={relative} for a fraction of the all-8-bit model, or {name}={absolute} "
            f"for {_what(name, declared)}")


def parse_target(text: str) -> Budget:
    """Parse ``NAME=VALUE%`` or ``NAME=VALUE UNIT``; :class:`CostModelError` for malformed or
    ambiguous text, unknown cost models and units."""
    match = _TARGET.match(text or "")
    if match is None:
        raise CostModelError(f"malformed budget {text!r}: expected NAME=VALUE% or NAME=VALUE UNIT, "
                             f"e.g. {_EXAMPLES}")
    name, number, unit = match.groups()
    model = get_cost_model(name)  # unknown names raise CostModelError listing the known ones
    declared = model.unit
    value = float(number)
    if not math.isfinite(value) or value <= 0:
        raise CostModelError(f"budget {text!r}: the value must be a finite number > 0; e.g. {_EXAMPLES}")
    if unit == "%":
        fraction = value / 100
        if fraction > 1:
            raise CostModelError(f"budget {text!r}: a relative budget must be in (0%, 100%] of the "
                                 f"all-8-bit model; {_new_form(name, declared, None)}")
        return Budget(name, fraction, True, text)
    if not unit:
        raise CostModelError(f"budget {text!r} is ambiguous (no unit): {_new_form(name, declared, value, number)}")
    if unit in ("x", "X"):
        raise CostModelError(f"budget {text!r}: multipliers are not budgets; "
                             f"{_new_form(name, declared, value, number)}")
    aliases = unit_aliases(declared)
    if unit not in aliases:
        raise CostModelError(f"budget {text!r}: unknown unit {unit!r} for cost model {name!r} (which counts "
                             f"{declared}); units: {', '.join(aliases)}, or % for a fraction of the "
                             f"all-8-bit model; e.g. {name}={_example_absolute(declared)}")
    return Budget(name, value * aliases[unit], False, text)


def format_cost(name: str, value: float) -> str:
    """``12.3 KB`` for size (bits in), ``1.2e+06 cycles`` otherwise."""
    unit = get_cost_model(name).unit
    if unit == "bit":
        return f"{value / 8000:.2f} KB" if value >= 8000 else f"{value / 8:.0f} B"
    return f"{value:.4g} {unit}"


__all__ = ["DEFAULT_PERCENT", "Budget", "default_target", "format_cost", "parse_target", "unit_aliases"]
