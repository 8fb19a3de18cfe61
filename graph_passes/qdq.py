"""Insert QDQ: packed per-channel integer weights and Q/DQ activation pairs into a pruned model.

Weights (symmetric, per output channel, zero point 0, narrow range; the numbers are those of
``plugin.quantizers.quantize_weight_per_channel``, bit for bit on float32):
``scale_c = max|W_c| / (2^(b-1) - 1)`` (1 for an all-zero channel), ``q = clip(round_half_even(
W / scale_c), -(2^(b-1) - 1), 2^(b-1) - 1)``, stored packed as INT8 / INT4 (2 per byte) / INT2
(4 per byte) and read back by ``DequantizeLinear(axis=<output-channel axis>)``. An all-8-bit
model with quantized activations stores its weights as UINT8 ``q + 128`` with zero point 128
instead (the same values; onnxruntime's uint8 x int8 kernels saturate on x86 CPUs without VNNI,
see ``_dequantize_part``).

* A uniform layer is ``DQ -> layer`` (the pattern onnxruntime fuses).
* A mixed layer gets one packed initializer + DequantizeLinear per bit-width (its channels in
  their original relative order), then ``Concat`` along the output-channel axis and a ``Gather``
  with the inverse permutation, so the weight tensor the layer reads is in its original channel
  order. This improves on DESIGN.md's "one sub-layer per bit-width, permutation carried into the
  consumers": the layer stays one op and no consumer changes.
* A mixed layer whose channels are already sorted by width, widest first (the export reorders
  channel groups so: ``plugin.export``, ``graph_passes.permute``) is ``Concat(DQ_8, DQ_4, DQ_2)
  -> layer``: no Gather, no index tensor. The Concat keeps onnxruntime's QDQ fusions away as the
  Gather does (measured: every optimisation level agrees, tests/test_export_permute.py). One
  Conv per width with its outputs concatenated was measured too and not chosen: more nodes and
  bytes, and no faster (benchmarks/results/export-size-cpu/README.md).

Activations: ``QuantizeLinear(scale, zp=0) -> DequantizeLinear`` with UINT-b (PACT) or INT-b
(symmetric) zero points; every consumer of the tensor reads the dequantized value (graph
outputs keep the float tensor).

onnxruntime 1.32 pitfalls measured while writing this (ORT_ENABLE_ALL only):

* its QDQ fusions (QLinearConv, QGemm, QLinearMatMul) accept INT2/UINT2 and (for Conv) INT4/UINT4
  operands they have no kernel for, and session creation fails ("Type 'tensor(int2)' ... of
  operator (QGemm) is invalid"). So when any bit-width below 8 is present, each weight reaches
  its layer through a no-op ``Reshape`` (uniform) or the ``Concat`` / ``Gather`` (mixed), which no
  fusion matches. All-8-bit models keep the plain fusable ``DQ -> layer`` pattern.
* it turns ``DQ(INT8, axis 1) -> MatMul`` (and Gemm with transB=0) whose input is *not*
  quantized into MatMulNBits with accuracy_level 4, which quantizes the activations to int8 on
  the fly (0.4% relative error on a tiny Gemm). So the plain ``DQ -> layer`` pattern is kept
  only for an 8-bit layer whose input is 8-bit quantized (the integer-kernel fusions, which
  are exact up to float rounding); every other weight goes through the no-op ``Reshape``.
* it drops a ``Relu`` that feeds a signed INT4/INT2 QuantizeLinear with zero point 0 (wrong
  results, silently). Such a quantizer reads the Relu output through a no-op ``Reshape``.
* it does *not* constant-fold ``DQ -> Concat (-> Gather)`` at session start (DQ nodes are
  excluded from constant folding): the weights are dequantized on every run. Sub-8-bit weights
  buy size, not speed, on CPU.
* it moves a QuantizeLinear backwards over data-movement ops and runs them on the quantized
  type, with no INT2 kernels for them (see ``_PROPAGATING_OPS``).

Opsets: per-axis DequantizeLinear needs opset 13, INT4/UINT4 opset 21 (IR 10), INT2/UINT2
opset 25 (IR 13). A model below what its bit-widths need is up-converted with
``onnx.version_converter`` and checked in onnxruntime before anything else changes.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from .bitwidths import ACTIVATION_BITS, WEIGHT_BITS
from .errors import PlanError, PrunequantError, UnsupportedModelError, VerificationError
from .fold_utils import unique_name
from .graph import DEFAULT_DOMAINS, subgraph_references
from .op_rules import weight_rule
from .ort_utils import compare_outputs, make_session, random_feeds

logger = logging.getLogger(__name__)

MIN_OPSET = {8: 13, 4: 21, 2: 25}
_SIGNED = {8: (TensorProto.INT8, np.int8), 4: (TensorProto.INT4, ml_dtypes.int4),
           2: (TensorProto.INT2, ml_dtypes.int2)}
_UNSIGNED = {8: (TensorProto.UINT8, np.uint8), 4: (TensorProto.UINT4, ml_dtypes.uint4),
             2: (TensorProto.UINT2, ml_dtypes.uint2)}
# onnxruntime (1.32, ENABLE_ALL) moves a QuantizeLinear backwards over these data-movement ops
# and then drops the DequantizeLinear -> op -> QuantizeLinear pair, running the op on the
# quantized type; below 8 bits it often has no kernel for that ("Failed to find kernel for
# Reshape(25)" with INT2, "Type 'tensor(uint4)' of input parameter ... of operator (MaxPool)").
# A sub-8-bit activation produced by one of them is written with an 8-bit container and a Clip
# to its b-bit range after DequantizeLinear: the same values, and a model that loads.
_PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                              "Gather", "Expand", "Resize", "DepthToSpace", "SpaceToDepth", "Split",
                              "Concat", "Tile", "Pad", "AveragePool", "GlobalMaxPool"})


@dataclass(frozen=True)
class WeightQuant:
    """Per output channel (of the pruned layer) bit-widths, and optionally the scales."""

    bits: tuple[int, ...]
    scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        bad = sorted({b for b in self.bits if b not in WEIGHT_BITS})
        if not self.bits or bad:
            raise PlanError(f"weight bit-widths must be in {WEIGHT_BITS}, got {bad or 'none'}")
        if self.scales is not None:
            s = np.asarray(self.scales, dtype=np.float64)
            if s.shape != (len(self.bits),) or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise PlanError(f"weight scales must be {len(self.bits)} finite numbers > 0")


@dataclass(frozen=True)
class ActivationQuant:
    """``scale = clip / (2^b - 1)`` (unsigned, PACT) or ``clip / (2^(b-1) - 1)`` (signed).

    ``consumers``: names of the nodes that read the quantized value (the weight layers of the
    activation site, as in the fake-quantized torch model); None means every reader."""

    bits: int
    signed: bool
    scale: float
    consumers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.bits not in ACTIVATION_BITS:
            raise PlanError(f"activation bit-width must be in {ACTIVATION_BITS}, got {self.bits}")
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise PlanError(f"activation scale must be a finite number > 0, got {self.scale}")


@dataclass
class LayerBytes:
    """Serialized payload bytes of one quantized layer's weight path."""

    name: str
    bits: dict[int, int]          # bit-width -> channel count
    weight_bytes: int             # packed integer weights
    scale_bytes: int              # float32 scales
    zero_point_bytes: int         # packed zero points
    index_bytes: int              # Gather indices / Reshape shape (0 for a plain DQ)
    predicted_bytes: float        # size cost model: weights per channel * sum_c b_c / 8
    fp32_bytes: int               # the float32 weight it replaced

    @property
    def total(self) -> int:
        return self.weight_bytes + self.scale_bytes + self.zero_point_bytes + self.index_bytes


