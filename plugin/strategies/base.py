"""The strategy seam: one protocol every search method implements.

A strategy receives a :class:`~plugin.strategies.problem.Problem` (the prepared ONNX model, its
torch-free search space, the training and held-out data and an engine factory) and returns a
:class:`StrategyResult`: the :class:`~plugin.plan.CompressionPlan` plus a history of what was
tried. Quantization-aware fine-tuning, export, the gate and the atomic write are shared by every
strategy (``plugin.api.compress``).

A new strategy is one module: a class with ``name``, ``summary``, ``options`` and ``search``,
registered with :func:`plugin.strategies.register_strategy` or through the entry-point group
``prunequant.strategies`` of an installed package::

    [project.entry-points."prunequant.strategies"]
    my_method = "my_package.module:MyStrategy"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, runtime_checkable

from graph_passes.errors import ConfigError

if TYPE_CHECKING:
    from plugin.plan import CompressionPlan

    from .problem import Problem


@dataclass(frozen=True)
class StrategyOption:
    """One strategy-specific option, set with ``--strategy-option NAME=VALUE`` (``-S``)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None  # the allowed values of a str option, checked before any work

    def parse(self, text: Any, strategy: str) -> Any:
        value = self._parse(text, strategy)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"--strategy-option {self.name}={text!r}: strategy {strategy!r} accepts "
                              f"{' | '.join(self.choices)} ({self.help})")
        return value

    def _parse(self, text: Any, strategy: str) -> Any:
        if not isinstance(text, str):
            return self.type(text)
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                return lowered in ("1", "true", "yes", "on")
            return self.type(text)
        except ValueError:
            raise ConfigError(f"--strategy-option {self.name}={text!r}: strategy {strategy!r} expects "
                              f"a {self.type.__name__} ({self.help})") from None


@dataclass
class StrategyResult:
    """What a search returns.

    ``plan``: the discrete plan (costs included). ``history``: one JSON-able dict per thing tried
    (epoch, trial, episode...), kept in the report. ``engine``: the fake-quantized model whose
    weights QAT should start from (None: start from the original weights). ``epochs_used``: search
    epochs actually spent (a budget met early leaves the rest to QAT). ``options``: the options as
    the strategy resolved them (a default that depends on the run, e.g. the gradient strategy's
    recipe), recorded in the plan and report instead of the given ones; None: as given.
    """

    plan: CompressionPlan
    history: list[dict[str, Any]] = field(default_factory=list)
    engine: Any = None
    epochs_used: int | None = None
    options: dict[str, Any] | None = None


@runtime_checkable
class Strategy(Protocol):
    """The protocol. ``steerable``: whether the strategy follows a ``--target`` budget (a strategy
    that cannot says so in one line when a target is given). An optional ClassVar
    ``default_target`` (default: ``steerable``) says whether a run without ``--target`` and
    ``--lambda`` gets the default budget ``<cost>=35%``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    steerable: ClassVar[bool]
    options: ClassVar[Mapping[str, StrategyOption]]

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult: ...


def resolve_options(strategy: type, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``given`` (texts parsed); unknown names are a ConfigError."""
    known: Mapping[str, StrategyOption] = getattr(strategy, "options", {}) or {}
    values = {name: option.default for name, option in known.items()}
    for name, value in (given or {}).items():
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"--strategy-option {name}: strategy {strategy.name!r} has no option {name!r} "
                              f"(its options: {choices})")
        values[name] = known[name].parse(value, strategy.name)
    return values
