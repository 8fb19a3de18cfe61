"""insert_qdq: packed per-channel weights, Q/DQ activations, opset upgrades, parity in onnxruntime.

The reference for every parity check is the *fake-quantised float model*: the original graph
with each quantized weight replaced by its dequantized float32 value (computed here in numpy),
and each quantized activation either fake-quantised in numpy (a graph input) or passed
through ``Clip(Round(x / s)) * s`` float ops (an internal tensor). It contains no Q/DQ node, so
onnxruntime's quantization kernels are checked against an independent computation.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.errors import PlanError
from graph_passes.ort_utils import compare_outputs, make_session
from graph_passes.qdq import (ActivationQuant, WeightQuant, insert_qdq, quantize_weight,
                              weight_axis)
from graph_passes.validate import validate_model

logger = logging.getLogger(__name__)

RTOL = 1e-5
_PACKED = {TensorProto.INT8: 8, TensorProto.INT4: 4, TensorProto.INT2: 2,
           TensorProto.UINT8: 8, TensorProto.UINT4: 4, TensorProto.UINT2: 2}

# name -> (node text, weight shape, input shape, has bias)
LAYERS = {
    "conv": ("Conv <pads=[1,1,1,1]> (x, W, B)", [6, 4, 3, 3], [2, 4, 6, 6], True),
    "depthwise": ("Conv <group=4, pads=[1,1,1,1]> (x, W, B)", [4, 1, 3, 3], [2, 4, 6, 6], True),
    "grouped": ("Conv <group=2> (x, W, B)", [6, 2, 3, 3], [2, 4, 6, 6], True),
    "convtranspose": ("ConvTranspose <strides=[2,2]> (x, W, B)", [4, 3, 3, 3], [2, 4, 5, 5],
                      True),
    "gemm_t": ("Gemm <transB=1> (x, W, B)", [5, 8], [3, 8], True),
    "gemm_n": ("Gemm (x, W, B)", [8, 5], [3, 8], True),
    "matmul": ("MatMul (x, W)", [8, 5], [3, 8], False),
}


def parse(text: str) -> onnx.ModelProto:
    """Parse ONNX text; outputs written ``float y`` get an unknown shape (not rank 0)."""
    model = onnx.parser.parse_model(text)
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def tiny_model(kind: str, opset: int = 25, seed: int = 0) -> onnx.ModelProto:
    """One weight layer named ``layer`` reading graph input ``x``; weights are initializers."""
    op, w_shape, x_shape, has_bias = LAYERS[kind]
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
        g (float[{",".join(map(str, x_shape))}] x) => (float y) {{ y = {op} }}"""
    model = parse(text)
    model.graph.node[0].name = "layer"
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape).astype(np.float32)
    w[0] *= 0.01  # channels of very different ranges
    inits = [numpy_helper.from_array(w, "W")]
    if has_bias:
        n_out = {"conv": 6, "depthwise": 4, "grouped": 6, "convtranspose": 3}.get(kind, 5)
        inits.append(numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B"))
    model.graph.initializer.extend(inits)
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------- the numpy reference


def ref_weight(w: np.ndarray, bits, axis: int) -> np.ndarray:
    """Independent numpy fake quantization: symmetric narrow range per channel."""
    out = np.empty_like(w)
    for c, b in enumerate(bits):
        ch = np.take(w, c, axis=axis)
        qmax = np.float32(2 ** (b - 1) - 1)
        scale = np.float32(np.abs(ch).max()) / qmax
        scale = scale if scale > 0 else np.float32(1)
        q = np.clip(np.round(ch / scale), -qmax, qmax)
        idx = [slice(None)] * w.ndim
        idx[axis] = c
        out[tuple(idx)] = (q * scale).astype(np.float32)
    return out


def act_range(quant: ActivationQuant) -> tuple[float, float]:
    if quant.signed:
        qmax = 2 ** (quant.bits - 1) - 1
        return -qmax, qmax
    return 0, 2**quant.bits - 1


def ref_activation(x: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    scale = np.float32(quant.scale)
    lo, hi = act_range(quant)
    return (np.clip(np.round(x / scale), lo, hi) * scale).astype(np.float32)


def fake_quant_model(model: onnx.ModelProto, weights, activations) -> onnx.ModelProto:
    """The float reference: dequantized weights, float fake-quant ops on internal tensors."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    nodes = {n.name: n for n in ref.graph.node}
    inits = {t.name: t for t in ref.graph.initializer}
    for name, quant in weights.items():
        t = inits[nodes[name].input[1]]
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(ref_weight(w, quant.bits, weight_axis(nodes[name])),
                                           t.name))
    inputs = {i.name for i in ref.graph.input}
    for k, (tensor, quant) in enumerate(activations.items()):
        if tensor not in inputs:
            _add_float_fake_quant(ref.graph, tensor, quant, k)
    return ref


def _add_float_fake_quant(graph: onnx.GraphProto, tensor: str, quant: ActivationQuant, k: int):
    lo, hi = act_range(quant)
    p = f"fq{k}_"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(quant.scale, np.float32), p + "s"),
        numpy_helper.from_array(np.array(lo, np.float32), p + "lo"),
        numpy_helper.from_array(np.array(hi, np.float32), p + "hi")])
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = p + "y"
    graph.node.extend([
        helper.make_node("Div", [tensor, p + "s"], [p + "d"]),
        helper.make_node("Round", [p + "d"], [p + "r"]),
        helper.make_node("Clip", [p + "r", p + "lo", p + "hi"], [p + "c"]),
        helper.make_node("Mul", [p + "c", p + "s"], [p + "y"])])
    from graph_passes.qdq import topological_sort
    topological_sort(graph)


def reference_outputs(model, weights, activations, feeds):
    ref_feeds = {k: ref_activation(v, activations[k]) if k in activations else v
                 for k, v in feeds.items()}
    return make_session(fake_quant_model(model, weights, activations)).run(None, ref_feeds)


def assert_parity(model, result, weights, activations, feeds, rtol=RTOL):
    ref = reference_outputs(model, weights, activations, feeds)
    for optimize in (False, True):
        got = make_session(result.model, optimize=optimize).run(None, feeds)
        cmp = compare_outputs(got, ref)
        assert cmp.ok(rtol), f"optimize={optimize}: rel error {cmp.max_rel_error:.3g}"


def assert_packed(model: onnx.ModelProto) -> int:
    """Every integer initializer is raw, packed data of the right length; returns the count."""
    count = 0
    for t in model.graph.initializer:
        if t.data_type in _PACKED:
            n = int(np.prod(t.dims)) if t.dims else 1
            assert len(t.raw_data) == (n * _PACKED[t.data_type] + 7) // 8, t.name
            count += 1
    return count


def feeds_for(kind: str, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(LAYERS[kind][2]).astype(np.float32)}


def n_channels(model: onnx.ModelProto) -> int:
    w = numpy_helper.to_array(model.graph.initializer[0])
    return w.shape[weight_axis(model.graph.node[0])]


def mixed_bits(n: int, seed: int = 0) -> tuple[int, ...]:
    bits = list(np.random.default_rng(seed).choice([2, 4, 8], n))
    bits[: min(3, n)] = [8, 2, 4][: min(3, n)]  # every width present
    return tuple(int(b) for b in bits)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bits", [8, 4, 2, "mixed"])
def test_weight_layers_match_fake_quant(kind, bits):
    model = tiny_model(kind)
    n = n_channels(model)
    per_channel = mixed_bits(n) if bits == "mixed" else (bits,) * n
    weights = {"layer": WeightQuant(per_channel)}
    result = insert_qdq(model, weights, {})
    onnx.checker.check_model(result.model, full_check=True)
    assert_parity(model, result, weights, {}, feeds_for(kind))
    assert assert_packed(result.model) == 2 * len(set(per_channel))
    assert not any(t.name == "W" for t in result.model.graph.initializer)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DequantizeLinear") == len(set(per_channel))
    assert ("Gather" in ops) == (bits == "mixed")
    layer = result.layers["layer"]
    assert layer.predicted_bytes == pytest.approx(
        numpy_helper.to_array(model.graph.initializer[0]).size / n * sum(per_channel) / 8)
    assert layer.weight_bytes <= layer.predicted_bytes + len(set(per_channel))


@pytest.mark.parametrize("kind", ["conv", "gemm_t", "matmul", "convtranspose"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("abits", [8, 4, 2])
def test_activations_match_fake_quant(kind, signed, abits):
    model = tiny_model(kind)
    n = n_channels(model)
    weights = {"layer": WeightQuant(mixed_bits(n, seed=abits))}
    qmax = 2 ** (abits - 1) - 1 if signed else 2**abits - 1
    acts = {"x": ActivationQuant(abits, signed, 2.5 / qmax)}
    result = insert_qdq(model, weights, acts)
    onnx.checker.check_model(result.model, full_check=True)
    assert_parity(model, result, weights, acts, feeds_for(kind))
    assert_packed(result.model)
    zp = next(t for t in result.model.graph.initializer if t.name == "x_zp")
    expected = {(8, False): TensorProto.UINT8, (4, False): TensorProto.UINT4,
                (2, False): TensorProto.UINT2, (8, True): TensorProto.INT8,
                (4, True): TensorProto.INT4, (2, True): TensorProto.INT2}[(abits, signed)]
    assert zp.data_type == expected


CHAIN = """<ir_version: 10, opset_import: ["" : {opset}]>
g (float[2,3,6,6] x) => (float y, float r) {{
    h = Conv <pads=[1,1,1,1]> (x, W1, B1)
    r = Relu (h)
    h2 = Conv <pads=[1,1,1,1], group=2> (r, W2, B2)
    r2 = Relu (h2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = Gemm <transB=1> (f, W3, B3)
}}"""


def chain_model(opset: int = 17) -> onnx.ModelProto:
    model = parse(CHAIN.format(opset=opset))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    rng = np.random.default_rng(3)
    shapes = {"W1": [4, 3, 3, 3], "B1": [4], "W2": [6, 2, 3, 3], "B2": [6], "W3": [5, 6], "B3": [5]}
    model.graph.initializer.extend(
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k)
        for k, s in shapes.items())
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    return onnx.shape_inference.infer_shapes(model)


def chain_plan(wbits: int | None, abits: int, signed_relu: bool = False):
    def bits(n, seed):
        return mixed_bits(n, seed) if wbits is None else (wbits,) * n
    weights = {"n0": WeightQuant(bits(4, 0)), "n2": WeightQuant(bits(6, 1)),
               "n6": WeightQuant(bits(5, 2))}
    acts = {"x": ActivationQuant(abits, True, 3.0 / (2 ** (abits - 1) - 1)),
            "r": ActivationQuant(abits, signed_relu, 4.0 / (2 ** (abits - int(signed_relu)) - 1)),
            "f": ActivationQuant(abits, False, 1.5 / (2**abits - 1))}
    return weights, acts


@pytest.mark.parametrize("wbits", [8, 4, 2, None])
@pytest.mark.parametrize("abits", [8, 4, 2])
@pytest.mark.parametrize("signed_relu", [False, True])
def test_chain_survives_onnxruntime_fusions(wbits, abits, signed_relu):
    """Conv -> Relu -> Q -> DQ -> Conv chains: ORT_ENABLE_ALL fuses QDQ groups; it must not
    break (sub-8-bit QLinearConv/QGemm) or drop the Relu before a signed sub-byte Q."""
    model = chain_model()
    weights, acts = chain_plan(wbits, abits, signed_relu)
    result = insert_qdq(model, weights, acts)
    assert result.guarded == (wbits != 8 or abits != 8)
    feeds = {"x": np.random.default_rng(5).standard_normal([2, 3, 6, 6]).astype(np.float32)}
    assert_parity(model, result, weights, acts, feeds)
    report = validate_model(result.model, feeds=feeds, rtol=RTOL)
    assert report.max_rel_error_optimized <= RTOL
    # graph outputs are never rewired: 'r' is an output and still the float Relu output
    assert any(n.op_type == "Relu" and n.output[0] == "r" for n in result.model.graph.node)


@pytest.mark.parametrize("bits,opset,ir", [(8, 17, 8), (4, 21, 10), (2, 25, 13)])
def test_opset_upgrade_only_as_far_as_needed(bits, opset, ir):
    model = chain_model(opset=17)
    weights, acts = chain_plan(bits, 8)
    result = insert_qdq(model, weights, acts)
    assert result.opset == opset
    assert result.upgraded_from == (None if bits == 8 else 17)
    assert result.model.ir_version >= ir
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(6).standard_normal([2, 3, 6, 6]).astype(np.float32)}
    assert_parity(model, result, weights, acts, feeds)


def test_opset_11_is_upgraded_to_13_for_per_axis_dequantize():
    model = chain_model(opset=11)
    weights, _ = chain_plan(8, 8)
    result = insert_qdq(model, weights, {})
    assert (result.opset, result.upgraded_from) == (13, 11)
    onnx.checker.check_model(result.model, full_check=True)


def test_given_scales_are_used():
    model = tiny_model("conv")
    scales = tuple(float(s) for s in np.linspace(0.05, 0.3, 6))
    result = insert_qdq(model, {"layer": WeightQuant((4,) * 6, scales)}, {})
    s = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                   if t.name.startswith("W_scale")))
    assert s.dtype == np.float32 and np.array_equal(s, np.float32(scales))


def test_input_model_not_modified_and_errors():
    model = tiny_model("conv")
    before = model.SerializeToString()
    insert_qdq(model, {"layer": WeightQuant((8,) * 6)}, {"x": ActivationQuant(8, True, 0.1)})
    assert model.SerializeToString() == before
    with pytest.raises(PlanError, match="not a node"):
        insert_qdq(model, {"nope": WeightQuant((8,) * 6)}, {})
    with pytest.raises(PlanError, match="5 bit-widths for 6 output channels"):
        insert_qdq(model, {"layer": WeightQuant((8,) * 5)}, {})
    with pytest.raises(PlanError, match="not read by any node"):
        insert_qdq(model, {}, {"nope": ActivationQuant(8, False, 0.1)})
    with pytest.raises(PlanError):
        WeightQuant((3, 8))
    with pytest.raises(PlanError):
        ActivationQuant(8, False, 0.0)


# ------------------------------------------------------------ bit-identity with the torch code


@pytest.mark.parametrize("shape,axis", [([6, 4, 3, 3], 0), ([4, 3, 3, 3], 1), ([8, 5], 1),
                                        ([5, 8], 0), ([16, 1, 3, 3], 0)])
def test_numpy_weight_quantizer_bit_identical_to_torch(shape, axis):
    torch = pytest.importorskip("torch")
    from plugin.engine.quantizers import quantize_weight_per_channel
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        w = (rng.standard_normal(shape) * rng.uniform(1e-4, 10)).astype(np.float32)
        np.moveaxis(w, axis, 0)[1] = 0.0  # an all-zero channel
        bits = rng.choice([2, 4, 8], shape[axis]).tolist()
        q, scale = quantize_weight(w, bits, axis)
        ref = quantize_weight_per_channel(torch.from_numpy(w), bits, ch_axis=axis)
        assert np.array_equal(scale, ref.scale.numpy()), trial
        view = [1] * w.ndim
        view[axis] = -1
        assert np.array_equal((q * scale.reshape(view)).astype(np.float32), ref.y.numpy())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_onnxruntime_activation_quant_bit_identical_to_torch(bits, signed):
    """QuantizeLinear/DequantizeLinear in onnxruntime == the torch PACT / symmetric quantizers,
    ties (x exactly half a step) included."""
    torch = pytest.importorskip("torch")
    from plugin.engine.quantizers import pact_quantize, symmetric_clip_quantize
    clip = torch.tensor(2.7)
    out = (symmetric_clip_quantize if signed else pact_quantize)(torch.zeros(1), clip, bits)
    scale = float(out.scale)
    rng = np.random.default_rng(bits)
    steps = np.arange(-2**bits - 2, 2**bits + 2, dtype=np.float32)
    x = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 3,
                        (steps + 0.5) * np.float32(scale), steps * np.float32(scale)])
    fn = symmetric_clip_quantize if signed else pact_quantize
    ref = fn(torch.from_numpy(x), clip, bits).y.numpy()
    model = parse(f"""<ir_version: 13, opset_import: ["" : 25]>
        g (float[{x.size}] x) => (float y) {{ y = Identity (x) }}""")
    model = onnx.shape_inference.infer_shapes(model)
    result = insert_qdq(model, {}, {"x": ActivationQuant(bits, signed, scale)})
    for optimize in (False, True):
        got = make_session(result.model, optimize=optimize).run(None, {"x": x})[0]
        assert np.array_equal(got, ref)


# ------------------------------------------------------------------------- the digits sample

DIGITS = "samples/digits"


def _activation_clips(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> list[float]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in {o.name for o in probe.graph.output})
    outs = dict(zip([o.name for o in probe.graph.output],
                    make_session(probe).run(None, {"input": x})))
    return [float(np.abs(outs[t]).max()) if t in outs else float(np.abs(x).max()) for t in tensors]


def digits_plan(model: onnx.ModelProto, calib: np.ndarray, seed: int = 0):
    """Mixed 8/4/2 weights on every layer; 8/4/2 activations on every layer input."""
    from graph_passes.graph import ModelGraph
    from graph_passes.layers import activation_sites, describe_weight_layer
    graph = ModelGraph.build(model)
    layers = [describe_weight_layer(n.name, n, graph) for n in model.graph.node]
    layers = [layer for layer in layers if layer is not None]
    rng = np.random.default_rng(seed)
    weights = {layer.name: WeightQuant(tuple(int(b) for b in rng.choice(
        [2, 4, 8], layer.weight_shape[weight_axis(graph.nodes[layer.name])], p=[.4, .4, .2])))
        for layer in layers}
    sites = activation_sites(layers, graph)
    clips = _activation_clips(model, [s.tensor for s in sites], calib)
    acts = {}
    for site, clip, bits in zip(sites, clips, [8, 4, 4, 2, 8, 8, 8][: len(sites)]):
        signed = not site.non_negative
        levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        acts[site.tensor] = ActivationQuant(bits, signed, clip / levels)
    return weights, acts


def test_digits_mixed_precision_end_to_end(tmp_path):
    from graph_passes.normalise import normalise
    from graph_passes.writing import write_outputs
    original = onnx.load(f"{DIGITS}/model.onnx")
    model = normalise(original).model
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    calib = np.load(f"{DIGITS}/calib.npz")["input"]
    test = np.load(f"{DIGITS}/test.npz")
    weights, acts = digits_plan(model, calib)
    result = insert_qdq(model, weights, acts)
    assert result.opset == 25 and result.upgraded_from == 17
    assert assert_packed(result.model) > 0
    feeds = {"input": test["input"]}
    assert_parity(model, result, weights, acts, feeds)
    ref = reference_outputs(model, weights, acts, feeds)
    report = validate_model(result.model, feeds=feeds, reference_outputs=ref, rtol=RTOL,
                            check_top1=True)
    assert report.top1_agreement == 100.0
    written = write_outputs(tmp_path / "digits.pq.onnx", result.model)
    size = written.model_bytes
    fp32_weights = sum(layer.fp32_bytes for layer in result.layers.values())
    acc_fp32 = float(np.mean(make_session(model).run(None, feeds)[0].argmax(1) == test["labels"]))
    acc_q = float(np.mean(make_session(result.model).run(None, feeds)[0].argmax(1)
                          == test["labels"]))
    logger.info(
        "digits: FP32 file %d B (normalised %d B), QDQ file %d B (%.3fx); FP32 weights %d B, "
        "predicted packed %.0f B, weight path %d B (packed ints %d, scales %d, zps %d, "
        "indices/shapes %d), other %d B; accuracy FP32 %.4f, QDQ %.4f (untrained plan); "
        "opt-vs-off %.2g, ref %.2g", os.path.getsize(f"{DIGITS}/model.onnx"),
        model.ByteSize(), size, size / model.ByteSize(), fp32_weights, result.predicted_bytes,
        result.weight_bytes, *(sum(getattr(layer, f) for layer in result.layers.values())
                               for f in ("weight_bytes", "scale_bytes", "zero_point_bytes",
                                         "index_bytes")),
        result.other_bytes, acc_fp32, acc_q, report.max_rel_error_optimized,
        report.max_rel_error_reference)
    packed = sum(layer.weight_bytes for layer in result.layers.values())
    assert packed <= result.predicted_bytes + 3 * len(result.layers)  # byte rounding per part
    assert size == result.model_bytes
    assert size < 0.35 * model.ByteSize()


def test_validate_model_reports_and_raises():
    from graph_passes.errors import VerificationError
    model = tiny_model("gemm_t")
    weights = {"layer": WeightQuant(mixed_bits(5))}
    result = insert_qdq(model, weights, {"x": ActivationQuant(4, True, 0.4)})
    feeds = feeds_for("gemm_t")
    ref = reference_outputs(model, weights, {"x": ActivationQuant(4, True, 0.4)}, feeds)
    report = validate_model(result.model, feeds=feeds, reference_outputs=ref, check_top1=True)
    assert report.max_rel_error_reference <= RTOL and report.top1_agreement == 100.0
    with pytest.raises(VerificationError, match="differs from the reference"):
        validate_model(result.model, feeds=feeds, reference_outputs=[r * 1.01 for r in ref])
    with pytest.raises(VerificationError, match="top-1"):
        validate_model(result.model, feeds=feeds, reference_outputs=[-r for r in ref],
                       check_top1=True)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    broken.graph.node[-1].input[1] = "missing"
    with pytest.raises(VerificationError, match="onnx checker"):
        validate_model(broken, feeds=feeds)


def test_activation_quant_rewires_only_the_named_consumers():
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,3,3] x) => (float[1,4,3,3] y) {
      r = Relu(x)
      c = Conv <pads=[1,1,1,1]> (r, w)
      y = Add(r, c)
    }
    """)
    model.graph.node[1].name = "conv"
    model.graph.node[2].name = "add"
    model.graph.initializer.append(nh.from_array(np.ones([4, 4, 3, 3], np.float32) * 0.1, "w"))
    out = insert_qdq(model, {}, {"r": ActivationQuant(8, False, 6.0 / 255, consumers=("conv",))}).model
    add = [n for n in out.graph.node if n.name == "add"][0]
    conv = [n for n in out.graph.node if n.name == "conv"][0]
    assert add.input[0] == "r" and conv.input[0] != "r"
    with pytest.raises(PlanError, match="not read by node"):
        insert_qdq(model, {}, {"r": ActivationQuant(8, False, 0.1, consumers=("nope",))})


MOVEMENT = """<ir_version: 10, opset_import: ["" : 17]>
movement (float[2,3,6,6] x) => (float y) {{
    c = Conv <pads=[1,1,1,1]> (x, W1, B1)
    a = {act} (c)
    m = {movement}
    y = Gemm <transB=1> (m, W2, B2)
}}
"""
MOVEMENTS = {
    "reshape": ("ReduceMean <axes=[2, 3], keepdims=1> (a)", "Reshape (p, shape)"),
    "flatten": ("GlobalAveragePool (a)", "Flatten (p)"),
    "maxpool": ("MaxPool <kernel_shape=[6, 6]> (a)", "Reshape (p, shape)"),
}


@pytest.mark.parametrize("kind", sorted(MOVEMENTS))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("abits", [2, 4])
def test_low_bit_activation_after_data_movement_loads_in_onnxruntime(kind, signed, abits):
    """onnxruntime moves a Q backwards over Reshape/Flatten/MaxPool and then runs the op on the
    quantized type, which has no INT2 kernel ('Failed to find kernel for Reshape(25)', found on
    efficientnet_b0) nor a UINT4 MaxPool. Such sites use an 8-bit container clipped to the range."""
    pool, move = MOVEMENTS[kind]
    text = MOVEMENT.format(act="Sigmoid" if not signed else "Tanh",
                           movement=f"p = {pool}\n    m = {move}").replace("    m = m = ", "    m = ")
    model = parse(text.replace("m = p = ", "p = "))
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal([4, 3, 3, 3]).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal([4]).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal([5, 4]).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal([5]).astype(np.float32), "B2"),
        numpy_helper.from_array(np.array([2, 4], np.int64), "shape")])
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    gemm = model.graph.node[-1].name
    weights = {"n0": WeightQuant((2, 2, 4, 8)), gemm: WeightQuant((2,) * 5)}
    acts = {"m": ActivationQuant(abits, signed, (0.4 if signed else 0.3) / abits)}
    result = insert_qdq(model, weights, acts)
    feeds = {"x": rng.standard_normal([2, 3, 6, 6]).astype(np.float32)}
    assert_parity(model, result, weights, acts, feeds)  # both optimisation levels
    zps = [t for t in result.model.graph.initializer if t.name == "m_zp"]
    assert zps and zps[0].data_type == (TensorProto.INT8 if signed else TensorProto.UINT8)