@dataclass
class QdqResult:
    model: onnx.ModelProto
    layers: dict[str, LayerBytes] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)  # tensor -> bits
    opset: int = 0
    upgraded_from: int | None = None
    guarded: bool = False

    @property
    def weight_bytes(self) -> int:
        """Bytes of every quantized layer's weight path (packed ints, scales, zps, indices)."""
        return sum(layer.total for layer in self.layers.values())

    @property
    def predicted_bytes(self) -> float:
        return sum(layer.predicted_bytes for layer in self.layers.values())

    @property
    def model_bytes(self) -> int:
        return self.model.ByteSize()

    @property
    def other_bytes(self) -> int:
        """Everything else: graph structure, names, biases, unquantized tensors, Q/DQ params."""
        return self.model_bytes - self.weight_bytes


def quantize_weight(
    w: np.ndarray, bits: Sequence[int], axis: int, scales: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel integers (int32, same shape as ``w``) and float32 scales."""
    w = np.asarray(w, dtype=np.float32)
    axis %= w.ndim
    n = w.shape[axis]
    b = np.asarray(bits, dtype=np.int64).reshape(-1)
    if b.size != n:
        raise PlanError(f"{b.size} bit-widths for a weight with {n} output channels")
    qmax = (np.left_shift(1, b - 1) - 1).astype(np.float32)
    if scales is None:
        absmax = np.abs(np.moveaxis(w, axis, 0).reshape(n, -1)).max(axis=1)
        scale = (absmax / qmax).astype(np.float32)
        scale = np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1.0))
    else:
        scale = np.asarray(scales, dtype=np.float32).reshape(-1)
    view = [1] * w.ndim
    view[axis] = n
    q = np.clip(np.round(w / scale.reshape(view)), -qmax.reshape(view), qmax.reshape(view))
    return q.astype(np.int32), scale.astype(np.float32)


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weight layer's weight tensor (asked of the op's rule)."""
    rule = weight_rule(node) if node.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise UnsupportedModelError(
            f"node {node.name!r} is a {node.op_type}; only Conv, ConvTranspose, Gemm and MatMul "
            "weights can be quantized")
    return rule.weight_out_axis(node)


@dataclass
class _Context:
    model: onnx.ModelProto
    taken: set[str]
    guard: bool                   # some bit-width below 8: keep every weight from ORT's fusions
    quantized_inputs: set[str] = field(default_factory=set)
    new_inits: list[TensorProto] = field(default_factory=list)
    new_nodes: list[onnx.NodeProto] = field(default_factory=list)
    replaced: set[str] = field(default_factory=set)  # float weights now read through DQ
    # a weight read by several layers (graph_passes.untie), quantized alike: its dequantized
    # tensor (and whether it is the mixed-width Gather), written once for every reader
    dequantized: dict[tuple, tuple[str, bool]] = field(default_factory=dict)

    def name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: object) -> str:
        out = self.name(base)  # the node is named after its output: one short, unique name
        self.taken.add(out)
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def insert_qdq(
    model: onnx.ModelProto,
    weights: Mapping[str, WeightQuant],
    activations: Mapping[str, ActivationQuant],
    embeddings: Mapping[str, int] | None = None,
) -> QdqResult:
    """Quantize the named layers' weights and the named activation tensors (see module doc).

    ``weights`` is keyed by node name, ``activations`` by tensor name. ``embeddings``: Gather
    node name -> bits: the table (input 0) is stored as INT-b with one scale per row and read
    through ``DequantizeLinear(axis=0) -> Gather`` (:func:`_quantize_embedding`); its bytes are an
    entry of ``QdqResult.layers`` under the Gather's name. The input model is not modified.
    Raises PlanError for an unknown node or tensor or a bit-width/shape mismatch,
    UnsupportedModelError for a layer whose weight is not a float32 initializer, and
    VerificationError when the opset upgrade the bit-widths need changes the model's results.
    """
    embeddings = dict(embeddings or {})
    all_bits = {b for q in weights.values() for b in q.bits} | {a.bits for a in activations.values()}
    all_bits |= set(embeddings.values())
    needed = max((MIN_OPSET[b] for b in all_bits), default=MIN_OPSET[8])
    work, upgraded_from = ensure_opset(model, needed)
    ctx = _Context(work, _all_names(work), guard=any(b < 8 for b in all_bits),
                   quantized_inputs=set(activations))
    result = QdqResult(work, opset=_default_opset(work), upgraded_from=upgraded_from,
                       guarded=ctx.guard)
    nodes = {n.name: n for n in work.graph.node if n.name}
    for name, quant in weights.items():
        if name not in nodes:
            raise PlanError(f"weight layer {name!r} is not a node of the model (names: "
                            f"{_preview(nodes)})")
        result.layers[name] = _quantize_layer(nodes[name], quant, ctx)
    for tensor, quant in activations.items():
        _quantize_activation(tensor, quant, ctx)
        result.activations[tensor] = quant.bits
    for name, bits in embeddings.items():
        if name not in nodes:
            raise PlanError(f"embedding {name!r} is not a node of the model (names: {_preview(nodes)})")
        result.layers[name] = _quantize_embedding(nodes[name], bits, ctx)
    _drop_unused_initializers(work, ctx.replaced)
    work.graph.initializer.extend(ctx.new_inits)
    work.graph.node.extend(ctx.new_nodes)
    topological_sort(work.graph)
    logger.info("insert_qdq: %d layers, %d activations, opset %d, %d bytes (weights %d)",
                len(result.layers), len(result.activations), result.opset,
                result.model_bytes, result.weight_bytes)
    return result


