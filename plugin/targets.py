"""Cost targets (``--target``): parsing and formatting of budgets.

See plugin/budget.py for how a budget steers a search.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from cost_models import get_cost_model
from graph_passes.errors import CostModelError

_BIT_UNITS = {"bit": 1, "bits": 1, "b": 1, "kbit": 1000, "B": 8, "kB": 8000, "KB": 8000, "KiB": 8192,
              "MB": 8_000_000, "MiB": 8 * 1024 * 1024}
_TARGET = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*=\s*([0-9.eE+\-]+)\s*([A-Za-z%]*)\s*$")
_EXAMPLES = "size=0.25, size=25%, size=40KB or mpic=1.2e6"


@dataclass(frozen=True)
class Budget:
    """A parsed target: ``value`` is relative (fraction of the 8-bit cost) or absolute in the
    cost model's unit (bits for ``size``)."""

    cost_model: str
    value: float
    relative: bool
    text: str

    def absolute(self, cost_before: float) -> float:
        return self.value * cost_before if self.relative else self.value


def parse_target(text: str) -> Budget:
    """Parse ``NAME=VALUE[UNIT]``; :class:`CostModelError` for malformed text or unknown models."""
    match = _TARGET.match(text or "")
    if match is None:
        raise CostModelError(f"malformed budget {text!r}: expected NAME=VALUE, e.g. {_EXAMPLES}")
    name, number, unit = match.groups()
    model = get_cost_model(name)  # unknown names raise CostModelError listing the known ones
    try:
        value = float(number)
    except ValueError:
        raise CostModelError(f"malformed budget {text!r}: {number!r} is not a number; e.g. {_EXAMPLES}") from None
    if not math.isfinite(value) or value <= 0:
        raise CostModelError(f"budget {text!r}: the value must be a finite number > 0")
    if unit == "%":
        return _relative(name, value / 100, text)
    if unit in ("x", "X"):
        return _relative(name, value, text)
    if unit:
        if model.unit != "bit" or unit not in _BIT_UNITS:
            allowed = ", ".join(_BIT_UNITS) if model.unit == "bit" else "none (the unit is " + model.unit + ")"
            raise CostModelError(f"budget {text!r}: unknown unit {unit!r} for cost model {name!r}; "
                                 f"units: {allowed}, or % for a fraction of the 8-bit model")
        return Budget(name, value * _BIT_UNITS[unit], False, text)
    if value <= 1:
        return _relative(name, value, text)
    return Budget(name, value * 8 if model.unit == "bit" else value, False, text)


def _relative(name: str, fraction: float, text: str) -> Budget:
    if not 0 < fraction <= 1:
        raise CostModelError(f"budget {text!r}: a relative budget must be in (0, 1] of the 8-bit model")
    return Budget(name, fraction, True, text)


def format_cost(name: str, value: float) -> str:
    """``12.3 KB`` for size (bits in), ``1.2e+06 cycles`` otherwise."""
    unit = get_cost_model(name).unit
    if unit == "bit":
        return f"{value / 8000:.2f} KB" if value >= 8000 else f"{value / 8:.0f} B"
    return f"{value:.4g} {unit}"
