"""Models prunequant cannot find weights in as they are: already-quantized models, and weights
that sit inside control flow. Both used to analyse to "0 weight layers" and exit 0.

* :func:`dequantize`: a model quantized by onnxruntime keeps its weights as integers behind
  integer ops, which no rule and no bridge converter reads. The patterns onnxruntime's quantizer
  writes are rewritten back to the float model they came from, with dequantized weights
  ``w = (w_int - w_zero_point) * w_scale`` (per tensor, or per output channel):

  - dynamic quantization: ``DynamicQuantizeLinear(x)`` -> ``ConvInteger`` / ``MatMulInteger``
    -> [``Add`` of the integer bias ``Cast(Floor(b / (x_scale * w_scale)))``, older quantizers]
    -> ``Cast(float)`` -> ``Mul(x_scale * w_scale)`` becomes ``Conv(x, w, b)`` / ``MatMul(x, w)``
    on the original float activation ``x``;
  - ``com.microsoft::DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias)`` (onnxruntime's
    fusion of the above) becomes ``MatMul`` (+ ``Add`` of the bias);
  - ``com.microsoft::DynamicQuantizeLSTM`` (X, W, R, B, sequence_lens, initial_h, initial_c, P,
    W_scale, W_zero_point, R_scale, R_zero_point; W is ``[dirs, input, 4*hidden]`` and R
    ``[dirs, hidden, 4*hidden]``, the transposes of ONNX LSTM's; scales and zero points per
    direction, or per gate column ``[dirs, 4*hidden]``) becomes ``LSTM`` with the dequantized,
    transposed W and R;
  - static QDQ weights, ``DequantizeLinear`` of an integer initializer, become float initializers;
    an activation's ``QuantizeLinear`` -> ``DequantizeLinear`` pair (one constant scale and zero
    point) becomes ``Clip(x, scale * (qmin - zp), scale * (qmax - zp))``: the range the original
    saturates to (onnxruntime's QDQ quantizer drops a Relu whose range the pair implies), without
    the rounding.

  Anything else quantized (``QLinearConv``, ``QLinearMatMul``, ``QGemm``, ...; a pattern that
  does not match the above) is refused in one line naming the ops.

  **Verification** (``verify=True``), on random check inputs, per rewritten layer, against the
  original quantized model. The float model drops the activations' dynamic quantization, so it
  cannot equal the original; the tolerance is what that quantization may change, derived from the
  scales the original computed:

  - Conv / MatMul: the original quantizes its input ``x`` with ``x_scale = range(x) / 255``; one
    input element moves by at most ``x_scale`` (half a step of rounding plus half a step for the
    rounded zero point at the range's ends), so an output of channel ``c`` moves by at most
    ``x_scale * L1(w_c)`` (``L1``: the sum of ``|w|`` over the channel's receptive field, ``w`` the
    dequantized weight, which carries the weight scale), plus ``x_scale * w_scale_c`` when the
    bias was floored to the integer accumulator, plus float32 accumulation rounding. The layer is
    also run on the *dequantized* input ``(x_q - x_zero_point) * x_scale`` (the original's own
    arithmetic), where only the bias and float32 rounding remain: that tight check is what pins
    the weights, zero points and attributes down exactly.
  - LSTM: the original quantizes X and, at every step, h. Over a whole sequence a rigorous bound
    grows with the recurrence (an error in h re-enters through R), so the check is per step:
    the original op and the float LSTM each take one step from the original's own state
    ``(x_t, h_{t-1}, c_{t-1})``; a gate's pre-activation moves by at most
    ``d = s_x * L1(W_row) + s_h * L1(R_row)`` (``s_x``, ``s_h``: the steps of ``x_t`` and
    ``h_{t-1}`` over their ranges), the sigmoid gates by ``d / 4``, the cell candidate by ``d``,
    so ``|dc| <= df * |c_{t-1}| + di + dg`` and ``|dh| <= do + |dc|`` (with peepholes, ``do``
    includes ``|p_o| * dc / 4``). Each step also runs on the original's own quantization of
    ``x_t`` and ``h_{t-1}`` (DynamicQuantizeLinear + DequantizeLinear in front of the float LSTM,
    batch 1), where only float32 rounding remains: that pins the weights down. Default
    activations only.

  - QDQ activation pairs: the Clip differs from the original's quantize-dequantize by the
    rounding alone, at most half a step (``scale / 2``) per element.

  The whole float model's difference to the original on the same inputs is recorded
  (``output_rel_error``), not bounded: it is the accumulated effect of all the activation
  quantization the float model no longer applies.
* :func:`refuse_quantized`: the one-line refusal for quantized ops that are left.
* :func:`require_weight_layers`: when the analysis finds no weight layer but the model holds
  float weights, say where they are (inside ``If`` / ``Loop`` / ``Scan`` bodies, or read by ops
  without a rule) in one line, instead of reporting an empty analysis.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .eliminate_dead_nodes import EliminateDeadNodesPass
from .errors import UnsupportedModelError, VerificationError
from .fold_utils import constant_initializers, subgraphs, unique_name

logger = logging.getLogger(__name__)

#: ops that compute on quantized integers (onnxruntime's quantizer writes them)
QUANTIZED_OPS = frozenset({
    "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QGemm", "QAttention", "QEmbedLayerNormalization",
    "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QOrderedMatMul",
})
#: a float initializer at least this large (and at least 2-D) counts as a weight
MIN_WEIGHT_ELEMENTS = 64
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_EPS32 = float(np.finfo(np.float32).eps)
_LSTM_DEFAULT_ACTIVATIONS = (b"Sigmoid", b"Tanh", b"Tanh")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _nodes(sub)


def quantized_ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in _nodes(model.graph) if n.op_type in QUANTIZED_OPS)


def refuse_quantized(model: onnx.ModelProto, why: str = "") -> None:
    """Raise UnsupportedModelError naming the quantized ops when the model has any."""
    ops = quantized_ops(model)
    if not ops:
        return
    listed = ", ".join(f"{n} {op}" for op, n in ops.most_common())
    raise UnsupportedModelError(
        f"the model is quantized with ops prunequant cannot turn back into float ({listed}"
        f"{'; ' + why if why else ''}): it rewrites onnxruntime's dynamic quantization (DynamicQuantizeLinear + "
        "ConvInteger/MatMulInteger, DynamicQuantizeLSTM) and QDQ weights only; give it the float model this one "
        "was quantized from")


# --------------------------------------------------------------------------------------------
# dequantize


@dataclass
class LayerCheck:
    """One rewritten layer's verification against the original (see the module docstring).

    ``error`` / ``bound``: the float layer on the float input vs the original's output, and the
    bound the activation quantization allows; ``emulated_error`` / ``emulated_bound``: the float
    layer on the original's dequantized input (Conv/MatMul) -- float32 and bias rounding only."""

    node: str
    op: str
    weight: str
    per_channel: bool
    error: float = 0.0
    bound: float = 0.0
    emulated_error: float | None = None
    emulated_bound: float | None = None

    @property
    def ok(self) -> bool:
        return self.error <= self.bound and (self.emulated_error is None or self.emulated_error <= self.emulated_bound)


