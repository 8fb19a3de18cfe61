"""``mpic``: latency in cycles on MPIC, a mixed-precision RISC-V core (Ottavi et al., 2020).

A look-up table gives MACs per cycle by activation bits a and weight bits w; per layer::

    cycles = sum_a theta_a[a] * sum_{w != 0} (sum_c theta[w, c]) * macs_c / LUT[a][w]

with ``macs_c = fan_in_eff * kh*kw * h_o*w_o`` (``fan_in_eff = c_in_eff / groups``,
depthwise: 1). Weight bits must be in {0, 2, 4, 8} and activation bits in {2, 4, 8}; any
other precision in the precision sets is an error, even with zero probability.

Fine-grained sparsity (``inputs.sparsity``) is **not** counted: MPIC's SIMD dot products do not
skip zero weights, so a sparse layer costs what the dense one does (so does ``mpic_energy``).

An activation x activation MatMul (``act_matmul``) runs on the same SIMD dot products with
operand B in the weight role (the LUT at ``[b_A][b_B]``); an embedding look-up costs 0 cycles
(no MACs; the row copies are not modelled).
"""

from __future__ import annotations

from graph_passes.errors import CostModelError

from ._math import Scalar, channel_mass, finish, probabilities
from .base import CostModel
from .spec import CostInputs, LayerSpec, check_inputs

NAME = "mpic"
UNIT = "cycles"

#: MACs per cycle, ``MACS_PER_CYCLE[a_bits][w_bits]``.
MACS_PER_CYCLE: dict[int, dict[int, float]] = {
    2: {2: 6.5, 4: 4.0, 8: 2.2},
    4: {2: 3.9, 4: 3.5, 8: 2.1},
    8: {2: 2.5, 4: 2.3, 8: 2.1},
}


def _check_precisions(spec: LayerSpec, inputs: CostInputs) -> None:
    bad_w = [b for b in inputs.w_precisions if b != 0 and b not in MACS_PER_CYCLE[8]]
    bad_a = [b for b in inputs.a_precisions if b not in MACS_PER_CYCLE]
    if bad_w or bad_a:
        raise CostModelError(
            f"cost model {NAME!r}, layer {spec.name!r}: no MPIC table entry for weight bits "
            f"{bad_w or '-'} / activation bits {bad_a or '-'}; use weights in {{0, 2, 4, 8}} and "
            f"activations in {{2, 4, 8}}, or register a cost model with your own table"
        )


def cycles_per_channel(inputs: CostInputs) -> Scalar:
    """``sum_a theta_a * sum_{w != 0} (sum_c theta[w, c]) / LUT[a][w]``: cycles per channel-MAC."""
    masses = channel_mass(inputs.w_theta)
    total: Scalar = 0.0
    for a_bits, p_a in zip(inputs.a_precisions, probabilities(inputs.a_theta)):
        row = MACS_PER_CYCLE[a_bits]
        per_a = sum((m / row[w] for w, m in zip(inputs.w_precisions, masses) if w), 0.0)
        total = total + p_a * per_a
    return total


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected MPIC cycles of one layer, per sample."""
    check_inputs(spec, inputs, NAME)
    _check_precisions(spec, inputs)
    return finish(spec.macs_per_out_channel(inputs.c_in_eff) * cycles_per_channel(inputs))


COST_MODEL = CostModel(NAME, UNIT, cost, "latency on the MPIC mixed-precision RISC-V core")
