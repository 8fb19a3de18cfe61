"""Exports that failed late on real models (issue 11 item 9), each class on a small hand-built
graph: a stale graph-output declaration that the full onnx checker refuses once the inputs are
pinned (ddddocr's CRNN), and a (near-)dead weight channel whose scale is below what a plan may
hold (PP-OCRv4's DBNet)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graph_passes.dry_run import dry_run_export
from graph_passes.errors import PlanError
from graph_passes.ort_utils import make_session
from graph_passes.prepare import prepare_model
from graph_passes.prune import prune_channels, repair_removal
from graph_passes.shapes import reconcile_output_shapes, undeclared_outputs, value_dims
from graph_passes.validate import check_model
from plugin.export import export_plan
from plugin.plan import SCALE_RANGE, CompressionPlan, LayerPlan, sound_weight_scale
from plugin.space import SearchSpace
from tests.graph_helpers import build

# torch's legacy exporter names output dims from dynamic_axes as given: the CRNN's logits,
# [T, 1, classes], are declared [1, seqlen]. Harmless while an input dim is symbolic
# (inference cannot reach the output), refused by the full checker once inputs are pinned.
STALE_OUTPUT = """
<ir_version: 7, opset_import: ["" : 12]>
g (float[1,8] x) => (float[1,seqlen] y) {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu(h)
  z = Gemm <transB = 1> (r, w2, b2)
  y = Reshape(z, shape)
}
"""


def _stale_output_model() -> onnx.ModelProto:
    model = build(STALE_OUTPUT, w1=[16, 8], b1=[16], w2=[12, 16], b2=[12])
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 1, -1], np.int64), "shape"))
    return model


def test_stale_output_declaration_is_replaced_and_pruning_passes_the_full_checker() -> None:
    prepared = prepare_model(_stale_output_model())
    (out,) = prepared.model.graph.output
    assert value_dims(out) == [1, 1, 12]  # what the graph computes, not the declared [1, seqlen]
    check_model(prepared.model, full_check=True)
    removal = repair_removal(prepared.analysis, {g.id: [0] for g in prepared.analysis.prunable_groups})
    assert removal
    pruned = prune_channels(prepared.model, prepared.analysis, removal)
    check_model(pruned, full_check=True)
    report = dry_run_export(prepared.model, prepared.analysis, (0, 8), (8,))
    assert [s.name for s in report.steps] == ["prune", "W8A8"]
    x = np.ones((1, 8), np.float32)
    assert make_session(pruned).run(None, {"x": x})[0].shape == (1, 1, 12)


def test_reconcile_keeps_declarations_that_only_say_less() -> None:
    graph = onnx.helper.make_graph([], "g", [], [
        onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["batch", 4]),
        onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2, 4]),
        onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, "n"])])
    inferred = [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 4]),
                onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [3, 4]),
                onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 5, 2])]
    assert reconcile_output_shapes(graph, inferred) == ["b", "c"]
    assert [value_dims(v) for v in graph.output] == [["batch", 4], [3, 4], [1, 5, 2]]
    loose = undeclared_outputs(graph.output)
    assert [v.type.tensor_type.HasField("shape") for v in loose] == [False] * 3
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in loose)
    assert value_dims(graph.output[0]) == ["batch", 4]  # copies: the graph is left alone


DEAD_CHANNEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
  h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu(h)
  y = Conv (r, w2, b2)
}
"""


def _dead_channel_model(exact_zero: bool = False) -> onnx.ModelProto:
    """Output channel 1 of the first conv has |w| ~ 5e-34 (a BatchNorm with gamma ~ 0 folded
    in): max|w| / 127 = 4e-36, below SCALE_RANGE (``exact_zero``: the channel's weights are 0)."""
    model = build(DEAD_CHANNEL, w1=[6, 3, 3, 3], b1=[6], w2=[4, 6, 1, 1], b2=[4])
    inits = {t.name: t for t in model.graph.initializer}
    w1 = numpy_helper.to_array(inits["w1"]).copy()
    w1[1] *= 0 if exact_zero else np.float32(5e-34) / np.abs(w1[1]).max()
    inits["w1"].CopyFrom(numpy_helper.from_array(w1, "w1"))
    return model


def test_dead_channel_gets_the_floor_scale_and_exports_exactly() -> None:
    prepared = prepare_model(_dead_channel_model())
    zeroed = prepare_model(_dead_channel_model(exact_zero=True))  # the channel as it computes
    space, oracle = SearchSpace(prepared.analysis), SearchSpace(zeroed.analysis)
    conv1 = next(n for n in space.layers if space.layers[n].layer.weight == "w1")
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    for bits in (8, 2):
        plan = space.plan(layer_bits={conv1: bits})
        scales = plan.layers[conv1].scales
        assert scales[1] == SCALE_RANGE[0] and all(s > SCALE_RANGE[0] for i, s in enumerate(scales) if i != 1)
        again = CompressionPlan.from_json(plan.to_json())  # our own plan passes our own validation
        assert again.layers[conv1].scales == scales
        exported = export_plan(prepared.model, prepared.analysis, again).model
        check_model(exported, full_check=True)
        reference = export_plan(zeroed.model, zeroed.analysis, oracle.plan(layer_bits={conv1: bits})).model
        got = make_session(exported).run(None, {"x": x})[0]
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, make_session(reference).run(None, {"x": x})[0])
        # the channel's integers are all 0, the live channels' are not
        ints = [numpy_helper.to_array(t).astype(np.int16) - (128 if t.data_type == onnx.TensorProto.UINT8 else 0)
                for t in exported.graph.initializer  # all-8-bit: uint8 with zero point 128 (graph_passes.qdq)
                if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                                   onnx.TensorProto.INT2) and list(t.dims) == [6, 3, 3, 3]]
        assert len(ints) == 1 and not ints[0][1].any() and ints[0][0].any()