@dataclass
class DequantizeResult:
    """The float model, what was rewritten (original op -> count), and the checks."""

    model: onnx.ModelProto
    rewritten: dict[str, int]
    checks: list[LayerCheck] = field(default_factory=list)
    output_rel_error: float | None = None  # the whole float model vs the original, not bounded

    def summary(self) -> str:
        done = ", ".join(f"{n} {op}" for op, n in self.rewritten.items())
        text = f"dequantized to float ({done})"
        if self.checks:
            worst = max(c.error / c.bound if c.bound else 0.0 for c in self.checks)
            text += (f"; verified against the original within the quantization it applied ({len(self.checks)} "
                     f"rewrites, worst {worst:.2f} of the bound)")
        if self.output_rel_error is not None:
            text += f"; outputs differ from the quantized original by {self.output_rel_error:.2g} relative"
        return text


@dataclass
class _Integer:
    """A matched ConvInteger / MatMulInteger layer."""

    op: str
    node: onnx.NodeProto  # the integer op
    dql: onnx.NodeProto | None  # the DynamicQuantizeLinear of its input (None: the op quantizes it itself)
    output: str  # the float output of the scale Mul: the new layer's output
    weight: np.ndarray  # dequantized, float32
    weight_name: str
    w_scale: np.ndarray  # per output channel (broadcast), float32
    bias: np.ndarray | None  # float bias folded from the integer bias Add (or DynamicQuantizeMatMul's), or None
    int_bias: bool
    x: str = ""  # the float input

    def __post_init__(self) -> None:
        self.x = self.x or (self.dql.input[0] if self.dql is not None else "")


@dataclass
class _Lstm:
    node: onnx.NodeProto
    w: np.ndarray  # [dirs, 4H, input], float32
    r: np.ndarray  # [dirs, 4H, hidden]
    w_name: str
    r_name: str


def dequantize(model: onnx.ModelProto, verify: bool = True, seed: int = 0) -> DequantizeResult | None:
    """The float model behind an already-quantized one (see the module docstring), or None when
    ``model`` has nothing quantized. ``model`` is not modified.

    Raises UnsupportedModelError (one line naming the ops) when quantized ops are left that this
    does not rewrite, and VerificationError when a rewritten layer is outside its bound."""
    weights_dq = _dq_weights(model)
    pairs = _qdq_pairs(model)
    if not quantized_ops(model) and not weights_dq and not pairs:
        return None
    inside = Counter(n.op_type for node in model.graph.node for sub in subgraphs(node)
                     for n in _nodes(sub) if n.op_type in QUANTIZED_OPS)
    if inside:
        refuse_quantized(model, "inside control flow")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    consts = {k: numpy_helper.to_array(v) for k, v in constant_initializers(work).items()}
    producers = {o: n for n in work.graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in work.graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in work.graph.output}
    taken = {t.name for t in work.graph.initializer} | set(producers) | {i.name for i in work.graph.input}

    integer: list[_Integer] = []
    lstms: list[_Lstm] = []
    reasons: list[str] = []
    positions = {o: i for i, n in enumerate(work.graph.node) for o in n.output if o}
    lstm_at: list[int] = []
    for index, node in enumerate(work.graph.node):
        if node.domain in ("", "ai.onnx") and node.op_type in ("ConvInteger", "MatMulInteger"):
            found = _match_integer(node, producers, consumers, outputs, consts, taken)
        elif node.domain == "com.microsoft" and node.op_type == "DynamicQuantizeMatMul":
            found = _match_dq_matmul(node, consts, taken)
        elif node.domain == "com.microsoft" and node.op_type == "DynamicQuantizeLSTM":
            found = _match_lstm(node, consts, taken)
        else:
            continue
        if isinstance(found, str):
            reasons.append(found)
        elif isinstance(found, _Integer):
            integer.append(found)
        else:
            lstms.append(found)
            lstm_at.append(index)

    rewritten: Counter[str] = Counter()
    new_inits: list[onnx.TensorProto] = []
    replace: dict[int, list[onnx.NodeProto]] = {}  # index of the node to replace -> float nodes
    for m in integer:
        inputs = [m.x, m.weight_name]
        if m.bias is not None:
            bias_name = unique_name(f"{m.weight_name}_bias", taken)
            taken.add(bias_name)
            new_inits.append(numpy_helper.from_array(m.bias, bias_name))
            inputs.append(bias_name)
        new_inits.append(numpy_helper.from_array(m.weight, m.weight_name))
        op = "Conv" if m.op == "ConvInteger" else "MatMul"
        name = unique_name(_float_name(m.node, op), taken)
        taken.add(name)
        if op == "MatMul" and m.bias is not None:  # DynamicQuantizeMatMul's bias: MatMul + Add
            product = unique_name(f"{name}_product", taken)
            taken.add(product)
            replace[positions[m.output]] = [helper.make_node("MatMul", inputs[:2], [product], name=name),
                                            helper.make_node("Add", [product, inputs[2]], [m.output],
                                                             name=unique_name(f"{name}_bias", taken))]
        else:
            float_node = helper.make_node(op, inputs, [m.output], name=name)
            if op == "Conv":
                float_node.attribute.extend(m.node.attribute)
            replace[positions[m.output]] = [float_node]
        rewritten[m.op] += 1
    for m, index in zip(lstms, lstm_at):
        new_inits += [numpy_helper.from_array(m.w, m.w_name), numpy_helper.from_array(m.r, m.r_name)]
        ins = list(m.node.input[:8])
        ins[1:3] = [m.w_name, m.r_name]
        while ins and not ins[-1]:
            ins.pop()
        float_node = helper.make_node("LSTM", ins, list(m.node.output), name=unique_name(_float_name(m.node, "LSTM"), taken))
        taken.add(float_node.name)
        float_node.attribute.extend(a for a in m.node.attribute if a.name in _LSTM_ATTRIBUTES)
        replace[index] = [float_node]
        rewritten["DynamicQuantizeLSTM"] += 1
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 13)
    for pair in pairs:
        for index in pair.dq:
            replace[index] = [_clip_node(work.graph.node[index], pair, opset, taken, new_inits)]
    if pairs:
        rewritten["QuantizeLinear/DequantizeLinear (activations)"] += len(pairs)
    nodes = [r for i, n in enumerate(work.graph.node) for r in replace.get(i, [n])]  # by index: before any removal
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    folded = _fold_dq_weights(work, weights_dq, new_inits)
    if folded:
        rewritten["DequantizeLinear (weights)"] += folded
    work.graph.initializer.extend(new_inits)
    dql_before = sum(n.op_type == "DynamicQuantizeLinear" for n in work.graph.node)
    work = EliminateDeadNodesPass()(work).model
    dql_removed = dql_before - sum(n.op_type == "DynamicQuantizeLinear" for n in work.graph.node)
    if dql_removed:
        rewritten["DynamicQuantizeLinear"] += dql_removed
    _ensure_lstm_opset(work, bool(lstms))
    if quantized_ops(work):
        refuse_quantized(work, reasons[0] if reasons else "")
    result = DequantizeResult(work, dict(rewritten))
    if verify and (integer or lstms or pairs):
        _verify(model, result, integer, lstms, pairs, seed)
    logger.warning("%s", result.summary())
    return result


