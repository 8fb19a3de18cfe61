"""Tests for the normalisation passes and the normalise() pipeline.

Per pass: tiny models written in ONNX text, rewrites counted, numbers checked in onnxruntime
with a tight tolerance. Corpus: the onnx package's light_* models, and (slow) torchvision
exports from both torch exporters.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from graph_passes.eliminate_dead_nodes import EliminateDeadNodesPass
from graph_passes.eliminate_identity import EliminateIdentityPass
from graph_passes.errors import PassError, UnsupportedModelError, VerificationError
from graph_passes.fold_batchnorm import FoldBatchNormPass
from graph_passes.fold_constants import FoldConstantsPass
from graph_passes.normalise import AssignNodeNamesPass, normalise
from graph_passes.ort_utils import compare_outputs, make_session, random_feeds, run
from graph_passes.passes import Pass, PassResult

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
TIGHT = 1e-5


def build(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """Parse a model in ONNX text and add the given arrays as initializers."""
    model = onnx.parser.parse_model(f"{HEADER}\n{text}")
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_parity(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict | None = None, rtol=TIGHT
) -> None:
    onnx.checker.check_model(after, full_check=True)
    ref_session = make_session(before)
    feeds = feeds if feeds is not None else random_feeds(ref_session, seed=1)
    assert compare_outputs(run(after, feeds), run(ref_session, feeds)).max_rel_error <= rtol
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]


def rand(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed + sum(shape))
    value = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape)
    return value.astype(np.float32)


# --- FoldConstantsPass ------------------------------------------------------------------


def test_constant_node_becomes_initializer():
    model = build("""
    g (float[2,3] x) => (float[2,3] y) {
        c = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        s = Constant <value_float = 2.0> ()
        a = Mul(x, s)
        y = Add(a, c)
    }""")
    result = FoldConstantsPass()(model)
    assert result.modified and result.rewrites == 2
    assert ops(result.model) == Counter({"Mul": 1, "Add": 1})
    values = inits(result.model)
    np.testing.assert_array_equal(values["c"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(values["s"], np.float32(2.0))
    assert_parity(model, result.model)


def test_identity_shared_weight_stays_one_initializer():
    model = build("""
    g (float[1,2,5,5] x) => (float[1,2,5,5] y) {
        w2 = Identity(w)
        w3 = Identity(w2)
        a = Conv(x, w)
        b = Conv(a, w2)
        y = Conv(b, w3)
    }""", w=rand(2, 2, 1, 1))
    result = FoldConstantsPass()(model)
    assert result.rewrites == 2
    assert ops(result.model) == Counter({"Conv": 3})
    assert list(inits(result.model)) == ["w"]
    assert all(n.input[1] == "w" for n in result.model.graph.node)
    assert_parity(model, result.model)


def test_constant_of_shape_weights():
    model = build("""
    g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
        w = ConstantOfShape <value = float[1] {0.25}> (wshape)
        bf = ConstantOfShape <value = double[1] {0.5}> (bshape)
        b = Cast <to = 1> (bf)
        y = Conv(x, w, b)
    }""", wshape=np.array([2, 3, 1, 1], np.int64), bshape=np.array([2], np.int64))
    result = normalise(model)
    assert ops(result.model) == Counter({"Conv": 1})
    values = inits(result.model)
    assert sorted(values) == ["b", "w"]
    np.testing.assert_array_equal(values["w"], np.full((2, 3, 1, 1), 0.25, np.float32))
    assert values["b"].dtype == np.float32
    assert result.max_rel_error is not None and result.max_rel_error <= TIGHT
    assert_parity(model, result.model)


def test_shape_chain_folds_to_constant_shape():
    model = build("""
    g (float[2,3,4] x) => (float[2,12] y) {
        s = Shape(x)
        i0 = Constant <value = int64 {0}> ()
        n = Gather <axis = 0> (s, i0)
        ax = Constant <value = int64[1] {0}> ()
        nu = Unsqueeze(n, ax)
        m1 = Constant <value = int64[1] {-1}> ()
        shp = Concat <axis = 0> (nu, m1)
        y = Reshape(x, shp)
    }""")
    result = FoldConstantsPass()(model)
    assert result.rewrites == 7
    assert ops(result.model) == Counter({"Reshape": 1})
    np.testing.assert_array_equal(inits(result.model)["shp"], [2, -1])
    assert_parity(model, result.model)


def test_shape_of_symbolic_tensor_is_not_folded():
    model = build("""
    g (float[N,3] x) => (int64[2] y) { y = Shape(x) }""")
    assert not FoldConstantsPass()(model).modified


def test_nondeterministic_and_custom_domain_ops_are_not_folded():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    g (float[2] x) => (float[2] y, float[2] z) {
        r = RandomUniform <shape = [2], dtype = 1> ()
        y = Add(x, r)
        c = Constant <value = float[2] {1.0, 2.0}> ()
        z = my.ops.Twice(c)
    }""")
    result = FoldConstantsPass()(model)
    assert result.rewrites == 1  # only the Constant
    assert ops(result.model) == Counter({"RandomUniform": 1, "Add": 1, "Twice": 1})


