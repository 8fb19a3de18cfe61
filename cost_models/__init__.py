"""Hardware cost models over layer descriptors.

A cost model turns one layer's static shape (:class:`LayerSpec`) and its searchable quantities
(:class:`CostInputs`: weight-precision probabilities per output channel, activation-precision
probabilities, effective input channels) into a cost. The same formula gives a float for numpy
inputs (a final plan, a report) and a differentiable tensor for torch inputs (the search); a
model's cost is the sum over its layers. This package never imports ``plugin`` and does not
import torch.

Built-in models (name, unit): ``size`` (bit; :func:`bits_to_bytes`), ``bops`` (bit-op),
``mpic`` (cycles), ``mpic_energy`` (uJ), ``ne16`` (cycles; 8-bit activations assumed),
``horowitz_energy`` (uJ; a zero-skipping accelerator, Horowitz ISSCC 2014 constants). Of these
only ``size`` (a bitmap encoding) and ``horowitz_energy`` (skipped MACs) count the zeros of
fine-grained sparsity (``CostInputs.sparsity``); each module's docstring says how.

Adding a cost model (for instance the latency table of your own chip)
---------------------------------------------------------------------
Write a function ``cost(spec: LayerSpec, inputs: CostInputs) -> float | torch.Tensor`` using
only arithmetic that works on floats and tensors (the helpers in ``cost_models._math`` show
how: ``floor_ste``/``ceil_ste`` for straight-through rounding), and wrap it::

    # my_chip/cost.py
    from cost_models import CostModel, CostInputs, LayerSpec

    def cost(spec: LayerSpec, inputs: CostInputs):
        ...

    MY_CHIP = CostModel(name="my_chip", unit="cycles", cost=cost, description="...")

Then either register it at run time, ``cost_models.register_cost_model(MY_CHIP)`` (or decorate
the function with ``@register_cost_model(name="my_chip", unit="cycles")``), or publish it from
your package's ``pyproject.toml`` under the entry point group ``prunequant.cost_models``::

    [project.entry-points."prunequant.cost_models"]
    my_chip = "my_chip.cost:MY_CHIP"

The entry point must load an object with ``name`` (equal to the entry point's name), ``unit``
and ``cost(spec, inputs)``: a :class:`CostModel` or anything shaped like one. Names already
taken by a built-in or registered model win; the entry point is then ignored with a warning.
"""

from __future__ import annotations

from ._math import Scalar, ceil_ste, floor_ste
from .base import CostFunction, CostModel
from .mpic_energy import cycles_to_microjoules
from .registry import (
    BUILTIN_COST_MODELS,
    ENTRY_POINT_GROUP,
    as_cost_model,
    available_cost_models,
    evaluate_cost_models,
    get_cost_model,
    register_cost_model,
    unregister_cost_model,
)
from .size import bits_to_bytes
from .spec import LAYER_KINDS, CostInputs, LayerSpec, check_inputs

__all__ = [
    "BUILTIN_COST_MODELS",
    "ENTRY_POINT_GROUP",
    "LAYER_KINDS",
    "CostFunction",
    "CostInputs",
    "CostModel",
    "LayerSpec",
    "Scalar",
    "as_cost_model",
    "available_cost_models",
    "bits_to_bytes",
    "ceil_ste",
    "check_inputs",
    "cycles_to_microjoules",
    "evaluate_cost_models",
    "floor_ste",
    "get_cost_model",
    "register_cost_model",
    "unregister_cost_model",
]
