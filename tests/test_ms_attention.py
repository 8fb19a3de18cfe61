"""onnxruntime's ``com.microsoft`` MultiHeadAttention as head groups (issue 12).

Models built with onnx.helper (com.microsoft opset 1): x -> Q/K/V MatMul projections ->
MultiHeadAttention (num_heads) -> output projection. The oracle, in onnxruntime: the model with
heads removed (projection rows and bias entries, num_heads rewritten, the output projection's
rows) computes what zeroing those rows of the output projection computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graph_passes.ort_utils import make_session
from graph_passes.prune import prune_channels

from .graph_helpers import prepare
from .test_attention_groups import check_heads_oracle

B, S, L, D, H = 1, 5, 6, 32, 4


def mha_model(*, dv: int = D, bias: bool = True, mask: bool = False, attn_bias: list[int] | None = None,
              cross: bool = False, extra_inputs: dict[int, str] | None = None, present: bool = False,
              seed: int = 0) -> onnx.ModelProto:
    """x [B, S, D] (and m [B, L, D] for cross attention) -> MHA with ``H`` heads -> [B, S, D]."""
    rng = np.random.default_rng(seed)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    kv_src = "m" if cross else "x"
    inits = [init("wq", [D, D]), init("wk", [D, D]), init("wv", [D, dv]), init("wo", [dv, D])]
    ins = ["q", "k", "v", "", "", ""]
    graph_inputs = [helper.make_tensor_value_info("x", 1, [B, S, D])]
    if cross:
        graph_inputs.append(helper.make_tensor_value_info("m", 1, [B, L, D]))
    kv_len = L if cross else S
    if bias:
        inits.append(init("b", [2 * D + dv]))
        ins[3] = "b"
    if mask:
        graph_inputs.append(helper.make_tensor_value_info("kpm", onnx.TensorProto.INT32, [B, kv_len]))
        ins[4] = "kpm"
    if attn_bias is not None:
        graph_inputs.append(helper.make_tensor_value_info("ab", 1, attn_bias))
        ins[5] = "ab"
    for index, tensor in (extra_inputs or {}).items():
        ins += [""] * (index + 1 - len(ins))
        ins[index] = tensor
    while ins and not ins[-1]:
        ins.pop()
    outs = ["y", "pk", "pv"] if present else ["y"]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", [kv_src, "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", [kv_src, "wv"], ["v"], name="v_proj"),
             helper.make_node("MultiHeadAttention", ins, outs, name="mha", domain="com.microsoft", num_heads=H),
             helper.make_node("MatMul", ["y", "wo"], ["out"], name="o_proj")]
    outputs = [helper.make_tensor_value_info("out", 1, [B, S, D])]
    if present:
        outputs += [helper.make_tensor_value_info(n, 1, [B, H, kv_len, D // H]) for n in ("pk", "pv")]
    graph = helper.make_graph(nodes, "mha", graph_inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)], ir_version=8)


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT32:
            m = np.ones(shape, np.int32)
            m[..., -2:] = 0  # two padded keys: the mask is live
            out[value.name] = m
        else:
            out[value.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def oracle(model, analysis, removal, rtol: float = 1e-4) -> onnx.ModelProto:
    return check_heads_oracle(model, analysis, removal, rtol, feeds=feeds(model))


def head_group(analysis):
    groups = [g for g in analysis.prunable_groups if g.size == H]
    assert len(groups) == 1, [(g.size, g.reasons) for g in analysis.groups]
    return groups[0]


def test_onnx_reference_still_imports():
    """onnx.reference refuses one op name in two domains: only unique names are registered."""
    from onnx.reference import op_run

    schemas = op_run._build_schemas()  # raised NotImplementedError for com.microsoft::Attention
    assert schemas["MultiHeadAttention"].domain == "com.microsoft"


def test_output_shape_from_the_schema():
    """onnx inference gives the MHA output its [B, S, Dv] shape (and the checker accepts it)."""
    model = onnx.shape_inference.infer_shapes(mha_model(dv=16, cross=True), strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    assert shapes["y"] == [B, S, 16]
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(dv=16, cross=True), dict(mask=True),
                                    dict(attn_bias=[1, 1, S, S])],
                         ids=["self", "no-bias", "cross-dv16", "key-padding-mask", "attention-bias"])
def test_mha_heads_oracle(kwargs):
    model, analysis = prepare(mha_model(**kwargs))
    group = head_group(analysis)
    rows = sorted(m.positions.size for m in group.members_of("producer"))
    dv = kwargs.get("dv", D)
    assert rows == sorted([D, D, dv])
    pruned = oracle(model, analysis, {group.id: [1, 2]})
    mha = next(n for n in pruned.graph.node if n.op_type == "MultiHeadAttention")
    assert helper.get_attribute_value(next(a for a in mha.attribute if a.name == "num_heads")) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["wo"].shape == (dv // 2, D)
    if kwargs.get("bias", True):
        assert inits[mha.input[3]].shape == (D + dv // 2,)  # Q and K lose 16 each, V dv // 2


def test_mha_all_but_one_head():
    model, analysis = prepare(mha_model())
    oracle(model, analysis, {head_group(analysis).id: [0, 1, 3]})


@pytest.mark.parametrize("kwargs, reason", [
    (dict(attn_bias=[1, H, S, S]), "attention_bias is per head"),
    (dict(present=True), "KV cache"),
], ids=["per-head-bias", "present"])
def test_mha_unsupported_forms_block(kwargs, reason):
    _, analysis = prepare(mha_model(**kwargs))
    assert not [g for g in analysis.prunable_groups if g.size == H]
    q = next(g for g in analysis.groups if any(m.node == "q_proj" for m in g.members_of("producer")))
    assert not q.prunable and any(reason in why for why in q.reasons)


def test_packed_qkv_blocks():
    """Packed QKV [B, S, N, 3, H] (key and value absent): shaped, but not followed."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal([D, 3 * D]) * 0.3).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([B, S, H, 3, D // H], np.int64), "shp")
    wo = numpy_helper.from_array((rng.standard_normal([D, D]) * 0.3).astype(np.float32), "wo")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"], name="qkv_proj"),
             helper.make_node("Reshape", ["qkv", "shp"], ["packed"], name="pack"),
             helper.make_node("MultiHeadAttention", ["packed"], ["y"], name="mha", domain="com.microsoft", num_heads=H),
             helper.make_node("MatMul", ["y", "wo"], ["out"], name="o_proj")]
    graph = helper.make_graph(nodes, "packed", [helper.make_tensor_value_info("x", 1, [B, S, D])],
                              [helper.make_tensor_value_info("out", 1, [B, S, D])], [w, shape, wo])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    from graph_passes.channel_groups import analyse
    from graph_passes.loading import load_model
    from graph_passes.normalise import normalise

    prepared = normalise(load_model(model), verify=False).model  # onnxruntime's CPU has no packed-QKV kernel
    analysis = analyse(prepared)
    assert not [g for g in analysis.prunable_groups if g.size == H]
    qkv = next(g for g in analysis.groups if any(m.node == "qkv_proj" for m in g.members_of("producer")))
    assert not qkv.prunable  # the [.., N, 3, H] Reshape already splits the channel axis
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in prepared.graph.value_info}
    assert shapes["y"] == [B, S, D]


