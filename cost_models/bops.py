"""``bops``: bit operations, ``MACs * b_w * b_a``.

The expectation under theta, with weight and activation precisions independent::

    bops = macs_c * sum_c sum_j sum_a theta[j, c] * theta_a[a] * b_j * b_a
         = macs_c * (sum_j b_j * sum_c theta[j, c]) * (sum_a theta_a[a] * b_a)

where ``macs_c = fan_in_eff * kh*kw * h_o*w_o`` are the MACs of one output channel, with
``fan_in_eff = c_in_eff / groups`` (depthwise: 1). ``C_in_eff`` therefore enters the MACs
linearly and ``C_out_eff`` enters through the 0-bit rows of theta, which contribute nothing.

Fine-grained sparsity (``inputs.sparsity``) is **not** counted: BOPs here are the dense bit
operations of the layer's kept channels (no zero skipping), as on MPIC and NE16.

An activation x activation MatMul (``act_matmul``) is ``MACs * b_A * b_B`` (operand B's width in
``w_theta``, a pruned head's columns 0-bit); an embedding look-up has no MACs: 0.
"""

from __future__ import annotations

from ._math import Scalar, finish
from .base import CostModel
from .spec import CostInputs, LayerSpec, channel_bits, check_inputs, expected_bits

NAME = "bops"
UNIT = "bit-op"


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected bit operations of one layer, per sample."""
    check_inputs(spec, inputs, NAME)
    weight_bits = channel_bits(inputs)
    activation_bits = expected_bits(inputs.a_precisions, inputs.a_theta)
    return finish(spec.macs_per_out_channel(inputs.c_in_eff) * weight_bits * activation_bits)


COST_MODEL = CostModel(NAME, UNIT, cost, "bit operations: MACs * weight bits * activation bits")
