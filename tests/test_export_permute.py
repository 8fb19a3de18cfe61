"""Channels of equal width made contiguous at export (graph_passes.permute, plugin.export):
a mixed-width layer becomes ``Concat(DQ_8, DQ_4, DQ_2) -> layer`` with no Gather.

* a mixed plan on the digits sample (final Gemm uniform: its channels reach the graph output)
  exports with no Gather at all, passes the gate against the fake-quantized model, agrees at
  every onnxruntime level, and computes what the unpermuted export computes;
* the permutation pass itself keeps the function on a model with a depthwise conv, per-channel
  constants, a Concat and a Flatten of a spatial map into a Gemm, with pruning;
* a group that reaches a graph output, or an op that reorders nothing (Split) or has no rule
  (LRN), keeps its order and its Gather;
* ``prunequant export --plan`` round-trips: the written plan is the input plan (original
  channel order), and exporting it again gives the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from graph_passes.digest import model_digest
from graph_passes.permute import permute_groups
from graph_passes.prune import prune_channels
from plugin.export import export_plan, width_orders
from plugin.space import Precisions, SearchSpace

from .graph_helpers import build, group_of, prepare

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
PRECISIONS = Precisions((8, 4, 2, 0), (8,))


def _run(model: onnx.ModelProto, feeds: dict, level: str = "ORT_DISABLE_ALL") -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _mixed_bits(space: SearchSpace, uniform: tuple[str, ...] = ()) -> dict[str, list[int]]:
    return {name: [8] * len(info.columns) if name in uniform else [(8, 4, 2)[c % 3] for c in range(len(info.columns))]
            for name, info in space.layers.items()}


def _weight_gathers(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input[0] in producer
               and producer[n.input[0]].op_type == "Concat"
               and all(producer[i].op_type == "DequantizeLinear" and producer[i].input[0] in inits
                       for i in producer[n.input[0]].input))


@pytest.fixture(scope="module")
def digits():
    from graph_passes.prepare import prepare_model

    prepared = prepare_model(str(DIGITS / "model.onnx"))
    space = SearchSpace(prepared.analysis, PRECISIONS, model_sha256=model_digest(prepared.original))
    last = [layer.name for layer in prepared.analysis.layers if layer.output in
            {o.name for o in prepared.model.graph.output}]
    kept = {g.id: [c for c in range(g.size) if c % 5 != 1] for g in prepared.analysis.prunable_groups}
    plan = space.plan(layer_bits=_mixed_bits(space, tuple(last)), site_bits=8, kept=kept)
    return prepared, plan


def test_digits_mixed_plan_has_no_gather_and_keeps_the_function(digits) -> None:
    prepared, plan = digits
    before = export_plan(prepared.model, prepared.analysis, plan, permute=False)
    after = export_plan(prepared.model, prepared.analysis, plan, permute=True)
    assert _weight_gathers(before.model) == 5 and _weight_gathers(after.model) == 0
    assert not [n for n in after.model.graph.node if n.op_type == "Gather"]
    assert sorted(after.channel_orders) == sorted(g.id for g in prepared.analysis.prunable_groups)
    assert len(after.model.SerializeToString()) < len(before.model.SerializeToString())
    # every mixed layer reads Concat(DQ_8, DQ_4, DQ_2) on its output-channel axis
    inits = {t.name: t for t in after.model.graph.initializer}
    producer = {o: n for n in after.model.graph.node for o in n.output}
    concats = [n for n in after.model.graph.node if n.op_type == "Concat" and n.input[0] in producer
               and producer[n.input[0]].op_type == "DequantizeLinear"]
    assert len(concats) == 5
    for cat in concats:
        types = [inits[producer[i].input[0]].data_type for i in cat.input]
        assert types == [onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.INT2]
    x = np.load(DIGITS / "test.npz")["input"][:1]
    ref = _run(before.model, {"input": x})[0]
    for level in LEVELS:
        assert np.allclose(_run(after.model, {"input": x}, level)[0], ref, rtol=1e-5, atol=1e-5), level


def test_digits_mixed_plan_passes_the_gate_at_every_level(digits, tmp_path) -> None:
    from plugin import api

    prepared, plan = digits
    path = plan.save(tmp_path / "mixed.plan.json")
    result = api.apply_plan(str(DIGITS / "model.onnx"), path, data=str(DIGITS / "test.npz"), progress=False)
    assert not [n for n in result.model.graph.node if n.op_type == "Gather"]  # the gate passed on it
    x = np.load(DIGITS / "test.npz")["input"][:64]
    ref = _run(result.model, {"input": x})[0]
    for level in LEVELS[1:]:
        assert np.allclose(_run(result.model, {"input": x}, level)[0], ref, rtol=1e-4, atol=1e-4), level


def test_export_plan_round_trips(digits, tmp_path) -> None:
    from plugin.cli import main

    prepared, plan = digits
    source = plan.save(tmp_path / "mixed.plan.json")
    runner = CliRunner()
    first = runner.invoke(main, ["export", str(DIGITS / "model.onnx"), "--plan", str(source), "-o",
                                 str(tmp_path / "a.onnx"), "--data", str(DIGITS / "test.npz"), "--no-progress"])
    assert first.exit_code == 0, first.output
    written = json.loads((tmp_path / "a.plan.json").read_text())
    original = json.loads(Path(source).read_text())
    assert written["groups"] == original["groups"]  # the plan keeps the original channel order
    assert {k: v["bits"] for k, v in written["layers"].items()} == {k: v["bits"] for k, v in original["layers"].items()}
    again = runner.invoke(main, ["export", str(DIGITS / "model.onnx"), "--plan", str(tmp_path / "a.plan.json"),
                                 "-o", str(tmp_path / "b.onnx"), "--data", str(DIGITS / "test.npz"), "--no-progress"])
    assert again.exit_code == 0, again.output
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert "Gather" not in {n.op_type for n in a.graph.node}


RICH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,6,6] x) => (float[1,5] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    a1 = Mul (a, s1)
    a2 = Relu (a1)
    d = Conv <group=8, pads=[1,1,1,1]> (a2, wd, bd)
    d1 = Add (d, a2)
    c = Conv (x, w2)
    c1 = Sigmoid (c)
    k = Concat <axis=1> (d1, c1)
    p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (k)
    f = Flatten (p)
    y = Gemm <transB=1> (f, wg, bg)
}
"""