_LSTM_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
                    "input_forget"}


def _float_name(node: onnx.NodeProto, op: str) -> str:
    """The float layer's name: the quantizer's ``<name>_quant`` gives ``<name>`` back."""
    name = node.name[: -len("_quant")] if node.name.endswith("_quant") else node.name
    return name or op


def _single_consumer(name: str, consumers: dict, outputs: set[str]) -> onnx.NodeProto | None:
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and name not in outputs else None


def _match_integer(node: onnx.NodeProto, producers: dict, consumers: dict, outputs: set[str],
                   consts: dict[str, np.ndarray], taken: set[str]) -> _Integer | str:
    label = f"{node.op_type} {node.name!r}"
    ins = list(node.input) + [""] * (4 - len(node.input))
    x_q, w_q, x_zp, w_zp = ins[:4]
    dql = producers.get(x_q)
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or dql.output[0] != x_q or x_zp != dql.output[2]:
        return f"{label} reads no DynamicQuantizeLinear output as its first input"
    if w_q not in consts or not np.issubdtype(consts[w_q].dtype, np.integer):
        return f"{label} has no integer initializer as its weight"
    w_int = consts[w_q]
    zp = consts[w_zp] if w_zp else np.zeros((), w_int.dtype)
    if w_zp and w_zp not in consts:
        return f"{label}: its weight zero point is not a constant"
    x_scale = dql.output[1]
    channels = w_int.shape[0] if node.op_type == "ConvInteger" else (w_int.shape[-1] if w_int.ndim == 2 else -1)
    if channels < 0:
        return f"{label}: its weight is not 2-D"
    step = _single_consumer(node.output[0], consumers, outputs)
    bias = None
    bias_scale = None
    if step is not None and step.op_type == "Add":
        other = step.input[1] if step.input[0] == node.output[0] else step.input[0]
        found = _match_int_bias(other, producers, consts, x_scale)
        if found is None or node.op_type != "ConvInteger":
            return f"{label}: the integer Add after it is not a bias onnxruntime's quantizer writes"
        bias, bias_scale = found
        step = _single_consumer(step.output[0], consumers, outputs)
    if step is None or step.op_type != "Cast" or _attr(step, "to") != onnx.TensorProto.FLOAT:
        return f"{label}: its output is not cast to float once"
    mul = _single_consumer(step.output[0], consumers, outputs)
    if mul is None or mul.op_type != "Mul":
        return f"{label}: its float output is not scaled by one Mul"
    scale_name = mul.input[1] if mul.input[0] == step.output[0] else mul.input[0]
    w_scale = _scale_of(scale_name, producers, consts, x_scale)
    if w_scale is None:
        return f"{label}: its output scale is not x_scale * a constant weight scale"
    if w_scale.size not in (1, channels) or zp.size not in (1, channels):
        return f"{label}: weight scale / zero point sizes {w_scale.size} / {zp.size} fit neither per tensor nor {channels} channels"
    if bias_scale is not None and not np.array_equal(bias_scale, w_scale):
        return f"{label}: its bias is quantized with another weight scale"
    if bias is not None and bias.size != channels:
        return f"{label}: its bias has {bias.size} values for {channels} channels"
    shape = (-1,) + (1,) * (w_int.ndim - 1) if node.op_type == "ConvInteger" else (-1,)
    scale = w_scale.astype(np.float32).reshape(shape) if w_scale.size > 1 else w_scale.astype(np.float32).reshape(())
    zero = zp.astype(np.float32).reshape(shape) if zp.size > 1 else zp.astype(np.float32).reshape(())
    weight = ((w_int.astype(np.float32) - zero) * scale).astype(np.float32)
    name = w_q[: -len("_quantized")] if w_q.endswith("_quantized") and w_q[: -len("_quantized")] not in taken else ""
    name = name or unique_name(f"{w_q}_dequantized", taken)
    taken.add(name)
    per_channel = np.broadcast_to(w_scale.astype(np.float32).reshape(-1), (channels,)).copy()
    return _Integer(node.op_type, node, dql, mul.output[0], weight, name, per_channel,
                    None if bias is None else bias.astype(np.float32).reshape(-1), bias is not None)


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _match_dq_matmul(node: onnx.NodeProto, consts: dict[str, np.ndarray], taken: set[str]) -> _Integer | str:
    """``com.microsoft::DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias)``: A float, quantized
    inside the op as DynamicQuantizeLinear does; B an integer [K, N] constant."""
    label = f"DynamicQuantizeMatMul {node.name!r}"
    ins = list(node.input) + [""] * (5 - len(node.input))
    a, b, b_scale, b_zp, bias = ins[:5]
    if b not in consts or not np.issubdtype(consts[b].dtype, np.integer) or consts[b].ndim != 2:
        return f"{label} has no 2-D integer initializer as B"
    if b_scale not in consts or (b_zp and b_zp not in consts) or (bias and bias not in consts):
        return f"{label}: its scale, zero point or bias is not constant"
    w_int, channels = consts[b], consts[b].shape[1]
    scale = consts[b_scale].astype(np.float32).reshape(-1)
    zp = consts[b_zp].reshape(-1) if b_zp else np.zeros(1, w_int.dtype)
    if scale.size not in (1, channels) or zp.size not in (1, channels):
        return f"{label}: b_scale / b_zero_point sizes {scale.size} / {zp.size} fit neither per tensor nor {channels} columns"
    weight = ((w_int.astype(np.float32) - zp.astype(np.float32)) * scale).astype(np.float32)
    name = b[: -len("_quantized")] if b.endswith("_quantized") and b[: -len("_quantized")] not in taken else ""
    name = name or unique_name(f"{b}_dequantized", taken)
    taken.add(name)
    return _Integer("DynamicQuantizeMatMul", node, None, node.output[0], weight, name,
                    np.broadcast_to(scale, (channels,)).copy(),
                    consts[bias].astype(np.float32).reshape(-1) if bias else None, False, x=a)