def _quantize_layer(node: onnx.NodeProto, quant: WeightQuant, ctx: _Context) -> LayerBytes:
    axis = weight_axis(node)
    rule = weight_rule(node)
    inputs = rule.quantized_inputs(node) if rule is not None else (1,)
    if rule is not None and (len(inputs) > 1 or rule.channel_rows(node, [0]) != [0]):
        # several weights per channel (a recurrent layer's W and R, one row per gate): one
        # scale per channel over all of them (the fake-quantized model's), repeated per row
        weights = [_float_initializer(ctx.model, node.input[i], node) for i in inputs]
        scales = quant.scales
        if scales is None:
            absmax = rule.channel_absmax(node, weights)
            qmax = np.left_shift(1, np.asarray(quant.bits, dtype=np.int64) - 1) - 1
            scales = tuple(float(s) if np.isfinite(s) and s > 0 else 1.0 for s in (absmax / qmax).astype(np.float32))
        unit_bits = quant.bits
        quant = WeightQuant(tuple(rule.channel_rows(node, quant.bits)), tuple(rule.channel_rows(node, scales)))
        accts = [_quantize_tensor(node, i, quant, axis, ctx) for i in inputs]
        acct = accts[0]
        acct.bits = {b: unit_bits.count(b) for b in sorted(set(unit_bits), reverse=True)}
        for other in accts[1:]:
            acct.weight_bytes += other.weight_bytes
            acct.scale_bytes += other.scale_bytes
            acct.zero_point_bytes += other.zero_point_bytes
            acct.index_bytes += other.index_bytes
            acct.predicted_bytes += other.predicted_bytes
            acct.fp32_bytes += other.fp32_bytes
        return acct
    return _quantize_tensor(node, 1, quant, axis, ctx)