def test_constant_graph_output_becomes_initializer():
    model = build("""
    g (float[2] x) => (float[2] y, float[2] k) {
        k = Identity(w)
        y = Add(x, w)
    }""", w=rand(2))
    result = FoldConstantsPass()(model)
    assert ops(result.model) == Counter({"Add": 1})
    assert sorted(inits(result.model)) == ["k", "w"]
    assert_parity(model, result.model)


def test_subgraph_nodes_are_not_folded_but_keep_working():
    model = build("""
    g (float[2] x, bool c) => (float[2] y) {
        k = Constant <value = float[2] {3.0, 4.0}> ()
        y = If(c) <
            then_branch = g1 () => (float[2] t) {
                one = Constant <value = float[2] {1.0, 1.0}> ()
                kk = Add(k, one)
                t = Mul(x, kk)
            },
            else_branch = g2 () => (float[2] e) { e = Sub(x, k) }
        >
    }""")
    result = FoldConstantsPass()(model)
    assert result.rewrites == 1
    assert "k" in inits(result.model)
    then_ops = [n.op_type for n in result.model.graph.node[0].attribute[0].g.node]
    assert then_ops == ["Constant", "Add", "Mul"]
    for flag in (True, False):
        feeds = {"x": rand(2), "c": np.array(flag)}
        assert_parity(model, result.model, feeds)


# --- EliminateIdentityPass --------------------------------------------------------------


@pytest.mark.parametrize("outer", ["b", "d"])
def test_identity_feeding_subgraph_outer_reference(outer):
    model = build(f"""
    g (float[2] x, bool c) => (float[2] y) {{
        a = Relu(x)
        b = Identity(a)
        d = Dropout(b)
        y = If(c) <
            then_branch = g1 () => (float[2] t) {{ t = Neg({outer}) }},
            else_branch = g2 () => (float[2] e) {{ e = Abs({outer}) }}
        >
    }}""")
    result = EliminateIdentityPass()(model)
    assert result.rewrites == 2
    assert ops(result.model) == Counter({"Relu": 1, "If": 1})
    branches = result.model.graph.node[1].attribute
    assert [list(b.g.node[0].input) for b in branches] == [["a"], ["a"]]
    for flag in (True, False):
        assert_parity(model, result.model, {"x": rand(2), "c": np.array(flag)}, rtol=0.0)


