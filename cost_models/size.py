"""``size``: weight memory in bits (report it in bytes with :func:`bits_to_bytes`).

Per layer, as in the paper's code (bias excluded; it stays in high precision)::

    size = fan_in_eff * kh*kw * sum_c sum_j theta[j, c] * b_j

with ``fan_in_eff = c_in_eff / groups`` (``c_in_eff`` for a plain conv or linear layer) and
``fan_in_eff = 1`` for a depthwise layer (its cost is per channel). 0-bit (pruned) channels
contribute nothing. With one-hot theta this is the exact number of weight bits of the layer.
"""

from __future__ import annotations

from ._math import Scalar, finish
from .base import CostModel
from .spec import CostInputs, LayerSpec, channel_bits, check_inputs

NAME = "size"
UNIT = "bit"


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected weight bits of one layer under ``inputs.w_theta``."""
    check_inputs(spec, inputs, NAME)
    return finish(spec.fan_in_eff(inputs.c_in_eff) * spec.kernel_area * channel_bits(inputs))


def bits_to_bytes(bits: Scalar) -> Scalar:
    """Bits to bytes (``bits / 8``, not rounded: an expectation need not be whole)."""
    return bits / 8


COST_MODEL = CostModel(NAME, UNIT, cost, "weight memory in bits (bias excluded)")