def _quantize_tensor(node: onnx.NodeProto, index: int, quant: WeightQuant, axis: int, ctx: _Context) -> LayerBytes:
    w_name = node.input[index] if len(node.input) > index else ""
    w = _float_initializer(ctx.model, w_name, node)
    if len(quant.bits) != w.shape[axis]:
        raise PlanError(f"layer {node.name!r}: {len(quant.bits)} bit-widths for "
                        f"{w.shape[axis]} output channels (weight {w_name!r} axis {axis})")
    key = (w_name, axis, tuple(quant.bits), quant.scales)
    if key in ctx.dequantized:  # another reader of this weight: the same integers, stored once
        tensor, mixed = ctx.dequantized[key]
        plain = mixed or (not ctx.guard and node.input[0] in ctx.quantized_inputs)
        node.input[index] = tensor if plain else _guard(tensor, list(w.shape), ctx, None)
        counts = Counter(quant.bits)
        logger.debug("layer %s reads the weight %s quantized for another layer", node.name, w_name)
        return LayerBytes(node.name, dict(sorted(counts.items(), reverse=True)), 0, 0, 0, 0, 0.0, 0)
    q, scale = quantize_weight(w, quant.bits, axis, quant.scales)
    bits = np.asarray(quant.bits)
    per_channel = w.size // w.shape[axis]
    acct = LayerBytes(node.name, {}, 0, 0, 0, 0, per_channel * float(bits.sum()) / 8, w.size * 4)
    parts: list[str] = []
    order: list[np.ndarray] = []
    for b in sorted(set(bits.tolist()), reverse=True):
        idx = np.flatnonzero(bits == b)
        parts.append(_dequantize_part(w_name, b, np.take(q, idx, axis), scale[idx], axis, ctx,
                                      acct, offset=not ctx.guard and bool(ctx.quantized_inputs)))
        order.append(idx)
    if len(parts) == 1:
        plain = not ctx.guard and node.input[0] in ctx.quantized_inputs
        out = parts[0] if plain else _guard(parts[0], list(w.shape), ctx, acct)
        ctx.dequantized[key] = (parts[0], False)
    else:
        inverse = np.argsort(np.concatenate(order)).astype(np.int32)
        if np.array_equal(inverse, np.arange(inverse.size)):  # widths contiguous, widest first
            out = ctx.node("Concat", parts, f"{w_name}_dq", axis=axis)
        else:
            cat = ctx.node("Concat", parts, f"{w_name}_concat", axis=axis)
            idx_name = ctx.init(f"{w_name}_order", inverse)
            acct.index_bytes += inverse.nbytes
            out = ctx.node("Gather", [cat, idx_name], f"{w_name}_dq", axis=axis)
        ctx.dequantized[key] = (out, True)
    node.input[index] = out
    ctx.replaced.add(w_name)
    logger.debug("layer %s: bits %s, %d bytes", node.name, acct.bits, acct.total)
    return acct