def test_loop_body_outer_references_survive_normalise():
    model = build("""
    g (float[2] x) => (float[2] y) {
        a = Relu(x)
        b = Identity(a)
        k = Constant <value = float[2] {0.5, 2.0}> ()
        kk = Mul(k, k)
        y = Loop(trip, cond, x) <
            body = g1 (int64 i, bool c, float[2] v) => (bool co, float[2] vo) {
                co = Identity(c)
                t = Mul(v, kk)
                vo = Add(t, b)
            }
        >
    }""", trip=np.array(3, np.int64), cond=np.array(True))
    result = normalise(model)
    assert ops(result.model) == Counter({"Relu": 1, "Loop": 1})
    body = result.model.graph.node[1].attribute[0].g
    assert [list(n.input) for n in body.node] == [["c"], ["v", "kk"], ["t", "a"]]
    np.testing.assert_array_equal(inits(result.model)["kk"], [0.25, 4.0])
    assert result.max_rel_error is not None and result.max_rel_error <= TIGHT


def test_identity_graph_output_keeps_output_name():
    model = build("""
    g (float[2] x) => (float[2] y, float[2] z, float[2] p) {
        a = Relu(x)
        y = Identity(a)
        z = Identity(a)
        p = Identity(x)
        q = Exp(a)
    }""")
    result = EliminateIdentityPass()(model)
    assert result.rewrites == 2  # y's Identity removed, z's rewired to read y
    nodes = {n.op_type: n for n in result.model.graph.node}
    assert list(nodes["Relu"].output) == ["y"]
    assert list(nodes["Exp"].input) == ["y"]
    assert [tuple(n.input) for n in result.model.graph.node if n.op_type == "Identity"] == [
        ("y",), ("x",)]
    assert_parity(model, result.model, rtol=0.0)


def test_dropout_with_used_mask_or_training_mode_stays():
    model = build("""
    g (float[2] x, bool t) => (float[2] y, bool[2] m, float[2] z) {
        y, m = Dropout(x)
        z = Dropout(x, r, t)
    }""", r=np.array(0.5, np.float32))
    assert not EliminateIdentityPass()(model).modified
    inference = build("""
    g (float[2] x) => (float[2] z, float[2] u) {
        a = Relu(x)
        z = Dropout(a, r, t)
        u = Dropout(x)
    }""", r=np.array(0.5, np.float32), t=np.array(False))
    result = EliminateIdentityPass()(inference)
    assert result.rewrites == 2  # one removed, one (graph input -> output) made an Identity
    assert [(n.op_type, list(n.input), list(n.output)) for n in result.model.graph.node] == [
        ("Relu", ["x"], ["z"]), ("Identity", ["x"], ["u"])]
    assert_parity(inference, result.model, rtol=0.0)


# --- FoldBatchNormPass ------------------------------------------------------------------

BN_PARAMS = dict(g=rand(4, positive=True, seed=1), be=rand(4, seed=2), mu=rand(4, seed=3),
                 var=rand(4, positive=True, seed=4))


@pytest.mark.parametrize("group, bias", [(1, True), (1, False), (4, True), (2, False)])
def test_batchnorm_folds_into_conv(group, bias):
    b_in = ", b" if bias else ""
    weights = dict(w=rand(4, 4 // group, 3, 3), **BN_PARAMS)
    if bias:
        weights["b"] = rand(4, seed=5)
    model = build(f"""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        c = Conv <group = {group}, pads = [1, 1, 1, 1]> (x, w{b_in})
        y = BatchNormalization <epsilon = 0.001> (c, g, be, mu, var)
    }}""", **weights)
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 1
    assert ops(result.model) == Counter({"Conv": 1})
    assert_parity(model, result.model)
    final = EliminateDeadNodesPass()(result.model).model
    assert len(final.graph.initializer) == 2


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (4,), (1, 4), (3, 4), ()])
def test_batchnorm_folds_into_gemm(trans_b, bias_shape):
    weights = dict(w=rand(4, 5) if trans_b else rand(5, 4), **BN_PARAMS)
    c_in = ""
    if bias_shape is not None:
        weights["c"] = rand(*bias_shape, seed=6) if bias_shape else np.float32(0.3)
        c_in = ", c"
    model = build(f"""
    g (float[3,5] x) => (float[3,4] y) {{
        h = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (x, w{c_in})
        y = BatchNormalization(h, g, be, mu, var)
    }}""", **weights)
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 1 and ops(result.model) == Counter({"Gemm": 1})
    assert_parity(model, result.model)