def test_permutation_keeps_the_function_through_depthwise_concat_and_flatten() -> None:
    model, analysis = prepare(build(RICH, w1=[8, 3, 3, 3], b1=[8], s1=[1, 8, 1, 1], wd=[8, 1, 3, 3], bd=[8],
                                    w2=[4, 3, 1, 1], wg=[5, 12 * 9], bg=[5]))
    g_a, g_c = group_of(analysis, "a"), group_of(analysis, "c")
    assert g_a.prunable and g_c.prunable
    removal = {g_a.id: [2]}
    pruned = prune_channels(model, analysis, removal)
    rng = np.random.default_rng(1)
    orders = {g_a.id: rng.permutation([c for c in range(8) if c != 2]).tolist(), g_c.id: [3, 1, 0, 2]}
    result = permute_groups(pruned, analysis, removal, orders)
    assert not result.refused and result.permuted == orders
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": rng.standard_normal([1, 3, 6, 6]).astype(np.float32)}
    ref = _run(pruned, feeds)[0]
    assert np.allclose(_run(result.model, feeds)[0], ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_run(result.model, feeds)[0], 0)


def _exported_gathers(text: str, **shapes) -> tuple[int, dict[str, str]]:
    model, analysis = prepare(build(text, **shapes))
    space = SearchSpace(analysis, PRECISIONS, model_sha256="0" * 64)
    plan = space.plan(layer_bits=_mixed_bits(space), site_bits=8)
    exported = export_plan(model, analysis, plan)
    orders = width_orders(plan, analysis)
    refused = permute_groups(model, analysis, {}, orders).refused if orders else {}
    return _weight_gathers(exported.model), refused


