"""``size``: weight memory in bits (report it in bytes with :func:`bits_to_bytes`).

Per layer, as in the paper's code (bias excluded; it stays in high precision)::

    size = fan_in_eff * kh*kw * sum_c sum_j theta[j, c] * b_j

with ``fan_in_eff = c_in_eff / groups`` (``c_in_eff`` for a plain conv or linear layer) and
``fan_in_eff = 1`` for a depthwise layer (its cost is per channel). 0-bit (pruned) channels
contribute nothing. With one-hot theta this is the exact number of weight bits of the layer.

Zeros of fine-grained sparsity (``inputs.sparsity``) are counted with a stated sparse encoding,
used for a layer only where it is smaller than the dense one: a bitmap of 1 bit per weight
position of every kept output channel, plus the nonzero values at their channel's width::

    sparse = K * n + nnz * sum_c sum_j theta[j, c] * b_j,   size = min(dense, sparse)

with ``n = fan_in_eff * kh*kw`` the weights of one kept channel, ``K = C_out_eff`` the kept
channels and ``nnz = n - floor(sparsity * n)`` per channel (``cost_models.spec``). The bitmap wins
once the density is below ``1 - 1/b`` (2-bit weights: under 50% nonzero). This is the size the
*model* predicts for a sparse-capable store; the exported ONNX file stores the zeros densely (the
report keeps file bytes and this figure apart). Zeros that quantization itself produces are not
counted (the model sees shapes, not weights).

An activation x activation MatMul (kind ``act_matmul``) stores no weights: 0 bits. An embedding
table (kind ``embedding``) is ``c_in`` values per row at its row's width (``c_out`` rows).
"""

from __future__ import annotations

from ._math import Scalar, finish, minimum
from .base import CostModel
from .spec import CostInputs, LayerSpec, channel_bits, check_inputs, nonzero_per_channel, weights_per_channel

NAME = "size"
UNIT = "bit"


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected weight bits of one layer under ``inputs.w_theta``."""
    check_inputs(spec, inputs, NAME)
    if spec.kind == "act_matmul":  # both operands are computed: nothing stored
        return finish(0.0)
    n = weights_per_channel(spec, inputs)
    bits = channel_bits(inputs)
    dense = n * bits
    if not spec.stores_weights:  # it reads another layer's weights: counted there, once
        return finish(dense * 0.0)
    if not inputs.sparsity:
        return finish(dense)
    sparse = inputs.c_out_eff() * n + nonzero_per_channel(spec, inputs) * bits
    return finish(minimum(dense, sparse))


def bits_to_bytes(bits: Scalar) -> Scalar:
    """Bits to bytes (``bits / 8``, not rounded: an expectation need not be whole)."""
    return bits / 8


COST_MODEL = CostModel(NAME, UNIT, cost, "weight memory in bits (bias excluded; sparse layers: bitmap + "
                                          "nonzeros where smaller)")