@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_folds_into_conv_transpose(group):
    model = build(f"""
    g (float[1,2,5,5] x) => (float[1,4,10,10] y) {{
        c = ConvTranspose <group = {group}, strides = [2, 2]> (x, w, b)
        y = BatchNormalization(c, g, be, mu, var)
    }}""", w=rand(2, 4 // group, 2, 2), b=rand(4, seed=7), **BN_PARAMS)
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 1 and ops(result.model) == Counter({"ConvTranspose": 1})
    assert_parity(model, result.model)


def test_batchnorm_with_shared_producer_weight_copies_the_weight():
    model = build("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
        c = Conv(x, w)
        y = BatchNormalization(c, g, be, mu, var)
        z = Conv(x, w)
    }""", w=rand(4, 4, 1, 1), **BN_PARAMS)
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 1
    np.testing.assert_array_equal(inits(result.model)["w"], rand(4, 4, 1, 1))
    conv_weights = [n.input[1] for n in result.model.graph.node]
    assert conv_weights[1] == "w" and conv_weights[0] != "w"
    assert_parity(model, result.model)


def test_batchnorm_not_foldable_stays():
    model = build("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z, float[1,4,6,6] u) {
        a = Conv(x, w2)
        b = Conv(x, w2)
        cat = Concat <axis = 1> (a, b)
        y = BatchNormalization(cat, g, be, mu, var)
        c = Conv(x, w)
        z = BatchNormalization(c, g, be, mu, var)
        u = Relu(c)
    }""", w=rand(4, 4, 1, 1), w2=rand(2, 4, 1, 1), **BN_PARAMS)
    assert not FoldBatchNormPass()(model).modified
    result = normalise(model)
    assert ops(result.model)["BatchNormalization"] == 2


def test_batchnorm_after_dead_use_folds_in_normalise():
    model = build("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {
        c = Conv(x, w)
        y = BatchNormalization(c, g, be, mu, var)
        dead = Relu(c)
    }""", w=rand(4, 4, 1, 1), **BN_PARAMS)
    result = normalise(model)
    assert ops(result.model) == Counter({"Conv": 1})
    assert result.stats.batchnorms_folded == 1


def test_consecutive_batchnorms_fold_in_one_pass():
    model = build("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {
        c = Conv(x, w)
        n = BatchNormalization(c, g, be, mu, var)
        y = BatchNormalization(n, g, be, mu, var)
    }""", w=rand(4, 4, 1, 1), **BN_PARAMS)
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 2 and ops(result.model) == Counter({"Conv": 1})
    assert_parity(model, result.model)