# --------------------------------------------------------------------------- the torch bridge


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(dv=16, cross=True), dict(mask=True),
                                    dict(attn_bias=[1, H, S, S])],
                         ids=["self", "no-bias", "cross-dv16", "key-padding-mask", "attention-bias"])
def test_bridge_parity(kwargs):
    from plugin.bridge import check_parity, convert

    model, _ = prepare(mha_model(**kwargs))
    assert check_parity(model, convert(model), feeds=feeds(model)) <= 1e-4


def test_bridge_parity_after_pruning():
    from plugin.bridge import check_parity, convert

    model, analysis = prepare(mha_model(mask=True))
    pruned = prune_channels(model, analysis, {head_group(analysis).id: [0, 3]})
    assert check_parity(pruned, convert(pruned), feeds=feeds(pruned)) <= 1e-4


def _unidirectional(model: onnx.ModelProto) -> onnx.ModelProto:
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    mha.attribute.append(helper.make_attribute("unidirectional", 1))
    return model


def test_bridge_causal_self_attention():
    from plugin.bridge import check_parity, convert

    model, analysis = prepare(_unidirectional(mha_model(mask=True)))
    assert check_parity(model, convert(model), feeds=feeds(model)) <= 1e-4
    oracle(model, analysis, {head_group(analysis).id: [2]})  # causal: heads still exact