@pytest.mark.parametrize("text,op", [
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,6,6,6] r) {
            a = Conv <pads=[1,1,1,1]> (x, w1)
            r = Relu (a)
            y = Conv <pads=[1,1,1,1]> (r, w2)
        }""", "output"),
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
            a = Conv <pads=[1,1,1,1]> (x, w1)
            r = LRN <size=3> (a)
            y = Conv <pads=[1,1,1,1]> (r, w2)
        }""", "LRN"),
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
            a = Conv <pads=[1,1,1,1]> (x, w1)
            sp = Constant <value = int64[2] {3, 3}> ()
            s1, s2 = Split <axis=1> (a, sp)
            t1 = Conv <pads=[1,1,1,1]> (s1, w3)
            t2 = Conv <pads=[1,1,1,1]> (s2, w3b)
            y = Add (t1, t2)
        }""", "Split"),
])
def test_a_group_reaching_an_output_or_an_unknown_op_keeps_its_gather(text, op) -> None:
    shapes = {"w1": [6, 3, 3, 3], "w2": [4, 6, 3, 3], "w3": [4, 3, 3, 3], "w3b": [4, 3, 3, 3]}
    used = {k: v for k, v in shapes.items() if k in text}
    gathers, refused = _exported_gathers(text, **used)
    assert gathers >= 1  # the first conv's 6 mixed channels keep their order and Gather
    if op == "Split":  # prunable, but a Split cannot reorder channels across its outputs
        assert any("Split" in why for why in refused.values())


@pytest.mark.parametrize("hidden", ["Gemm <transB=1> (f, wh, bh)", "Gemm (f, wht, bh)", "MatMul (f, wht)"])
@pytest.mark.parametrize("abits", [8, 4])
def test_mixed_linear_layers_export_without_gather_at_every_level(hidden, abits) -> None:
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6,6] x) => (float[2,5] y) {{
            a = Conv <pads=[1,1,1,1]> (x, w1, b1)
            r = Relu (a)
            p = GlobalAveragePool (r)
            f = Flatten (p)
            h = {hidden}
            hr = Relu (h)
            y = Gemm <transB=1> (hr, wo, bo)
        }}"""
    shapes = {"w1": [9, 3, 3, 3], "b1": [9], "wh": [12, 9], "wht": [9, 12], "bh": [12], "wo": [5, 12], "bo": [5]}
    model, analysis = prepare(build(text, **{k: v for k, v in shapes.items() if k in text}))
    space = SearchSpace(analysis, Precisions((8, 4, 2, 0), (8, 4)), model_sha256="0" * 64)
    out_layer = [layer.name for layer in analysis.layers if layer.output == "y"]
    plan = space.plan(layer_bits=_mixed_bits(space, tuple(out_layer)), site_bits=abits)
    before = export_plan(model, analysis, plan, permute=False)
    after = export_plan(model, analysis, plan)
    assert _weight_gathers(before.model) == 2 and _weight_gathers(after.model) == 0
    onnx.checker.check_model(after.model, full_check=True)
    feeds = {"x": np.random.default_rng(3).standard_normal([2, 3, 6, 6]).astype(np.float32)}
    ref = _run(before.model, feeds)[0]
    for level in LEVELS:
        assert np.allclose(_run(after.model, feeds, level)[0], ref, rtol=1e-4, atol=1e-4), level


def test_layers_of_one_group_with_other_widths_keep_their_gather(digits) -> None:
    prepared, _ = digits
    space = SearchSpace(prepared.analysis, PRECISIONS, model_sha256=model_digest(prepared.original))
    group = next(g for g in prepared.analysis.prunable_groups if len(g.producers) == 2)
    first, second = group.producers
    last = [layer.name for layer in prepared.analysis.layers if layer.output == "logits"]
    bits = _mixed_bits(space, tuple(last))
    bits[second] = [(2, 4, 8)[c % 3] for c in range(len(bits[second]))]  # disagrees with the first
    plan = space.plan(layer_bits=bits, site_bits=8)
    assert width_orders(plan, prepared.analysis)[group.id][:3] == [0, 3, 6]  # by the first producer's widths
    exported = export_plan(prepared.model, prepared.analysis, plan)
    assert _weight_gathers(exported.model) == 1  # the second producer's weight
    x = np.load(DIGITS / "test.npz")["input"][:1]
    ref = _run(export_plan(prepared.model, prepared.analysis, plan, permute=False).model, {"input": x})[0]
    assert np.allclose(_run(exported.model, {"input": x})[0], ref, rtol=1e-5, atol=1e-5)