@settings(max_examples=25, deadline=None)
@given(
    channels=st.sampled_from([1, 2, 4, 6]),
    depthwise=st.booleans(),
    kernel=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_fold_property(channels, depthwise, kernel, bias, seed):
    rng = np.random.default_rng(seed)
    group = channels if depthwise else 1
    weights = {
        "w": rng.standard_normal((channels, channels // group, kernel, kernel)),
        "g": rng.uniform(0.1, 3.0, channels), "be": rng.standard_normal(channels),
        "mu": rng.standard_normal(channels), "var": rng.uniform(0.01, 4.0, channels),
    }
    if bias:
        weights["b"] = rng.standard_normal(channels)
    b_in = ", b" if bias else ""
    size = 6 - kernel + 1
    model = build(f"""
    g (float[2,{channels},6,6] x) => (float[2,{channels},{size},{size}] y) {{
        c = Conv <group = {group}> (x, w{b_in})
        y = BatchNormalization(c, g, be, mu, var)
    }}""", **{k: v.astype(np.float32) for k, v in weights.items()})
    result = FoldBatchNormPass()(model)
    assert result.rewrites == 1
    assert_parity(model, result.model)


# --- EliminateDeadNodesPass -------------------------------------------------------------


def test_dead_branch_removed_but_subgraph_references_kept():
    model = build("""
    g (float[2] x, bool c) => (float[2] y) {
        a = Relu(x)
        d = Mul(a, w)
        e = Exp(d)
        k = Neg(x)
        y = If(c) <
            then_branch = g1 () => (float[2] t) { t = Add(a, k) },
            else_branch = g2 () => (float[2] f) { f = Sub(a, v) }
        >
    }""", w=rand(2), v=rand(2, seed=3), unused=rand(3))
    result = EliminateDeadNodesPass()(model)
    assert result.modified
    assert ops(result.model) == Counter({"Relu": 1, "Neg": 1, "If": 1})
    assert sorted(inits(result.model)) == ["v"]
    for flag in (True, False):
        assert_parity(model, result.model, {"x": rand(2), "c": np.array(flag)}, rtol=0.0)


# --- normalise() ------------------------------------------------------------------------


def test_normalise_names_nodes_and_reports():
    model = build("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        n = BatchNormalization(c, g, be, mu, var)
        i = Identity(n)
        y = Relu(i)
    }""", w=rand(4, 4, 3, 3), **BN_PARAMS)
    model.graph.node[0].name = "dup"
    model.graph.node[3].name = "dup"
    result = normalise(model)
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert "dup" in names and ops(result.model) == Counter({"Conv": 1, "Relu": 1})
    assert result.passes_applied == ["AssignNodeNamesPass", "EliminateIdentityPass",
                                     "FoldBatchNormPass", "EliminateDeadNodesPass"]
    assert result.stats.nodes_before == 4 and result.stats.nodes_after == 2
    assert result.max_rel_error is not None and result.max_rel_error <= TIGHT
    assert {v.name for v in result.model.graph.value_info} == {"n"}
    assert len(model.graph.node) == 4  # the input is not modified
    assert normalise(result.model).passes_applied == []  # a fixed point


def test_initializers_listed_as_inputs_become_constants():
    model = build("""
    g (float[1,4,6,6] x, float[4,4,1,1] w) => (float[1,4,6,6] y) {
        c = Conv(x, w)
        y = BatchNormalization(c, g, be, mu, var)
    }""", w=rand(4, 4, 1, 1), **BN_PARAMS)
    assert not FoldBatchNormPass()(model).modified  # an overridable weight is not constant
    result = normalise(model)
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert ops(result.model) == Counter({"Conv": 1})
    assert result.max_rel_error is not None and result.max_rel_error <= TIGHT


def test_assign_node_names_is_deterministic():
    model = build("""
    g (float[2] x) => (float[2] y) { a = Relu(x) y = Relu(a) }""")
    first = AssignNodeNamesPass()(model).model
    second = AssignNodeNamesPass()(model).model
    assert [n.name for n in first.graph.node] == ["Relu_0", "Relu_1"]
    assert first == second


def test_normalise_custom_domain_is_unsupported():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    g (float[2] x) => (float[2] y) { y = my.ops.Twice(x) }""")
    with pytest.raises(UnsupportedModelError, match="'Twice' of domain 'my.ops'"):
        normalise(model)
    assert normalise(model, verify=False).max_rel_error is None


class _CorruptWeightsPass(Pass):
    def run(self, model: onnx.ModelProto) -> PassResult:
        tensor = model.graph.initializer[0]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.01, tensor.name))
        return PassResult(model, True)


def test_normalise_raises_on_parity_failure(monkeypatch):
    import graph_passes.normalise as normalise_module

    model = build("""
    g (float[2] x) => (float[2] y) { y = Mul(x, w) }""", w=rand(2))
    monkeypatch.setattr(normalise_module, "normalisation_passes", lambda: [_CorruptWeightsPass()])
    with pytest.raises(VerificationError, match="output 'y'"):
        normalise(model)