def test_bridge_refuses_causal_cross_attention():
    from graph_passes.errors import ConversionError
    from plugin.bridge import convert

    model, _ = prepare(_unidirectional(mha_model(cross=True)))
    with pytest.raises(ConversionError, match="unidirectional"):
        convert(model)


def test_compress_prunes_heads_and_passes_the_gate(tmp_path):
    """A short compress: heads pruned (num_heads rewritten in the file), QDQ export through the gate."""
    from plugin.api import CompressConfig, compress

    model = mha_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "mha.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).standard_normal([64, S, D]).astype(np.float32)
    out = tmp_path / "mha_c.onnx"
    result = compress(str(path), {"x": x}, output=str(out),
                      config=CompressConfig(epochs=2, finetune_epochs=1, progress=False, compare_runtimes=False))
    report = result.report
    assert report["gate"]["plain"][0]["sqnr_db"] in ("inf", float("inf")) or report["gate"]["plain"][0]["sqnr_db"] >= 40
    written = onnx.load(str(out))
    mha = next(n for n in written.graph.node if n.op_type == "MultiHeadAttention")
    heads = helper.get_attribute_value(next(a for a in mha.attribute if a.name == "num_heads"))
    kept = report["layers"]["q_proj"]["channels_after"]
    assert heads == kept // (D // H) and kept < D  # heads actually pruned
    y = make_session(written).run(None, {"x": x[:3]})[0]
    assert y.shape == (3, S, D)


def test_fused_contrib_attention_blocks_with_its_reason():
    """com.microsoft::Attention (weights [Din, 3D]): heads blocked in one line."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal([D, 3 * D]) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal([3 * D]) * 0.3).astype(np.float32), "b")
    wo = numpy_helper.from_array((rng.standard_normal([D, 48]) * 0.3).astype(np.float32), "wo")
    w2 = numpy_helper.from_array((rng.standard_normal([48, D]) * 0.3).astype(np.float32), "w2")
    wi = numpy_helper.from_array((rng.standard_normal([D, D]) * 0.3).astype(np.float32), "wi")
    nodes = [helper.make_node("MatMul", ["x", "wi"], ["xi"], name="fc0"),
             helper.make_node("Attention", ["xi", "w", "b"], ["y"], name="attn", domain="com.microsoft", num_heads=H),
             helper.make_node("MatMul", ["y", "wo"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["out"], name="fc2")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", 1, [B, S, D])],
                              [helper.make_tensor_value_info("out", 1, [B, S, D])], [wi, w, b, wo, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    model, analysis = prepare(model)
    shapes = {v.name for v in model.graph.value_info}
    assert "y" not in shapes  # its name is the ONNX Attention's: no schema is registered for it
    fc0 = next(g for g in analysis.groups if any(m.node == "fc0" for m in g.members_of("producer")))
    assert not fc0.prunable and any("fused-weight com.microsoft Attention" in r for r in fc0.reasons)