def _dynamic_quantize_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "dql",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, None),
                               helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", onnx.TensorProto.UINT8, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _scale_of(name: str, producers: dict, consts: dict, x_scale: str) -> np.ndarray | None:
    """The constant weight scale in ``name = Mul(x_scale, w_scale)`` (either order)."""
    mul = producers.get(name)
    if mul is None or mul.op_type != "Mul" or x_scale not in mul.input:
        return None
    other = mul.input[1] if mul.input[0] == x_scale else mul.input[0]
    value = consts.get(other)
    return None if value is None or not np.issubdtype(value.dtype, np.floating) else value


def _match_int_bias(name: str, producers: dict, consts: dict, x_scale: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``[Reshape](Cast(int32)(Floor|Round(Div(b, Mul(x_scale, w_scale)))))``: (b, w_scale)."""
    node = producers.get(name)
    if node is not None and node.op_type == "Reshape":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Cast":
        return None
    node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Floor", "Round"):
        return None
    div = producers.get(node.input[0])
    if div is None or div.op_type != "Div" or div.input[0] not in consts:
        return None
    w_scale = _scale_of(div.input[1], producers, consts, x_scale)
    return None if w_scale is None else (consts[div.input[0]], w_scale)


def _match_lstm(node: onnx.NodeProto, consts: dict[str, np.ndarray], taken: set[str]) -> _Lstm | str:
    label = f"DynamicQuantizeLSTM {node.name!r}"
    ins = list(node.input) + [""] * (12 - len(node.input))
    names = {"W": ins[1], "R": ins[2], "W_scale": ins[8], "W_zero_point": ins[9], "R_scale": ins[10],
             "R_zero_point": ins[11]}
    missing = [k for k, v in names.items() if k.endswith("zero_point") and v and v not in consts
               or not k.endswith("zero_point") and v not in consts]
    if missing:
        return f"{label}: {', '.join(missing)} not constant"
    acts = next((a for a in node.attribute if a.name == "activations"), None)
    if acts is not None and tuple(s.lower() for s in acts.strings) != tuple(
            s.lower() for s in _LSTM_DEFAULT_ACTIVATIONS * (len(acts.strings) // 3)):
        return f"{label}: activations {[s.decode() for s in acts.strings]} (only the default ones are dequantized)"
    out = []
    for key in ("W", "R"):
        q = consts[names[key]]
        dirs, _, cols = q.shape
        scale = consts[names[f"{key}_scale"]].astype(np.float32)
        zp = consts[names[f"{key}_zero_point"]] if names[f"{key}_zero_point"] else np.zeros((), q.dtype)
        if scale.size not in (dirs, dirs * cols) or zp.size not in (1, dirs, dirs * cols):
            return f"{label}: {key}_scale of {scale.size} values fits neither {dirs} directions nor {dirs}x{cols} columns"
        scale = scale.reshape(dirs, 1, -1)
        zero = zp.astype(np.float32).reshape(dirs, 1, -1) if zp.size > 1 else zp.astype(np.float32).reshape(())
        value = ((q.astype(np.float32) - zero) * scale).astype(np.float32).transpose(0, 2, 1)  # ONNX LSTM layout
        base = names[key][: -len("_quantized")] if names[key].endswith("_quantized") else f"{names[key]}_float"
        name = unique_name(base, taken)
        taken.add(name)
        out.append((np.ascontiguousarray(value), name))
    (w, w_name), (r, r_name) = out
    return _Lstm(node, w, r, w_name, r_name)


def _dq_weights(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes of the main graph whose inputs are all constant initializers."""
    consts = constant_initializers(model)
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx", "com.microsoft")
            and n.input and all(not i or i in consts for i in n.input)
            and consts[n.input[0]].data_type not in _FLOATS]


def _fold_dq_weights(work: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: list) -> int:
    """Replace DequantizeLinear-of-constants by float initializers, computed by onnxruntime (its
    own semantics: per-axis, blocked, every integer type)."""
    if not nodes:
        return 0
    from .ort_utils import make_session

    consts = constant_initializers(work)
    names = {n.output[0] for n in nodes}
    opsets = list(work.opset_import)
    graph = helper.make_graph(
        [n for n in nodes], "dq", [], [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in names],
        [consts[i] for i in {i for n in nodes for i in n.input if i}])
    tiny = helper.make_model(graph, opset_imports=opsets, ir_version=work.ir_version)
    session = make_session(tiny)
    order = [o.name for o in session.get_outputs()]
    values = dict(zip(order, session.run(None, {})))
    keep = [n for n in work.graph.node if n.output[0] not in names or n.op_type != "DequantizeLinear"]
    del work.graph.node[:]
    work.graph.node.extend(keep)
    new_inits.extend(numpy_helper.from_array(values[o], o) for o in sorted(names))
    return len(names)


@dataclass
class _Pair:
    """``DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)`` on an activation: in float, ``Clip(x,
    s * (qmin - zp), s * (qmax - zp))`` up to half a step of rounding."""

    x: str
    dq: list[int]  # indices of the DequantizeLinear nodes reading the QuantizeLinear
    outputs: list[str]
    low: float
    high: float
    scale: float