def test_pass_failure_names_the_pass():
    model = build("""
    g (float[2] x) => (float[2] y) {
        s = Constant <value = double[2] {1.0, 2.0}> ()
        t = Cast <to = 1> (s)
        y = Add(x, t)
    }""")
    # an unrunnable constant subgraph (here: an opset the runtime lacks) becomes a PassError
    model.opset_import[0].version = 999
    with pytest.raises(PassError, match="FoldConstantsPass"):
        FoldConstantsPass()(model)


# --- corpus -----------------------------------------------------------------------------

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(glob.glob(os.path.join(LIGHT_DIR, "light_*.onnx")))
INDIRECTION_OPS = {"Identity", "Constant", "ConstantOfShape", "Dropout"}


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=os.path.basename)
def test_light_models_normalise_with_parity(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True)
    result = normalise(model, rtol=1e-4)
    assert result.max_rel_error is not None and result.max_rel_error <= 1e-4
    counts = ops(result.model)
    assert not INDIRECTION_OPS & set(counts)
    if "densenet" not in path:
        assert counts["BatchNormalization"] == 0
    onnx.checker.check_model(result.model)


def test_light_models_found():
    assert len(LIGHT_MODELS) >= 9


# --- corpus: torchvision exports (slow) -------------------------------------------------

TORCHVISION_ARCHS = ["resnet18", "mobilenet_v2", "densenet121"]
# "legacy-nofold" keeps every BatchNormalization (and the exporter's Constant nodes): the
# default exporters already fold BN into Conv themselves, so this is where our fold works.
EXPORTERS = ["legacy", "legacy-nofold", "dynamo"]


def _torchvision_export(arch: str, exporter: str, path: str) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():  # non-trivial BN statistics, so that folding is tested
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter" notice
        if exporter == "dynamo":  # opset 18 is the dynamo exporter's lowest
            torch.onnx.export(net, (x,), path, dynamo=True, opset_version=18,
                              external_data=False)
        else:
            torch.onnx.export(net, x, path, dynamo=False, opset_version=17,
                              do_constant_folding=exporter == "legacy")
    return onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_exports_normalise_with_parity(arch, exporter, tmp_path):
    model = _torchvision_export(arch, exporter, str(tmp_path / f"{arch}.onnx"))
    result = normalise(model, rtol=1e-4)
    assert result.max_rel_error is not None and result.max_rel_error <= 1e-4
    counts = ops(result.model)
    assert not INDIRECTION_OPS & set(counts)
    if arch != "densenet121":
        assert counts["BatchNormalization"] == 0
    if exporter == "legacy-nofold":
        assert result.stats.batchnorms_folded > 0
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    onnx.checker.check_model(result.model, full_check=True)
    assert normalise(result.model, verify=False).passes_applied == []


def test_weight_layers_get_their_own_copy_of_shared_biases_and_share_the_weight():
    from graph_passes.untie import untie_weight_initializers
    from graph_passes.ort_utils import compare_outputs, make_session, random_feeds

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,3,3] x) => (float[1,4,3,3] y) {
      a = Conv <pads=[1,1,1,1]> (x, w, b)
      y = Conv <pads=[1,1,1,1]> (a, w, b)
    }
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal([4, 4, 3, 3]).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal([4]).astype(np.float32), "b"),
    ])
    untied, copies = untie_weight_initializers(model)
    assert copies == 1  # the bias; the weight stays one tensor (tests/test_shared_weights.py)
    assert untied.graph.node[0].input[1:] == ["w", "b"]
    assert untied.graph.node[1].input[1] == "w" and untied.graph.node[1].input[2] != "b"
    sess = make_session(model)
    feeds = random_feeds(sess)
    assert compare_outputs(make_session(untied).run(None, feeds), sess.run(None, feeds)).max_rel_error == 0
