"""``ne16``: latency in cycles on the GreenWaves NE16 convolution accelerator.

NE16 reads **8-bit activations only**. This model ignores ``a_precisions`` / ``a_theta``
entirely and costs every layer as if its input were 8-bit, whatever mass theta puts on other
activation widths (so activation precision earns nothing under this model). Weight bits must be
1..8; each weight precision b != 0 is costed as its own sub-layer with ``K_o = sum_c theta[b, c]``
output channels (0-bit channels are skipped).

Kernels are decomposed into ``floor(kh/3) * floor(kw/3)`` 3x3 passes plus
``kh*kw - 9 * floor(kh/3) * floor(kw/3)`` leftover 1x1 passes (a 5x5 kernel: 1 + 16). Input
buffer 5x5x16, output buffer 3x3x32, 256 bit/cycle, so::

    n_spatial = ceil(h_o / 3) * ceil(w_o / 3)
    n_in      = ceil(c_in_eff / 16)
    stages    load 31 (19 for a 1x1 pass), weight offset 6, matrix-vector 6 + k * w_bits
              (6 + k for a 1x1 pass), index update 2, norm-quant 9 + k, stream-out 13
    iteration(k) = n_in * (load + 6 + matvec(k) + 2) + normquant(k) + streamout
    pass     = n_spatial * (floor(K_o / 32) * iteration(32) + [rem > 0] * iteration(rem))

with ``rem = K_o - 32 * floor(K_o / 32)``; a zero remainder block costs nothing.

Depthwise layers (as in the paper's code): output channels in blocks of 16, weight offset
``6 + k``, the bit-serial matrix-vector ``6 + k * w_bits`` and load 31 for every pass (the 1x1
shortcuts apply to dense layers only), and no ``n_in`` factor, since a block of 16 channels only
reads its own 16 input channels::

    iteration_dw(k) = load + (6 + k) + matvec(k) + 2 + normquant(k) + streamout

Linear layers are 1x1 passes over ``out_hw`` (Gemm: one position). On tensors ``floor``/``ceil``
are straight-through (identity gradient on their argument): ``d floor(K_o/32) / dK_o = 1/32``
and the remainder has no gradient, so a channel's marginal cost is ``iteration(32) / 32``.

Fine-grained sparsity (``inputs.sparsity``) is **not** counted: NE16's bit-serial engine streams
every weight of a block, zero or not.

An activation x activation MatMul (``act_matmul``) is costed as 1x1 passes with operand B streamed
as the weights at B's width (8-bit activations assumed for A, as everywhere), each head on its
own: ``n_in = ceil(k / 16)`` from the per-head ``c_in_eff / groups``. An embedding look-up does
not run on NE16: 0 cycles.
"""

from __future__ import annotations

import math

from graph_passes.errors import CostModelError

from ._math import Scalar, ceil_ste, channel_mass, finish, floor_ste, positive_step
from .base import CostModel
from .spec import CostInputs, LayerSpec, check_inputs

NAME = "ne16"
UNIT = "cycles"

INPUT_CHANNELS_PER_LOAD = 16
OUTPUT_BLOCK = 32
DEPTHWISE_BLOCK = 16
OUTPUT_TILE = 3
MAX_WEIGHT_BITS = 8

LOAD_CYCLES = 31
LOAD_CYCLES_1X1 = 19
WEIGHT_OFFSET_CYCLES = 6
MATVEC_BASE_CYCLES = 6
INDEX_UPDATE_CYCLES = 2
NORMQUANT_BASE_CYCLES = 9
STREAMOUT_CYCLES = 13


def _iteration(k: Scalar, w_bits: int, n_in: Scalar, one_by_one: bool, depthwise: bool) -> Scalar:
    """Cycles of one output block of ``k`` channels over one spatial tile."""
    load = LOAD_CYCLES_1X1 if one_by_one else LOAD_CYCLES
    matvec = MATVEC_BASE_CYCLES + (k if one_by_one else k * w_bits)
    tail = NORMQUANT_BASE_CYCLES + k + STREAMOUT_CYCLES
    if depthwise:
        return load + (WEIGHT_OFFSET_CYCLES + k) + matvec + INDEX_UPDATE_CYCLES + tail
    return n_in * (load + WEIGHT_OFFSET_CYCLES + matvec + INDEX_UPDATE_CYCLES) + tail


def _pass_cycles(
    k_out: Scalar, w_bits: int, n_in: Scalar, n_spatial: int, one_by_one: bool, depthwise: bool
) -> Scalar:
    """Cycles of one 3x3 or 1x1 pass over ``k_out`` output channels at ``w_bits``."""
    block = DEPTHWISE_BLOCK if depthwise else OUTPUT_BLOCK
    n_blocks = floor_ste(k_out / block)
    remainder = k_out - n_blocks * block
    full = n_blocks * _iteration(block, w_bits, n_in, one_by_one, depthwise)
    partial = positive_step(remainder) * _iteration(remainder, w_bits, n_in, one_by_one, depthwise)
    return n_spatial * (full + partial)


def _check_precisions(spec: LayerSpec, inputs: CostInputs) -> None:
    bad = [b for b in inputs.w_precisions if b > MAX_WEIGHT_BITS]
    if bad:
        raise CostModelError(
            f"cost model {NAME!r}, layer {spec.name!r}: NE16 weights have at most "
            f"{MAX_WEIGHT_BITS} bits, got {bad}; drop them from w_precisions"
        )


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected NE16 cycles of one layer, per sample (8-bit activations assumed)."""
    check_inputs(spec, inputs, NAME)
    _check_precisions(spec, inputs)
    if not spec.computes:
        return finish(0.0)
    depthwise = spec.kind == "depthwise"
    n_3x3 = (spec.kernel[0] // 3) * (spec.kernel[1] // 3)
    n_1x1 = spec.kernel_area - 9 * n_3x3
    n_spatial = math.ceil(spec.out_hw[0] / OUTPUT_TILE) * math.ceil(spec.out_hw[1] / OUTPUT_TILE)
    per_head = spec.groups if spec.kind == "act_matmul" else 1
    n_in = ceil_ste(inputs.c_in_eff / per_head / INPUT_CHANNELS_PER_LOAD)
    passes = [(count, one_by_one) for count, one_by_one in
              ((n_3x3, False), (n_1x1, not depthwise)) if count]
    total: Scalar = 0.0
    for w_bits, k_out in zip(inputs.w_precisions, channel_mass(inputs.w_theta)):
        if w_bits == 0:
            continue
        for count, one_by_one in passes:
            cycles = _pass_cycles(k_out, w_bits, n_in, n_spatial, one_by_one, depthwise)
            total = total + count * cycles
    return finish(total)


COST_MODEL = CostModel(NAME, UNIT, cost, "latency on the NE16 accelerator (8-bit activations)")