def test_sound_weight_scale_floor_only() -> None:
    assert sound_weight_scale(4.13e-36) == SCALE_RANGE[0]
    assert sound_weight_scale(0.02) == 0.02 and sound_weight_scale(SCALE_RANGE[0]) == SCALE_RANGE[0]
    with pytest.raises(PlanError):  # a plan file that says so is still refused
        LayerPlan((8, 8), (0.1, 4.13e-36))


# --- a reachable budget the search's rounds do not reach (PP-OCRv4 rec in a short run)

DIGITS = "samples/digits"


@pytest.fixture(scope="module")
def digits_search():
    import torch

    from plugin.data import Dataset
    from plugin.engine.config import SearchConfig
    from plugin.engine.supernet import Supernet

    torch.manual_seed(0)
    prepared = prepare_model(f"{DIGITS}/model.onnx", ["input=1x1x8x8"])
    data = np.load(f"{DIGITS}/train.npz")
    train = Dataset({"input": data["input"][:64]}, data["labels"][:64].astype(np.int64))

    def build_net():
        config = SearchConfig(progress=False, batch_size=32, max_steps_per_epoch=1)
        return Supernet.build(prepared.model, config, analysis=prepared.analysis)
    return build_net, train


def test_budget_not_reached_in_rounds_is_completed_from_the_logits(digits_search) -> None:
    from plugin.budget import BudgetConfig, search_to_budget

    build_net, train = digits_search
    net = build_net()
    short = BudgetConfig(lam_start=1.0, lam_factor=1.01, max_rounds=2, check_every=1)
    result = search_to_budget(net, train, "size=40%", net.config, short)
    plan, searched = result.plan, net.discretise(cost_models=["size"])
    assert searched.cost_after["size"] > result.target  # the search alone did not get there
    assert plan.cost_after["size"] <= result.target == 0.4 * plan.cost_before["size"]
    completion = plan.metadata["budget_completion"]
    assert completion["channels_lowered"] > 0 and completion["searched_cost"] == searched.cost_after["size"]
    for name, layer in plan.layers.items():  # the search's pruning, widths only ever narrower
        before = searched.layers[name].bits
        assert [b == 0 for b in layer.bits] == [b == 0 for b in before]
        assert all(b <= a for a, b in zip(before, layer.bits))
        assert layer.scales is not None
    CompressionPlan.from_json(plan.to_json())


def test_budget_below_the_narrowest_kept_widths_still_fails(digits_search) -> None:
    from graph_passes.errors import CostModelError
    from plugin.budget import BudgetConfig, search_to_budget

    build_net, train = digits_search
    net = build_net()
    short = BudgetConfig(lam_start=1.0, lam_factor=1.01, max_rounds=1, check_every=1)
    with pytest.raises(CostModelError, match="every kept channel at its narrowest width it stays above"):
        search_to_budget(net, train, "size=20%", net.config, short)  # 2-bit everywhere is 25%


# --- an opset up-conversion that moves outputs by float rounding (PP-OCRv4 rec: 1.5e-5 relative)


def test_up_conversion_check_takes_the_models_own_rounding_noise(monkeypatch) -> None:
    import graph_passes.normalise as normalise_module
    from graph_passes.errors import VerificationError
    from graph_passes.qdq import _check_conversion

    before = build(DEAD_CHANNEL, w1=[6, 3, 3, 3], b1=[6], w2=[4, 6, 1, 1], b2=[4])

    def nudged(factor: float) -> onnx.ModelProto:
        after = onnx.ModelProto()
        after.CopyFrom(before)
        b2 = next(t for t in after.graph.initializer if t.name == "b2")
        b2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b2) + np.float32(factor), "b2"))
        return after

    monkeypatch.setattr(normalise_module, "noise_floor", lambda *args: 1e-5)  # the model's own noise
    _check_conversion(before, nudged(0.0), 17, 21, 1e-5)
    from graph_passes.ort_utils import random_feeds

    session = make_session(before)
    scale = float(np.abs(session.run(None, random_feeds(session))[0]).max())  # the feeds the check draws
    _check_conversion(before, nudged(2e-5 * scale), 17, 21, 1e-5)  # above rtol, within 10x the noise
    with pytest.raises(VerificationError, match="converted wrongly"):
        _check_conversion(before, nudged(0.5 * scale), 17, 21, 1e-5)