def _dequantize_part(w_name: str, b: int, q: np.ndarray, scale: np.ndarray, axis: int,
                     ctx: _Context, acct: LayerBytes, offset: bool = False) -> str:
    """One width's packed integers and their DequantizeLinear.

    ``offset`` (8 bits only; the all-8-bit models, whose ``DQ -> layer`` onnxruntime fuses into
    integer kernels): the integers are stored as UINT8 ``q + 128`` with zero point 128, the same
    dequantized values. onnxruntime's x86 kernels for uint8 activations x int8 weights use
    VPMADDUBSW on CPUs without VNNI (AVX2, AVX-512 before Cascade Lake / Zen 4), which saturates
    the int16 sum of two products (255 * 127 * 2 > 32767): measured under
    ``qemu-x86_64 -cpu Haswell``, a W8A8 model's ENABLE_ALL output fell to 22.7 dB SQNR of the
    exact QDQ result (44.1 dB on a VNNI CPU), and INT8 activations with zero point -128 did not
    help. uint8 x uint8 kernels widen to int16 first and do not saturate: 44.1 dB on both. Cost:
    one zero-point byte per output channel (identical vectors are stored once by the lean pass),
    about 8% latency at batch 32 on a VNNI CPU (1.11 -> 1.20 ms, the digits sample, 1 thread)."""
    offset = offset and b == 8
    ml_type = np.uint8 if offset else _SIGNED[b][1]
    stored = (q.astype(np.int16) + 128).astype(np.uint8) if offset else q.astype(ml_type)
    q_name = ctx.init(f"{w_name}_{'uint' if offset else 'int'}{b}", stored)
    s_name = ctx.init(f"{w_name}_scale{b}", scale.astype(np.float32))
    z_name = ctx.init(f"{w_name}_zp{b}", np.full(scale.shape, 128 if offset else 0, dtype=ml_type))
    acct.bits[b] = int(scale.size)
    acct.weight_bytes += _packed_bytes(q.size, b)
    acct.scale_bytes += scale.size * 4
    acct.zero_point_bytes += _packed_bytes(scale.size, b)
    return ctx.node("DequantizeLinear", [q_name, s_name, z_name], f"{w_name}_dq{b}", axis=axis)


def _quantize_embedding(node: onnx.NodeProto, bits: int, ctx: _Context) -> LayerBytes:
    """An embedding table (Gather input 0) as INT-b, one symmetric scale per row (the weights'
    formula with the rows as channels), dequantized whole on axis 0 before the Gather.

    Chosen over ``Gather(int table) -> dequantize the gathered rows``: standard
    DequantizeLinear cannot take a per-gathered-row scale (a Gather of the scales and a Mul would
    be needed, no longer a QDQ pattern), both store the same bytes, and onnxruntime runs
    ``DQ -> Gather`` at every optimisation level (DQ is not constant-folded: the table is
    dequantized on every run, as a mixed layer's weights are). Below 8 bits the DQ output goes
    through the no-op Reshape guard, like a weight."""
    if bits not in WEIGHT_BITS:
        raise PlanError(f"embedding {node.name!r}: bit-width must be in {WEIGHT_BITS}, got {bits}")
    table = _float_initializer(ctx.model, node.input[0], node)
    if table.ndim != 2:
        raise UnsupportedModelError(f"embedding {node.name!r}: table {node.input[0]!r} is not 2-D")
    acct = _quantize_tensor_axis0(node, 0, table, bits, ctx)
    return acct


