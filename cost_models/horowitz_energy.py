"""``horowitz_energy``: energy of one inference on a zero-skipping integer accelerator, in
microjoules, with separate MAC and memory terms per bit-width.

Constants: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
45 nm at 0.9 V (the table Han et al. reproduce in "Deep Compression", ICLR 2016, and in EIE):

=====================================  ==========
8-bit integer multiply                  0.2 pJ
32-bit integer multiply                 3.1 pJ
8-bit integer add                       0.03 pJ
32-bit integer add                      0.1 pJ
SRAM read, 64 bits (8 KB array)         10 pJ
DRAM read, 64 bits                      1.3-2.6 nJ (not used: see below)
=====================================  ==========

Per layer and sample::

    E = MACs_nz * (E_mul(w, a) + E_add32)                    compute
      + stored_weight_bits * E_sram / 64                      weights, read once
      + c_in_eff * h_o*w_o * a * E_sram / 64                  input activations, read once

* ``E_mul(w, a) = 0.2 pJ * (w * a) / (8 * 8)``: an array multiplier's energy grows with the
  number of partial-product bits, ``w * a``. The rule reproduces Horowitz's own 32-bit figure
  (0.2 * 16 = 3.2 pJ against 3.1 pJ measured); for 4 and 2 bits it gives 0.05 pJ (W4A4),
  0.1 pJ (W4A8), 0.0125 pJ (W2A2). A mixed-precision layer pays each kept channel's width.
* ``E_add32 = 0.1 pJ``: products are accumulated in 32 bits (integer inference accumulates in
  int32 whatever the operand widths), so the adder does not shrink with the bit-width: at W2A2 a
  MAC still costs 0.1125 pJ, 37.5% of the 8-bit MAC's 0.3 pJ.
* **Zero skipping**: a MAC whose weight is zero is skipped (no multiply, no add). ``MACs_nz =
  positions * K * nnz``: the kept output channels ``K`` times the nonzero weights of one
  channel (``nnz = n - floor(sparsity * n)``, ``n = fan_in_eff * kh*kw``, ``cost_models.spec``)
  over the output positions. Removed channels skip their MACs too (coarse pruning). Zeros that
  quantization rounds to are not counted (the model sees shapes, not weights).
* Weights are read once per inference from on-chip SRAM (the 8 KB array's 10 pJ per 64 bits);
  the bits read are the ``size`` model's (bitmap + nonzeros where smaller than dense). DRAM is
  not modelled: the models this project ships fit on chip, and off-chip weights would weigh the
  memory term ~130x more (1.3 nJ per 64 bits).
* Activations: each layer reads its input once at its activation width, counted over the output
  positions (stride 1 assumed: a strided layer's larger input is undercounted). Outputs are the
  next layer's input; the network output is not counted. Zero activations are not skipped.

Scaling to 2 and 4 bits uses only the two rules above (multiplier ~ ``w * a``, 32-bit
accumulator fixed, memory ~ bits); they are modelling assumptions, not measurements at those
widths. Depthwise layers: ``n = kh*kw``.

An activation x activation MatMul (``act_matmul``): the MACs as above with operand B's width in
the weight role (pruned heads skipped); memory: operand B read once at its width (``k * sum_c
b_c``, what ``size`` would count if B were stored) plus operand A (``c_in * h_o*w_o * a``: H heads
of m x k, pruned heads included). An embedding look-up: 0 (no MACs; the rows read per inference
are not modelled).
"""

from __future__ import annotations

from ._math import Scalar, finish
from .base import CostModel
from .size import cost as size_cost
from .spec import CostInputs, LayerSpec, channel_bits, check_inputs, expected_bits, nonzero_per_channel

NAME = "horowitz_energy"
UNIT = "uJ"

MULT_8BIT_PJ = 0.2
MULT_32BIT_PJ = 3.1
ADD_8BIT_PJ = 0.03
ADD_32BIT_PJ = 0.1
SRAM_64BIT_PJ = 10.0
DRAM_64BIT_PJ = 1300.0
PJ_TO_UJ = 1e-6


def multiply_pj(w_bits: float, a_bits: float) -> float:
    """One ``w_bits`` x ``a_bits`` integer multiply: ``0.2 pJ * w * a / 64``."""
    return MULT_8BIT_PJ * w_bits * a_bits / 64.0


def mac_pj(w_bits: float, a_bits: float) -> float:
    """One MAC: the multiply plus a 32-bit accumulate."""
    return multiply_pj(w_bits, a_bits) + ADD_32BIT_PJ


def compute_pj(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Energy of the nonzero MACs of one layer (zero weights and removed channels skipped)."""
    per_channel = nonzero_per_channel(spec, inputs) * spec.positions
    a_bits = expected_bits(inputs.a_precisions, inputs.a_theta)
    multiplies = MULT_8BIT_PJ / 64.0 * channel_bits(inputs) * a_bits  # sum over kept channels of w_c * a
    return per_channel * (multiplies + ADD_32BIT_PJ * inputs.c_out_eff())


def memory_pj(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """SRAM energy of one layer: its stored weight bits and its input activations, read once."""
    activation_bits = inputs.c_in_eff * spec.positions * expected_bits(inputs.a_precisions, inputs.a_theta)
    if spec.kind == "act_matmul":  # operand B is read once, as a weight would be
        return (spec.fan_in * channel_bits(inputs) + activation_bits) * SRAM_64BIT_PJ / 64.0
    return (size_cost(spec, inputs) + activation_bits) * SRAM_64BIT_PJ / 64.0


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected energy of one layer, per sample, in microjoules."""
    check_inputs(spec, inputs, NAME)
    if not spec.computes:
        return finish(0.0)
    return finish((compute_pj(spec, inputs) + memory_pj(spec, inputs)) * PJ_TO_UJ)


COST_MODEL = CostModel(NAME, UNIT, cost, "energy on a zero-skipping integer accelerator (Horowitz ISSCC 2014, "
                                         "45 nm: MAC per bit-width + SRAM traffic)")
