"""The search space, torch-free: which precisions are allowed, and (below) decisions -> plans.

:class:`Precisions` is the one value that says which weight and activation bit-widths a run may
use. It is validated once, here: the CLI's ``--weight-bits`` / ``--act-bits``, the API's config
and every strategy take it from this class, and the widths it accepts are the ones the export
path can write (``graph_passes.bitwidths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from graph_passes.bitwidths import ACTIVATION_BITS, PRUNED, WEIGHT_BITS
from graph_passes.errors import ConfigError

DEFAULT_WEIGHT_PRECISIONS: tuple[int, ...] = (PRUNED, *WEIGHT_BITS)
DEFAULT_ACTIVATION_PRECISIONS: tuple[int, ...] = ACTIVATION_BITS


def _as_bits(values: Iterable[object] | str, flag: str) -> tuple[int, ...]:
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",")]
        if not values.strip() or any(not p for p in parts):
            raise ConfigError(f"{flag} {values!r}: give comma-separated bit-widths, e.g. {flag} 2,4,8")
        out = []
        for part in parts:
            try:
                out.append(int(part))
            except ValueError:
                raise ConfigError(f"{flag} {values!r}: {part!r} is not a whole number of bits; "
                                  f"e.g. {flag} 2,4,8") from None
        return tuple(out)
    out = []
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ConfigError(f"{flag}: {value!r} is not a whole number of bits")
        out.append(int(value.__index__()))  # type: ignore[attr-defined]
    return tuple(out)


def _check(values: tuple[int, ...], allowed: tuple[int, ...], flag: str, *, prune: bool) -> tuple[int, ...]:
    choices = ", ".join(str(b) for b in ((PRUNED,) if prune else ()) + allowed)
    if not values:
        raise ConfigError(f"{flag}: the set of bit-widths is empty; choose from {choices}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {','.join(map(str, values))}: a bit-width is listed twice")
    bad = [b for b in values if b not in allowed and not (prune and b == PRUNED)]
    if bad:
        extra = " (0 = prune is only a weight option)" if not prune and PRUNED in bad else ""
        raise ConfigError(f"{flag} {','.join(map(str, values))}: {', '.join(map(str, bad))} bit(s) cannot be "
                          f"exported; choose from {choices}{extra}")
    if all(b == PRUNED for b in values):
        raise ConfigError(f"{flag} {','.join(map(str, values))}: needs at least one non-zero width "
                          f"(0 only means 'prune'); e.g. {flag} 0,2,4,8")
    return tuple(sorted(values))


@dataclass(frozen=True)
class Precisions:
    """Allowed weight widths (0 = the channel is pruned) and activation widths, sorted.

    ``Precisions.parse("0,2,4,8", "8")`` validates user text; the constructor validates values.
    Errors are :class:`ConfigError` naming the flag (``--weight-bits`` / ``--act-bits``).
    """

    weights: tuple[int, ...] = DEFAULT_WEIGHT_PRECISIONS
    activations: tuple[int, ...] = DEFAULT_ACTIVATION_PRECISIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights",
                           _check(_as_bits(self.weights, "--weight-bits"), WEIGHT_BITS, "--weight-bits", prune=True))
        object.__setattr__(self, "activations",
                           _check(_as_bits(self.activations, "--act-bits"), ACTIVATION_BITS, "--act-bits",
                                  prune=False))

    @classmethod
    def parse(cls, weights: str | Iterable[int] | None = None,
              activations: str | Iterable[int] | None = None) -> Precisions:
        """From CLI text (``"0,2,4,8"``) or sequences; None keeps the default."""
        return cls(DEFAULT_WEIGHT_PRECISIONS if weights is None else _as_bits(weights, "--weight-bits"),
                   DEFAULT_ACTIVATION_PRECISIONS if activations is None else _as_bits(activations, "--act-bits"))

    @property
    def prunes(self) -> bool:
        """True when 0 bits (removing a channel) is allowed."""
        return PRUNED in self.weights

    @property
    def weight_widths(self) -> tuple[int, ...]:
        """The non-zero weight widths."""
        return tuple(b for b in self.weights if b != PRUNED)

    def describe(self) -> str:
        return f"weights {{{','.join(map(str, self.weights))}}}, activations {{{','.join(map(str, self.activations))}}}"


__all__ = ["DEFAULT_ACTIVATION_PRECISIONS", "DEFAULT_WEIGHT_PRECISIONS", "Precisions"]