def _quantize_tensor_axis0(node: onnx.NodeProto, index: int, w: np.ndarray, bits: int, ctx: _Context) -> LayerBytes:
    w_name = node.input[index]
    q, scale = quantize_weight(w, [bits] * w.shape[0], 0)
    acct = LayerBytes(node.name, {}, 0, 0, 0, 0, w.size * bits / 8, w.size * 4)
    out = _dequantize_part(w_name, bits, q, scale, 0, ctx, acct)
    if ctx.guard:
        out = _guard(out, list(w.shape), ctx, acct)
    node.input[index] = out
    ctx.replaced.add(w_name)
    return acct


def _guard(tensor: str, shape: list[int], ctx: _Context, acct: LayerBytes | None) -> str:
    """A no-op Reshape that keeps onnxruntime's QDQ fusions (buggy below 8 bits) away."""
    shape_name = ctx.init(f"{tensor}_shape", np.asarray(shape, dtype=np.int64))
    if acct is not None:
        acct.index_bytes += 8 * len(shape)
    return ctx.node("Reshape", [tensor, shape_name], f"{tensor}_guard")


def _quantize_activation(tensor: str, quant: ActivationQuant, ctx: _Context) -> None:
    graph = ctx.model.graph
    consumers = [n for n in graph.node if tensor in n.input]
    if not consumers and tensor not in {o.name for o in graph.output}:
        raise PlanError(f"activation tensor {tensor!r} is not read by any node of the model")
    if quant.consumers is not None:
        missing = set(quant.consumers) - {n.name for n in consumers}
        if missing:
            raise PlanError(f"activation tensor {tensor!r} is not read by node(s) {sorted(missing)}")
        consumers = [n for n in consumers if n.name in quant.consumers]
    container = quant.bits
    if quant.bits < 8 and _producer_op(graph, tensor) in _PROPAGATING_OPS:
        container = 8  # see _PROPAGATING_OPS
    zp_type = (_SIGNED if quant.signed else _UNSIGNED)[container][1]
    scale = np.float32(quant.scale)
    s_name = ctx.init(f"{tensor}_scale", np.asarray(scale))
    z_name = ctx.init(f"{tensor}_zp", np.zeros((), dtype=zp_type))
    source = tensor
    if quant.signed and quant.bits < 8 and _producer_op(graph, tensor) in ("Relu", "Clip"):
        source = _guard_dynamic(tensor, ctx)
    q = ctx.node("QuantizeLinear", [source, s_name, z_name], f"{tensor}_q")
    dq = ctx.node("DequantizeLinear", [q, s_name, z_name], f"{tensor}_dq")
    if quant.signed:
        dq = _narrow_range(dq, scale * np.float32(2 ** (quant.bits - 1) - 1), ctx)
    elif container != quant.bits:
        dq = _narrow_range(dq, scale * np.float32(2 ** quant.bits - 1), ctx, low=np.float32(0))
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = dq


def _narrow_range(tensor: str, clip: np.float32, ctx: _Context, low: np.float32 | None = None) -> str:
    """Clip the dequantized value to [-clip, clip], clip = qmax * scale (float32).

    A signed QuantizeLinear saturates at -2^(b-1); the quantizer (narrow range, like the
    weights) at -(2^(b-1) - 1). Clipping after DequantizeLinear gives exactly the quantizer's
    values; a Clip *before* QuantizeLinear would do too, but onnxruntime 1.32 (ENABLE_ALL)
    fails to load Clip -> QuantizeLinear(INT2): "Unexpected data type for QuantizeLinear".
    """
    lo = ctx.init(f"{tensor}_clip_min", np.asarray(-clip if low is None else low, dtype=np.float32))
    hi = ctx.init(f"{tensor}_clip_max", np.asarray(clip, dtype=np.float32))
    return ctx.node("Clip", [tensor, lo, hi], f"{tensor}_clipped")


def _guard_dynamic(tensor: str, ctx: _Context) -> str:
    shape = ctx.node("Shape", [tensor], f"{tensor}_shape")
    return ctx.node("Reshape", [tensor, shape], f"{tensor}_guard")