_INT_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
               onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
               onnx.TensorProto.INT32: (-2 ** 31, 2 ** 31 - 1)}


def _qdq_pairs(model: onnx.ModelProto) -> list[_Pair]:
    """Activation QuantizeLinear -> DequantizeLinear pairs with one constant float32 scale and
    integer zero point (the same on both sides), read by DequantizeLinear nodes only."""
    consts = constant_initializers(model)
    graph = model.graph
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        params = list(node.input[1:3])
        scale_t = consts.get(params[0])
        zp_t = consts.get(params[1]) if len(params) > 1 and params[1] else None
        if scale_t is None or scale_t.data_type != onnx.TensorProto.FLOAT or math.prod(scale_t.dims) != 1:
            continue
        if len(params) > 1 and params[1] and zp_t is None:
            continue
        kind = zp_t.data_type if zp_t is not None else onnx.TensorProto.UINT8
        if kind not in _INT_RANGES or math.prod(zp_t.dims if zp_t is not None else []) != 1:
            continue
        q = node.output[0]
        users = readers.get(q, [])
        if not users or q in outputs:
            continue
        scale = float(numpy_helper.to_array(scale_t).reshape(-1)[0])
        zero = int(numpy_helper.to_array(zp_t).reshape(-1)[0]) if zp_t is not None else 0
        same = True
        for index in users:
            user = graph.node[index]
            if user.op_type != "DequantizeLinear" or user.input[0] != q:
                same = False
                break
            u_scale = consts.get(user.input[1]) if len(user.input) > 1 else None
            u_zp = consts.get(user.input[2]) if len(user.input) > 2 and user.input[2] else None
            if (u_scale is None or float(numpy_helper.to_array(u_scale).reshape(-1)[0]) != scale
                    or math.prod(u_scale.dims) != 1
                    or (int(numpy_helper.to_array(u_zp).reshape(-1)[0]) if u_zp is not None else 0) != zero):
                same = False
                break
        if not same or scale <= 0:
            continue
        qmin, qmax = _INT_RANGES[kind]
        pairs.append(_Pair(node.input[0], users, [graph.node[i].output[0] for i in users],
                           scale * (qmin - zero), scale * (qmax - zero), scale))
    return pairs


def _clip_node(dq_node: onnx.NodeProto, pair: _Pair, opset: int, taken: set[str], new_inits: list) -> onnx.NodeProto:
    name = unique_name(f"{dq_node.name or pair.x}_range", taken)
    taken.add(name)
    if opset < 11:
        return helper.make_node("Clip", [pair.x], [dq_node.output[0]], name=name, min=pair.low, max=pair.high)
    low, high = unique_name(f"{name}_min", taken), unique_name(f"{name}_max", taken)
    taken.update((low, high))
    new_inits += [numpy_helper.from_array(np.array(pair.low, np.float32), low),
                  numpy_helper.from_array(np.array(pair.high, np.float32), high)]
    return helper.make_node("Clip", [pair.x, low, high], [dq_node.output[0]], name=name)


def _check_pair(pair: _Pair, captured: dict[str, np.ndarray]) -> LayerCheck:
    """The Clip against the original's quantize-dequantize: half a step of rounding at most."""
    x = captured[pair.x].astype(np.float64)
    clipped = np.clip(x, pair.low, pair.high)
    error = max((float(np.max(np.abs(clipped - captured[o]), initial=0.0)) for o in pair.outputs), default=0.0)
    bound = pair.scale / 2 * (1 + 1e-4) + 4 * _EPS32 * float(np.max(np.abs(clipped), initial=0.0))
    return LayerCheck(node=pair.outputs[0], op="QuantizeLinear/DequantizeLinear", weight="", per_channel=False,
                      error=error, bound=bound)


def _ensure_lstm_opset(model: onnx.ModelProto, needed: bool) -> None:
    if not needed:
        return
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 7)
            return
    model.opset_import.append(helper.make_opsetid("", 13))


# --------------------------------------------------------------------------------------------
# verification


def _verify(original: onnx.ModelProto, result: DequantizeResult, integer: list[_Integer], lstms: list[_Lstm],
            pairs: list[_Pair], seed: int) -> None:
    from .ort_utils import compare_outputs, make_session, random_feeds

    copy = _unsaturating(original)
    try:
        session = make_session(copy)
        original = copy
    except Exception:  # noqa: BLE001 - onnxruntime raises several unrelated types
        logger.debug("the uint8 copy of the quantized model does not load; verifying against the model itself")
        session = make_session(original)
    try:
        feeds = random_feeds(session, seed=seed)
    except ValueError as exc:
        raise UnsupportedModelError(f"cannot verify the dequantized model: {exc}") from exc
    wanted: dict[str, int] = {}
    for m in integer:
        wanted[m.x] = onnx.TensorProto.FLOAT
        wanted[m.output] = onnx.TensorProto.FLOAT
        if m.dql is not None:
            wanted[m.dql.output[0]] = onnx.TensorProto.UINT8
            wanted[m.dql.output[1]] = onnx.TensorProto.FLOAT
            wanted[m.dql.output[2]] = onnx.TensorProto.UINT8
    for m in lstms:
        for name in [m.node.input[0], *m.node.input[5:7], *m.node.output]:
            if name:
                wanted[name] = onnx.TensorProto.FLOAT
    for pair in pairs:
        for name in [pair.x, *pair.outputs]:
            wanted[name] = onnx.TensorProto.FLOAT
    captured = _capture(original, feeds, wanted)
    result.checks.extend(_check_pair(pair, captured) for pair in pairs)
    opset = next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for m in integer:
        result.checks.append(_check_integer(m, captured, opset))
    for m in lstms:
        result.checks.append(_check_lstm(m, captured, original, opset))
    try:
        got = make_session(result.model).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise VerificationError(f"the dequantized model does not run in onnxruntime: {str(exc).splitlines()[0]}") from exc
    result.output_rel_error = compare_outputs(got, session.run(None, feeds)).max_rel_error
    bad = [c for c in result.checks if not c.ok]
    if bad:
        c = bad[0]
        detail = (f"error {c.error:.3g} > bound {c.bound:.3g}" if c.error > c.bound
                  else f"on its own dequantized input error {c.emulated_error:.3g} > {c.emulated_bound:.3g}")
        raise VerificationError(
            f"dequantizing {c.op} into {c.node!r} (weight {c.weight!r}) changed its output beyond what the original's "
            f"quantization allows ({detail}); {len(bad)} of {len(result.checks)} layers fail: give prunequant the "
            "float model")


