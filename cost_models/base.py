"""The cost model interface: a name, a unit and a per-layer ``cost(spec, inputs)`` function."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from graph_passes.errors import CostModelError

from ._math import Scalar, finish
from .spec import CostInputs, LayerSpec

CostFunction = Callable[[LayerSpec, CostInputs], Scalar]


@dataclass(frozen=True)
class CostModel:
    """A hardware cost model.

    Attributes:
        name: the registry key (``--cost NAME`` on the CLI, a key of the plan's costs).
        unit: unit of the value ``cost`` returns, e.g. ``"bit"``, ``"cycles"``, ``"uJ"``.
        cost: ``cost(spec, inputs) -> float | torch.Tensor`` for one layer; a float when the
            inputs hold numbers, a differentiable tensor when they hold tensors.
        description: one line for ``prunequant`` listings.
    """

    name: str
    unit: str
    cost: CostFunction
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise CostModelError(f"a cost model needs a non-empty string name, got {self.name!r}")
        if not isinstance(self.unit, str) or not self.unit.strip():
            raise CostModelError(f"cost model {self.name!r} needs a non-empty string unit")
        if not callable(self.cost):
            raise CostModelError(f"cost model {self.name!r}: cost must be callable(spec, inputs)")

    def __call__(self, spec: LayerSpec, inputs: CostInputs) -> Scalar:
        return self.cost(spec, inputs)

    def total(self, layers: Iterable[tuple[LayerSpec, CostInputs]]) -> Scalar:
        """The model's cost: the sum of the per-layer costs (0.0 for no layers)."""
        total: Scalar = 0.0
        for spec, inputs in layers:
            total = total + self.cost(spec, inputs)
        return finish(total)