def _float_initializer(model: onnx.ModelProto, name: str, node: onnx.NodeProto) -> np.ndarray:
    init = next((t for t in model.graph.initializer if t.name == name), None)
    if init is None or init.data_type != TensorProto.FLOAT:
        raise UnsupportedModelError(
            f"layer {node.name!r}: weight {name!r} is not a float32 initializer; normalise the "
            "model (fold constants) before quantizing")
    if any(i.name == name for i in model.graph.input):
        raise UnsupportedModelError(f"layer {node.name!r}: weight {name!r} is also a graph input")
    return numpy_helper.to_array(init)


def _drop_unused_initializers(model: onnx.ModelProto, names: Iterable[str]) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = set(names) - used
    keep = [t for t in model.graph.initializer if t.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _producer_op(graph: onnx.GraphProto, tensor: str) -> str | None:
    return next((n.op_type for n in graph.node if tensor in n.output), None)


def _all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}
    names |= {o for n in g.node for o in n.output}
    return names | {v.name for v in g.value_info} | {v.name for v in g.output}


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _preview(names: Iterable[str], limit: int = 5) -> str:
    items = list(names)
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def ensure_opset(model: onnx.ModelProto, needed: int, rtol: float = 1e-5
                 ) -> tuple[onnx.ModelProto, int | None]:
    """A copy of ``model`` at default-domain opset >= ``needed`` (and the IR version it needs).

    Returns the copy and the opset it was up-converted from (None when no conversion was
    needed). An up-conversion is checked in onnxruntime (optimisations off, random inputs)
    against the original to ``rtol``.
    """
    current = _default_opset(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if current >= needed:
        _raise_ir_version(work)
        return work, None
    try:
        work = version_converter.convert_version(work, needed)
    except Exception as exc:  # the converter raises bare RuntimeErrors naming the op
        raise PrunequantError(
            f"cannot up-convert the model from opset {current} to {needed} (needed for the "
            f"requested bit-widths): {_first_line(exc)}; convert it to opset {needed} yourself "
            "or use 8-bit only") from exc
    _raise_ir_version(work)
    _check_conversion(model, work, current, needed, rtol)
    logger.info("up-converted the model from opset %d to %d (IR %d)", current, needed,
                work.ir_version)
    return work, current


def _check_conversion(before: onnx.ModelProto, after: onnx.ModelProto, current: int,
                      needed: int, rtol: float) -> None:
    try:
        ref_session = make_session(before)
        feeds = random_feeds(ref_session)
        ref = ref_session.run(None, feeds)
        got = make_session(after).run(None, feeds)
    except Exception as exc:
        raise VerificationError(
            f"the model up-converted from opset {current} to {needed} does not run in "
            f"onnxruntime: {_first_line(exc)}") from exc
    cmp = compare_outputs(got, ref)
    if not cmp.ok(rtol):
        # newer opsets run other kernels (a 6625-way Softmax, a transformer's LayerNorms:
        # PP-OCRv4 rec moved 1.5e-5): rounding, as normalise bounds it, is the original's own
        # float32 noise under onnxruntime's optimisations times NOISE_FACTOR
        from .normalise import NOISE_FACTOR, noise_floor

        floor = noise_floor(before, feeds, ref)
        bound = max(rtol, NOISE_FACTOR * floor)
        if cmp.ok(bound):
            logger.info("opset %d -> %d: output %d moved by %.3g relative, float rounding (the model's own "
                        "noise floor is %.3g)", current, needed, cmp.worst_output, cmp.max_rel_error, floor)
            return
        ops = sorted({n.op_type for n in after.graph.node})
        raise VerificationError(
            f"up-converting the model from opset {current} to {needed} changed output "
            f"{cmp.worst_output} by {cmp.max_rel_error:.3g} (relative, > {bound:.3g}: rtol {rtol:g}, the "
            f"model's own float32 noise {floor:.3g}); one of "
            f"{', '.join(ops)} converted wrongly; convert the model yourself")


def _raise_ir_version(model: onnx.ModelProto) -> None:
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(default))


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` topologically, keeping the existing order where it is valid."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer[r] for r in set(node.input) | subgraph_references(node)
                if r in producer and producer[r] != i}
        pending[i] = len(deps)
        for j in deps:
            users[j].append(i)
    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise PrunequantError(f"graph {graph.name!r} has a cycle; cannot order its nodes")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def compact(result: QdqResult) -> QdqResult:
    """Make ``result.model`` leaner, exactly (the same values at every onnxruntime level):

    * a weight's DequantizeLinear drops its all-zero zero point (optional in ONNX: 0 of the
      integer input's type), and the accounting's zero-point bytes go with it;
    * a weight's no-op guard ``Reshape`` reads a shape of zeros (0: copy that dimension), one
      tensor per rank instead of one per layer;
    * identical initializers (same type, shape and bytes: the activations' scalar zero points,
      equal scales, shapes) become one;
    * every tensor and node that is not a graph input or output, a packed integer weight or a
      graph input's quantizer's scale or zero point gets a short name (base 36).

    Models with subgraphs (If/Loop/Scan) or local functions keep their names (an outer name may
    be read inside a body); the other steps still apply where no body reads the tensor."""
    model = result.model
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inner = set().union(*(subgraph_references(n) for n in g.node)) if g.node else set()
    fixed = {v.name for v in g.input} | {v.name for v in g.output} | inner
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    dropped_zp: set[str] = set()
    for n in g.node:
        if (n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[0] in inits
                and n.input[2] in inits and n.input[2] not in fixed
                and not np.any(numpy_helper.to_array(inits[n.input[2]]).astype(np.int32))):
            dropped_zp.add(n.input[0])
            del n.input[2]
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) != 2 or n.input[1] not in inits or n.input[1] in fixed:
            continue
        src = producer.get(n.input[0])
        if src is None or src.op_type != "DequantizeLinear" or src.input[0] not in inits:
            continue
        if uses.get(n.input[1], 0) != 1 or list(numpy_helper.to_array(inits[n.input[1]])) != list(inits[src.input[0]].dims):
            continue
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.zeros(len(inits[src.input[0]].dims), np.int64),
                                                           n.input[1]))
    _drop_unused_initializers(model, [t.name for t in g.initializer if t.name not in fixed])
    _dedupe_initializers(g, fixed)
    if not inner and not model.functions:
        # the packed integer weights keep their names (the layer's weight name and width), so a
        # layer's weights can still be found in the file; everything else gets a short name
        # so do a graph input's quantizer's scale and zero point (named after the input; a
        # message about a type a runtime cannot read, plugin.runtimes, then names the input)
        packed = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
        graph_inputs = {v.name for v in g.input}
        input_params = {i for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in graph_inputs
                        for i in n.input[1:] if i in inits}
        _short_names(g, fixed | packed | input_params)
    if dropped_zp:  # the weights' zero points (all zeros, written by _dequantize_part) are gone
        for layer in result.layers.values():
            layer.zero_point_bytes = 0
    result.model = model
    return result


def _dedupe_initializers(g: onnx.GraphProto, fixed: set[str]) -> None:
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for t in g.initializer:
        if t.name in fixed or t.data_location == TensorProto.EXTERNAL:
            continue
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in first:
            alias[t.name] = first[key]
        else:
            first[key] = t.name
    if not alias:
        return
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in alias:
                n.input[k] = alias[i]
    keep = [t for t in g.initializer if t.name not in alias]
    del g.initializer[:]
    g.initializer.extend(keep)


def _short_names(g: onnx.GraphProto, fixed: set[str]) -> None:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    counter = [0]

    def fresh() -> str:
        while True:
            k, out = counter[0], ""
            counter[0] += 1
            while True:
                out = digits[k % 36] + out
                k //= 36
                if not k:
                    break
            if out not in fixed:
                return out

    new: dict[str, str] = {}
    for t in g.initializer:
        if t.name not in fixed:
            new[t.name] = fresh()
    for n in g.node:
        for o in n.output:
            if o and o not in fixed and o not in new:
                new[o] = fresh()
    for t in g.initializer:
        t.name = new.get(t.name, t.name)
    for v in g.value_info:
        v.name = new.get(v.name, v.name)
    for n in g.node:
        n.input[:] = [new.get(i, i) for i in n.input]
        n.output[:] = [new.get(o, o) for o in n.output]
        n.name = n.output[0] if n.output and n.output[0] else fresh()


__all__ = ["ActivationQuant", "compact", "LayerBytes", "QdqResult", "WeightQuant", "ensure_opset",
           "insert_qdq", "quantize_weight", "topological_sort", "weight_axis"]