#: integer ops whose int8 weight onnxruntime may multiply with saturation: (domain, op) ->
#: (weight, zero point, scale) input indices (the scale gives an absent zero point's shape;
#: None: a scalar)
_INT8_WEIGHTS = {("", "ConvInteger"): ((1, 3, None),), ("", "MatMulInteger"): ((1, 3, None),),
                 ("com.microsoft", "DynamicQuantizeMatMul"): ((1, 3, 2),),
                 ("com.microsoft", "DynamicQuantizeLSTM"): ((1, 9, 8), (2, 11, 10))}


def _to_uint8(q: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 integers and zero point as uint8 ``q + 128`` and ``zp + 128``: every ``q - zp`` the same."""
    return ((q.astype(np.int16) + 128).astype(np.uint8), (zp.astype(np.int16) + 128).astype(np.uint8))


def _unsaturating(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the int8 weights of its integer ops stored as uint8 (:func:`_to_uint8`): the
    same integer arithmetic by the ONNX definitions, but not the same in onnxruntime on an x86
    CPU without VNNI (AVX2, AVX-512 before Cascade Lake / Zen 4), whose uint8 x int8 kernels
    (VPMADDUBSW) saturate the int16 sum of two products (255 * 127 * 2 > 32767); its uint8 x
    uint8 kernels widen first and are exact. Measured under ``qemu-x86_64 -cpu Haswell``: a
    MatMulInteger of 255s by 127s gave 1,048,544 for 2,072,640. The verification compares the
    float layers with the original's *defined* arithmetic, so it runs this copy (``model`` itself
    when the copy does not load, :func:`_verify`; ``model`` when nothing changes)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    g = work.graph
    inits = {t.name: t for t in g.initializer}
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    changed = False
    for node in g.node:
        for w_i, z_i, s_i in _INT8_WEIGHTS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type), ()):
            w = inits.get(node.input[w_i]) if len(node.input) > w_i else None
            if w is None or w.data_type != onnx.TensorProto.INT8:
                continue
            z_name = node.input[z_i] if len(node.input) > z_i else ""
            if z_name and z_name not in inits:
                continue
            if z_name:
                zp = numpy_helper.to_array(inits[z_name])
            else:
                scale = inits.get(node.input[s_i]) if s_i is not None else None
                zp = np.zeros(tuple(scale.dims) if scale is not None else (), np.int8)
            q, z = _to_uint8(numpy_helper.to_array(w), zp)
            while len(node.input) <= z_i:
                node.input.append("")
            for index, value in ((w_i, q), (z_i, z)):
                name = unique_name(f"{node.input[index] or node.name + '_zero_point'}_uint8", taken)
                taken.add(name)
                g.initializer.append(numpy_helper.from_array(value, name))
                node.input[index] = name
            changed = True
    return work if changed else model


def _capture(model: onnx.ModelProto, feeds: dict, wanted: dict[str, int]) -> dict[str, np.ndarray]:
    """Values of intermediate tensors of ``model`` on ``feeds``."""
    from .ort_utils import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    inits = {t.name: t for t in probe.graph.initializer}
    values = {k: numpy_helper.to_array(inits[k]) for k in wanted if k in inits}
    values.update({k: v for k, v in feeds.items() if k in wanted})
    extra = [k for k in wanted if k not in values and k not in present]
    probe.graph.output.extend(helper.make_tensor_value_info(k, wanted[k], None) for k in extra)
    session = make_session(probe)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds)))
    values.update({k: got[k] for k in wanted if k in got})
    return values


def _one_node(node: onnx.NodeProto | list[onnx.NodeProto], inputs: list[tuple[str, int]], outputs: list[str],
              inits: list, opset: int, extra_opsets: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(node if isinstance(node, list) else [node], "layer", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _check_integer(m: _Integer, captured: dict[str, np.ndarray], opset: int) -> LayerCheck:
    from .ort_utils import make_session

    op = "Conv" if m.op == "ConvInteger" else "MatMul"
    inits = [numpy_helper.from_array(m.weight, "w")] + ([numpy_helper.from_array(m.bias, "b")] if m.bias is not None else [])
    if op == "MatMul" and m.bias is not None:
        node = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
    else:
        node = helper.make_node(op, ["x", "w"] + (["b"] if m.bias is not None else []), ["y"])
        if op == "Conv":
            node.attribute.extend(m.node.attribute)
    session = make_session(_one_node(node, [("x", onnx.TensorProto.FLOAT)], ["y"], inits, max(opset, 11)))
    x = captured[m.x].astype(np.float32)
    if m.dql is not None:
        x_q, s_x, x_zp = (captured[o] for o in m.dql.output)
    else:  # the op quantizes its input itself, as DynamicQuantizeLinear does
        x_q, s_x, x_zp = make_session(_dynamic_quantize_model()).run(None, {"x": x})
    s_x = float(np.asarray(s_x).reshape(-1)[0])
    x_hat = (x_q.astype(np.float32) - np.asarray(x_zp).astype(np.float32)) * s_x
    reference = captured[m.output].astype(np.float64)
    floated = session.run(None, {"x": x})[0].astype(np.float64)
    emulated = session.run(None, {"x": x_hat.astype(np.float32)})[0].astype(np.float64)
    # per output channel: L1 of the dequantized weight over the channel's receptive field
    if op == "Conv":
        l1 = np.abs(m.weight.astype(np.float64)).reshape(m.weight.shape[0], -1).sum(1)
        terms = m.weight[0].size
        axis_shape = (1, -1) + (1,) * (reference.ndim - 2)
    else:
        l1 = np.abs(m.weight.astype(np.float64)).sum(0)
        terms = m.weight.shape[0]
        axis_shape = (1,) * (reference.ndim - 1) + (-1,)
    x_max = float(np.max(np.abs(x_hat))) if x_hat.size else 0.0
    rounding = (terms + 4) * _EPS32 * x_max * l1 + 4 * _EPS32 * float(np.max(np.abs(reference), initial=0.0))
    bias_step = s_x * m.w_scale.astype(np.float64) if m.int_bias else np.zeros_like(l1)
    emulated_bound = (rounding + bias_step).reshape(axis_shape)
    bound = (s_x * l1 + rounding + bias_step).reshape(axis_shape)
    error = np.abs(floated - reference)
    emulated_error = np.abs(emulated - reference)
    # report the worst ratio's error and bound
    worst = np.unravel_index(np.argmax(error / np.broadcast_to(bound, error.shape)), error.shape) if error.size else None
    worst_e = (np.unravel_index(np.argmax(emulated_error / np.broadcast_to(np.maximum(emulated_bound, 1e-30), error.shape)),
                                error.shape) if error.size else None)
    full_bound = np.broadcast_to(bound, error.shape)
    full_ebound = np.broadcast_to(emulated_bound, error.shape)
    return LayerCheck(
        node=m.output, op=m.op, weight=m.weight_name, per_channel=bool(np.unique(m.w_scale).size > 1),
        error=float(error[worst]) if worst is not None else 0.0,
        bound=float(full_bound[worst]) if worst is not None else 0.0,
        emulated_error=float(emulated_error[worst_e]) if worst_e is not None else 0.0,
        emulated_bound=float(full_ebound[worst_e]) if worst_e is not None else 0.0)


def _range_step(values: np.ndarray) -> float:
    """The uint8 dynamic quantization step over ``values``' range (0 included)."""
    if values.size == 0:
        return 0.0
    return (max(0.0, float(values.max())) - min(0.0, float(values.min()))) / 255.0


def _check_lstm(m: _Lstm, captured: dict[str, np.ndarray], original: onnx.ModelProto, opset: int) -> LayerCheck:
    """One step at a time, from the original's own state (see the module docstring)."""
    from .ort_utils import make_session

    # the node as ``original`` holds it: in the verification's copy its weights are uint8 (_unsaturating)
    node = next((n for n in original.graph.node if list(n.output) == list(m.node.output)), m.node)
    ins = list(node.input) + [""] * (12 - len(node.input))
    check = LayerCheck(node=node.output[0] if node.output else node.name, op="DynamicQuantizeLSTM",
                       weight=m.w_name, per_channel=False)
    consts = {k: numpy_helper.to_array(v) for k, v in constant_initializers(original).items()}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    hidden = int(attrs["hidden_size"])
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    if ins[4]:
        logger.warning("%s: sequence_lens given, the per-step check runs every step of every sequence", node.name)
    x = captured[ins[0]].astype(np.float32)
    steps, batch = x.shape[0], x.shape[1]
    h0 = captured.get(ins[5]) if ins[5] else None
    c0 = captured.get(ins[6]) if ins[6] else None
    bias = consts.get(ins[3]) if ins[3] else None
    peep = consts.get(ins[7]) if ins[7] else None
    if (ins[3] and bias is None) or (ins[7] and peep is None):
        raise UnsupportedModelError(f"DynamicQuantizeLSTM {node.name!r}: its bias or peepholes are not constant; "
                                    "prunequant cannot verify its dequantization")
    scales = {k: consts[ins[i]].astype(np.float32) for k, i in (("W_scale", 8), ("R_scale", 10))}
    w_scale_per_dir = scales["W_scale"].reshape(dirs, -1)
    per_channel = w_scale_per_dir.shape[1] > 1
    check.per_channel = per_channel
    clip = [helper.make_attribute("clip", attrs["clip"])] if "clip" in attrs else []
    forget = [helper.make_attribute("input_forget", attrs["input_forget"])] if "input_forget" in attrs else []
    worst = emulated = (-1.0, 0.0, 0.0)
    b_abs = 0.0
    q_w, q_r = consts[ins[1]], consts[ins[2]]
    for d in range(dirs):
        inits_q = [numpy_helper.from_array(q_w[d:d + 1], "W"), numpy_helper.from_array(q_r[d:d + 1], "R")]
        inits_f = [numpy_helper.from_array(m.w[d:d + 1], "W"), numpy_helper.from_array(m.r[d:d + 1], "R")]
        shared = []
        if bias is not None:
            shared.append(numpy_helper.from_array(bias[d:d + 1].astype(np.float32), "B"))
        if peep is not None:
            shared.append(numpy_helper.from_array(peep[d:d + 1].astype(np.float32), "P"))
        for key, index in (("W_scale", 8), ("W_zero_point", 9), ("R_scale", 10), ("R_zero_point", 11)):
            value = consts[ins[index]] if ins[index] else np.zeros(dirs, q_w.dtype)
            inits_q.append(numpy_helper.from_array(np.ascontiguousarray(value.reshape(dirs, -1)[d].reshape(
                (1,) if value.size == dirs else (1, -1))), key))
        step_in = ["X", "W", "R", "B" if bias is not None else "", "", "H0", "C0", "P" if peep is not None else ""]
        q_node = helper.make_node("DynamicQuantizeLSTM", step_in + ["W_scale", "W_zero_point", "R_scale", "R_zero_point"],
                                  ["Y", "Yh", "Yc"], domain="com.microsoft", hidden_size=hidden, direction="forward")
        f_node = helper.make_node("LSTM", step_in, ["Y", "Yh", "Yc"], hidden_size=hidden, direction="forward")
        for n in (q_node, f_node):
            n.attribute.extend(clip + forget)
        feeds_in = [("X", onnx.TensorProto.FLOAT), ("H0", onnx.TensorProto.FLOAT), ("C0", onnx.TensorProto.FLOAT)]
        q_sess = make_session(_one_node(q_node, feeds_in, ["Y", "Yh", "Yc"], inits_q + shared, max(opset, 7),
                                        (helper.make_opsetid("com.microsoft", 1),)))
        f_sess = make_session(_one_node(f_node, feeds_in, ["Y", "Yh", "Yc"], inits_f + shared, max(opset, 7)))
        e_sess = make_session(_emulation(f_node, feeds_in, inits_f + shared, max(opset, 13))) if batch == 1 else None
        w_l1 = np.abs(m.w[d].astype(np.float64)).sum(1)  # per gate row [4H]
        r_l1 = np.abs(m.r[d].astype(np.float64)).sum(1)
        p_o = np.abs(peep[d, :hidden].astype(np.float64)) if peep is not None else 0.0  # P is [iof]
        if bias is not None:
            b_abs = np.abs(bias[d].astype(np.float64)).reshape(2, -1).sum(0)  # Wb + Rb per gate row
        h = (h0[d:d + 1] if h0 is not None else np.zeros((1, batch, hidden), np.float32)).astype(np.float32)
        c = (c0[d:d + 1] if c0 is not None else np.zeros((1, batch, hidden), np.float32)).astype(np.float32)
        order = range(steps) if d == 0 else range(steps - 1, -1, -1)
        for t in order:
            xt = x[t:t + 1]
            q_out = q_sess.run(None, {"X": xt, "H0": h, "C0": c})
            f_out = f_sess.run(None, {"X": xt, "H0": h, "C0": c})
            forget_ = bool(attrs.get("input_forget"))
            delta = _range_step(xt) * w_l1 + _range_step(h) * r_l1  # [4H] in iofc order
            d_h, d_c = _step_bounds(delta, hidden, c[0], p_o, forget_)
            worst = _worst(worst, ((f_out[1][0], q_out[1][0], d_h), (f_out[2][0], q_out[2][0], d_c)))
            if e_sess is not None:  # the original's own quantization of x_t and h_{t-1}: float rounding only
                e_out = e_sess.run(None, {"X": xt, "H0": h, "C0": c})
                terms = m.w.shape[2] + hidden + 8
                rho = terms * _EPS32 * (float(np.abs(xt).max(initial=0.0)) * 2 * w_l1
                                        + float(np.abs(h).max(initial=0.0)) * 2 * r_l1 + b_abs)
                e_h, e_c = _step_bounds(rho, hidden, c[0], p_o, forget_)
                emulated = _worst(emulated, ((e_out[0][0], q_out[1][0], e_h), (e_out[1][0], q_out[2][0], e_c)))
            h, c = q_out[1], q_out[2]  # the original's own trajectory
    check.error, check.bound = worst[1], worst[2]
    if batch == 1:
        check.emulated_error, check.emulated_bound = emulated[1], emulated[2]
    return check


def _step_bounds(delta: np.ndarray, hidden: int, c_prev: np.ndarray, p_o, input_forget: bool):
    """|dh|, |dc| of one LSTM step whose gate pre-activations (iofc rows) move by ``delta``."""
    d_i, d_o, d_f, d_g = (delta[k * hidden:(k + 1) * hidden] for k in range(4))
    d_i, d_o, d_f = d_i / 4, d_o / 4, d_f / 4  # sigmoid: 1/4-Lipschitz; tanh: 1
    if input_forget:
        d_f = d_i
    slack = 16 * _EPS32 * (1.0 + np.abs(c_prev))
    d_c = d_f * np.abs(c_prev) + d_i + d_g + slack
    d_h = d_o + p_o * d_c / 4 + d_c + slack
    return d_h, d_c


def _worst(current: tuple[float, float, float], pairs) -> tuple[float, float, float]:
    """(ratio, error, bound) of the worst element so far over (got, reference, bound) pairs."""
    for got, ref, bound in pairs:
        err = np.abs(got.astype(np.float64) - ref)
        ratio = err / bound
        k = np.unravel_index(np.argmax(ratio), ratio.shape)
        if ratio[k] > current[0]:
            current = (float(ratio[k]), float(err[k]), float(np.broadcast_to(bound, err.shape)[k]))
    return current


def _emulation(lstm: onnx.NodeProto, feeds_in: list, inits: list, opset: int) -> onnx.ModelProto:
    """The float LSTM step on the original's own dynamic quantization of X and H0."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["Xq", "Xs", "Xz"]),
             helper.make_node("DequantizeLinear", ["Xq", "Xs", "Xz"], ["Xd"]),
             helper.make_node("DynamicQuantizeLinear", ["H0"], ["Hq", "Hs", "Hz"]),
             helper.make_node("DequantizeLinear", ["Hq", "Hs", "Hz"], ["Hd"])]
    step = onnx.NodeProto()
    step.CopyFrom(lstm)
    step.input[0], step.input[5] = "Xd", "Hd"
    del step.output[:]
    step.output.extend(["", "Yh", "Yc"])
    graph = helper.make_graph(nodes + [step], "emulation", [helper.make_tensor_value_info(n, t, None) for n, t in feeds_in],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in ("Yh", "Yc")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# --------------------------------------------------------------------------------------------


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _FLOATS and len(tensor.dims) >= 2 and math.prod(tensor.dims) >= MIN_WEIGHT_ELEMENTS


def _subgraph_weights(graph: onnx.GraphProto) -> tuple[int, int]:
    count = params = 0
    for sub_node in _nodes(graph):
        for attr_graph in subgraphs(sub_node):
            for tensor in attr_graph.initializer:
                if _is_weight(tensor):
                    count += 1
                    params += math.prod(tensor.dims)
            for node in attr_graph.node:
                if node.op_type == "Constant":
                    for attr in node.attribute:
                        if attr.name == "value" and _is_weight(attr.t):
                            count += 1
                            params += math.prod(attr.t.dims)
    return count, params


def require_weight_layers(model: onnx.ModelProto, n_layers: int) -> None:
    """One line when the analysis found no weight layer in a model that has weights."""
    if n_layers:
        count, params = _subgraph_weights(model.graph)
        if count:
            logger.warning("%d weight tensors (%d parameters) sit inside control flow and are not compressed",
                           count, params)
        return
    count, params = _subgraph_weights(model.graph)
    if count:
        flow = Counter(n.op_type for n in model.graph.node if n.op_type in _CONTROL_FLOW)
        where = ", ".join(f"{k} {op}" for op, k in flow.items()) or "control flow"
        raise UnsupportedModelError(
            f"no weight layer outside control flow: {count} weight tensors ({params:,} parameters) sit inside "
            f"{where} bodies, which prunequant does not analyse; pin the inputs the condition depends on with "
            "--input-value NAME=V (a constant condition is folded), or export the model without control flow")
    weights = {t.name: math.prod(t.dims) for t in model.graph.initializer if _is_weight(t)}
    if not weights:
        return  # a model without weights (a feature extractor of fixed ops): nothing to compress, said by inspect
    readers: Counter[str] = Counter()
    for node in model.graph.node:
        if any(name in weights for name in node.input):
            readers[node.op_type] += 1
    listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in readers.most_common(4))
    raise UnsupportedModelError(
        f"no weight layer found: the model's {len(weights)} weight tensors ({sum(weights.values()):,} parameters) "
        f"are read by {listed or 'no node'}, which prunequant has no layer rule for; it cannot compress this model")


__all__ = ["QUANTIZED_OPS", "DequantizeResult", "LayerCheck", "dequantize", "quantized_ops", "refuse_quantized",
           "require_weight_layers"]
