"""Channel-group rules per op family: the groups found, why blocked ones are blocked, and the
pruning oracle (zeroing consumer input slices == structurally removing the channels)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graph_passes.channel_groups import analyse
from graph_passes.errors import PruningError
from graph_passes.prune import prune_channels

from .graph_helpers import build, group_of, oracle, prepare

W1 = dict(w1=[8, 3, 3, 3], b1=[8], w2=[6, 8, 3, 3])


def two_convs(middle: str, opset: int = 17, extra: str = "", **shapes) -> tuple:
    """conv1 -> <middle ops: t -> u> -> conv2; returns (model, analysis)."""
    ir = 8 if opset <= 18 else 9 if opset <= 20 else 10
    text = f"""
    <ir_version: {ir}, opset_import: ["" : {opset}]>
    g (float[1,3,6,6] x) => (float[1,6,H,W] y) {{
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      {middle}
      y = Conv <pads=[1,1,1,1]> (u, w2)
    }}
    """
    return prepare(build(text, **W1, **shapes))


UNARY = [
    ("u = Relu(t)", 17), ("u = LeakyRelu <alpha=0.1> (t)", 17), ("u = Sigmoid(t)", 17),
    ("u = HardSigmoid(t)", 17), ("u = HardSwish(t)", 17), ("u = Tanh(t)", 17),
    ("u = Erf(t)", 17), ("u = Softplus(t)", 17), ("u = Gelu(t)", 20), ("u = Mish(t)", 18),
    ("u = Elu(t)", 17), ("u = Abs(t)", 17), ("u = Dropout(t)", 17), ("u = Identity(t)", 17),
    ("u = Cast <to=1> (t)", 17), ("lo = Constant <value=float {0.0}> ()\n hi = Constant <value=float {6.0}> ()\n u = Clip(t, lo, hi)", 17),
]


@pytest.mark.parametrize("middle,opset", UNARY, ids=[m.split("(")[0].split("=")[-1].strip() for m, _ in UNARY])
def test_unary_ops_pass_channels_through(middle, opset):
    model, a = two_convs(middle, opset)
    g = group_of(a, "t")
    assert g.prunable and g.size == 8
    assert len(g.consumers) == 1
    assert oracle(model, a) == 1


def test_prelu_slope_is_a_per_channel_constant():
    model, a = two_convs("u = PRelu(t, slope)", slope=[8, 1, 1])
    g = group_of(a, "t")
    assert g.prunable
    assert "slope" in [m.tensor for m in g.members_of("constant")]
    pruned = prune_channels(model, a, {g.id: [0, 5]})
    slope = [t for t in pruned.graph.initializer if t.name.startswith("slope")][0]
    assert list(slope.dims) == [6, 1, 1]
    oracle(model, a)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"])
def test_binary_ops_tie_branches_and_slice_constants(op):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {{
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      b = Conv <pads=[1,1,1,1]> (x, w3)
      ra = Sigmoid(a)
      sb = Sigmoid(b)
      one = Constant <value=float {{1.0}}> ()
      rb = Add(sb, one)
      s = {op}(ra, rb)
      s2 = Mul(s, scale)
      s3 = Add(s2, shift)
      y = Conv <pads=[1,1,1,1]> (s3, w2)
    }}
    """
    model, a = prepare(build(text, **W1, w3=[8, 3, 3, 3], scale=[8, 1, 1], shift=[1]))
    g = group_of(a, "a")
    assert g is group_of(a, "b") and g.prunable and g.size == 8
    assert {m.tensor for m in g.members_of("constant")} >= {"scale"}
    assert oracle(model, a) == 1


def test_where_ties_all_non_constant_operands():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      b = Conv <pads=[1,1,1,1]> (x, w3)
      c = Greater(a, b)
      s = Where(c, a, b)
      y = Conv <pads=[1,1,1,1]> (s, w2)
    }
    """
    model, a = prepare(build(text, **W1, w3=[8, 3, 3, 3]))
    assert group_of(a, "a") is group_of(a, "b")
    oracle(model, a)


def test_operand_broadcast_into_all_channels_blocks_its_channel():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      m = Conv <pads=[1,1,1,1]> (x, wm)
      s = Mul(a, m)
      y = Conv <pads=[1,1,1,1]> (s, w2)
    }
    """
    model, a = prepare(build(text, **W1, wm=[1, 3, 3, 3]))
    assert group_of(a, "a").prunable
    blocked = group_of(a, "m")
    assert not blocked.prunable and "broadcasts it into all channels" in blocked.reasons[0]
    oracle(model, a)


SPATIAL = [
    "u = MaxPool <kernel_shape=[2,2], pads=[0,0,1,1], strides=[1,1]> (t)",
    "u = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (t)",
    "p = Constant <value=int64[8] {0,0,1,1,0,0,0,0}> ()\n u = Pad <mode=\"reflect\"> (t, p)",
    "s = Constant <value=float[4] {1.0,1.0,2.0,2.0}> ()\n u = Resize <mode=\"nearest\"> (t, , s)",
    "r = ReduceMean <axes=[3], keepdims=1> (t)\n u = Add(t, r)",
    "r = ReduceMax <axes=[2,3], keepdims=1> (t)\n u = Mul(t, r)",
    "r = GlobalAveragePool(t)\n s = Sigmoid(r)\n u = Mul(t, s)",
]


@pytest.mark.parametrize("middle", SPATIAL, ids=["MaxPool", "AveragePool", "Pad", "Resize", "ReduceMean",
                                                 "ReduceMax", "SqueezeExcite"])
def test_spatial_ops_keep_channels(middle):
    model, a = two_convs(middle)
    g = group_of(a, "t")
    assert g.prunable
    assert oracle(model, a) == 1


def test_resize_with_sizes_input_is_rewritten():
    model, a = two_convs("sz = Constant <value=int64[4] {1,8,12,12}> ()\n u = Resize <mode=\"linear\"> (t, , , sz)")
    g = group_of(a, "t")
    pruned = prune_channels(model, a, {g.id: [2]})
    sizes = [t for t in pruned.graph.initializer if list(t.dims) == [4] and t.data_type == 7]
    assert [list(np.frombuffer(t.raw_data, np.int64)) for t in sizes] == [[1, 7, 12, 12]]
    oracle(model, a)


def test_global_pool_flatten_gemm_prunes_blocks_of_rows():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x) => (float[1,5] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      r = Relu(t)
      p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
      f = Flatten(p)
      h = Gemm <transB=1> (f, wf, bf)
      h2 = Relu(h)
      y = MatMul(h2, wm)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], wf=[12, 32], bf=[12], wm=[12, 5]))
    g = group_of(a, "t")
    consumer = [m for m in g.members_of("consumer") if m.node.startswith("Gemm")][0]
    assert consumer.positions.size == 32  # 8 channels x 2x2 positions
    assert list(consumer.channels[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    hidden = group_of(a, "h")
    assert hidden.prunable and hidden.consumers == [a.layers[-1].name]
    assert not group_of(a, "y").prunable
    pruned = prune_channels(model, a, {g.id: [1, 2], hidden.id: [0]})
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [6, 3, 3, 3] in dims.values() and [11, 24] in dims.values() and [11, 5] in dims.values()
    assert oracle(model, a) == 2


def test_reshape_flatten_with_constant_target_is_rewritten():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x) => (float[1,5] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      shape = Constant <value=int64[2] {1,128}> ()
      f = Reshape(t, shape)
      y = Gemm (f, wf)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], wf=[128, 5]))
    g = group_of(a, "t")
    assert g.prunable
    pruned = prune_channels(model, a, {g.id: [0, 7]})
    shapes = [t for t in pruned.graph.initializer if list(t.dims) == [2]]
    assert [list(np.frombuffer(s.raw_data, np.int64)) for s in shapes] == [[1, 96]]
    oracle(model, a)


def test_concat_along_channels_keeps_segments_with_offsets():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      b = Conv <pads=[1,1,1,1]> (x, w3)
      c = Concat <axis=1> (a, b)
      y = Conv <pads=[1,1,1,1]> (c, w2)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], w3=[4, 3, 3, 3], w2=[6, 12, 3, 3]))
    ga, gb = group_of(a, "a"), group_of(a, "b")
    assert ga is not gb and ga.size == 8 and gb.size == 4
    cons_b = [m for m in gb.members_of("consumer")][0]
    assert list(cons_b.positions) == list(range(8, 12))
    assert oracle(model, a) == 2


def test_concat_along_other_axis_ties_inputs():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,12,6] y) {
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      b = Conv <pads=[1,1,1,1]> (x, w3)
      c = Concat <axis=2> (a, b)
      y = Conv <pads=[1,1,1,1]> (c, w2)
    }
    """
    model, a = prepare(build(text, **W1, w3=[8, 3, 3, 3]))
    assert group_of(a, "a") is group_of(a, "b")
    oracle(model, a)


@pytest.mark.parametrize("opset", [13, 18])
def test_split_and_slice_on_channel_axis(opset):
    split = ("sp = Constant <value=int64[2] {3,5}> ()\n s1, s2 = Split <axis=1> (t, sp)" if opset == 13
             else "s1, s2 = Split <axis=1, num_outputs=2> (t)")
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {{
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      {split}
      st = Constant <value=int64[1] {{1}}> ()
      en = Constant <value=int64[1] {{3}}> ()
      ax = Constant <value=int64[1] {{1}}> ()
      s3 = Slice(s2, st, en, ax)
      y1 = Conv <pads=[1,1,1,1]> (s1, w2)
      y2 = Conv <pads=[1,1,1,1]> (s3, w4)
      y = Add(y1, y2)
    }}
    """
    n1 = 3 if opset == 13 else 4
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], w2=[6, n1, 3, 3], w4=[6, 2, 3, 3]))
    g = group_of(a, "t")
    assert g.prunable and g.size == 8
    assert oracle(model, a) == 1


def test_depthwise_conv_ties_input_to_output_and_grouped_conv_prunes_whole_groups():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      d = Conv <group=8, pads=[1,1,1,1]> (t, wd, bd)
      e = Conv <group=2, pads=[1,1,1,1]> (d, wg, bg)
      y = Conv <pads=[1,1,1,1]> (e, w2)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], wd=[8, 1, 3, 3], bd=[8], wg=[8, 4, 3, 3],
                             bg=[8], w2=[6, 8, 3, 3]))
    g = group_of(a, "t")
    assert g is group_of(a, "d") and g is group_of(a, "e")
    assert g.size == 2  # two conv groups of the grouped conv: each is one unit of 4+4+4+4 channels
    pruned = prune_channels(model, a, {g.id: [1]})
    grouped = [n for n in pruned.graph.node if n.op_type == "Conv"][2]
    assert [at.i for at in grouped.attribute if at.name == "group"] == [1]
    oracle(model, a)


def test_transpose_to_channels_last_then_matmul():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x) => (float[1,4,4,5] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      p = Transpose <perm=[0,2,3,1]> (t)
      h = Add(p, bias)
      y = MatMul(h, wm)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], bias=[8], wm=[8, 5]))
    g = group_of(a, "t")
    assert g.prunable and "bias" in [m.tensor for m in g.members_of("constant")]
    oracle(model, a)


BLOCKERS = [
    ("u = Softmax <axis=1> (t)", "normalises across the channel axis"),
    ("u = LRN <size=3> (t)", "neighbouring channels"),
    ("r = ReduceMean <axes=[1], keepdims=1> (t)\n u = Mul(t, r)", "reduces over the channel axis"),
    ("s = Constant <value=int64[5] {1,2,4,6,6}> ()\n r = Reshape(t, s)\n"
     " q = Transpose <perm=[0,2,1,3,4]> (r)\n s2 = Constant <value=int64[4] {1,8,6,6}> ()\n u = Reshape(q, s2)",
     "splits or reorders the channel axis"),
    ("p = Constant <value=int64[8] {0,1,0,0,0,-1,0,0}> ()\n u = Pad(t, p)", "pads the channel axis"),
    ("ax = Constant <value=int64 {1}> ()\n u = CumSum(t, ax)", "running sum along an axis"),
    ("u = custom.Foo(t)", "no channel rule"),
]


@pytest.mark.parametrize("middle,reason", BLOCKERS, ids=["Softmax", "LRN", "ReduceMeanC", "shuffle", "PadC", "CumSum", "custom"])
def test_ops_that_mix_channels_block_the_group(middle, reason):
    if "custom" in middle:
        text = """
        <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
          t = Conv <pads=[1,1,1,1]> (x, w1, b1)
          u = custom.Foo(t)
          y = Conv <pads=[1,1,1,1]> (u, w2)
        }
        """
        model = build(text, **W1)
        model = onnx.shape_inference.infer_shapes(model)
        a = analyse(model)
        assert a.unknown_ops == {"custom::Foo": 1}
    else:
        model, a = two_convs(middle)
    g = group_of(a, "t")
    assert not g.prunable
    assert any(reason in r for r in g.reasons), g.reasons


def test_graph_output_blocks_and_control_flow_is_analysed_as_a_wall():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x, bool c) => (float[1,8,6,6] t, float[1,6,6,6] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      a = Conv <pads=[1,1,1,1]> (x, w3)
      u = If (c) <then_branch = g1 () => (float[1,8,6,6] o1) { o1 = Relu(a) },
                  else_branch = g2 () => (float[1,8,6,6] o2) { o2 = Sigmoid(a) }>
      y = Conv <pads=[1,1,1,1]> (u, w2)
    }
    """
    model, a = prepare(build(text, **W1, w3=[8, 3, 3, 3]))
    assert "reaches graph output 't'" in group_of(a, "t").reasons
    assert any("control flow" in r for r in group_of(a, "a").reasons)


def test_pruning_requests_are_validated():
    model, a = two_convs("u = Relu(t)")
    g = group_of(a, "t")
    out = group_of(a, "y")
    with pytest.raises(PruningError, match="unknown channel group 'g99'"):
        prune_channels(model, a, {"g99": [0]})
    with pytest.raises(PruningError, match="not prunable"):
        prune_channels(model, a, {out.id: [0]})
    with pytest.raises(PruningError, match="keep at least one"):
        prune_channels(model, a, {g.id: range(8)})
    with pytest.raises(PruningError, match="got index 8"):
        prune_channels(model, a, {g.id: [8]})


def test_batchnorm_that_cannot_be_folded_is_sliced():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      b = Conv <pads=[1,1,1,1]> (x, w3)
      c = Concat <axis=1> (a, b)
      n = BatchNormalization (c, sc, bi, mu, var_pos)
      r = Relu(n)
      y = Conv <pads=[1,1,1,1]> (r, w2)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], w3=[4, 3, 3, 3], sc=[12], bi=[12], mu=[12],
                             var_pos=[12], w2=[6, 12, 3, 3]))
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1
    ga = group_of(a, "a")
    assert {"sc", "bi", "mu", "var_pos"} <= {m.tensor for m in ga.members_of("constant")}
    assert oracle(model, a) == 2


def test_removal_that_empties_a_sliced_tensor_is_refused_and_repairable():
    from graph_passes.prune import repair_removal

    model, a = prepare(build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      st = Constant <value=int64[1] {2}> ()
      en = Constant <value=int64[1] {5}> ()
      ax = Constant <value=int64[1] {1}> ()
      u = Slice(t, st, en, ax)
      y = Conv <pads=[1,1,1,1]> (u, w2)
    }
    """, w1=[8, 3, 3, 3], b1=[8], w2=[6, 3, 3, 3]))
    g = group_of(a, "t")
    with pytest.raises(PruningError, match="would leave tensor 'u' with no channels"):
        prune_channels(model, a, {g.id: [2, 3, 4]})
    repaired = repair_removal(a, {g.id: [0, 2, 3, 4]}, score={g.id: np.array([0, 0, 0, 5, 0, 0, 0, 0.0])})
    assert repaired == {g.id: [0, 2, 4]}
    oracle(model, a)


def test_nodes_out_of_topological_order_are_sorted_with_networkx():
    model, a = two_convs("u = Relu(t)")
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    nodes = list(shuffled.graph.node)[::-1]
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    b = analyse(shuffled)
    assert [(g.size, g.prunable) for g in b.groups] == [(g.size, g.prunable) for g in a.groups]


def test_conv_transpose_is_a_weight_layer_on_both_sides():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x) => (float[1,6,8,8] y) {
      t = Conv <pads=[1,1,1,1]> (x, w1, b1)
      u = ConvTranspose <strides=[2,2], kernel_shape=[2,2]> (t, wt, bt)
      r = Relu(u)
      y = Conv <pads=[1,1,1,1]> (r, w2)
    }
    """
    model, a = prepare(build(text, w1=[8, 3, 3, 3], b1=[8], wt=[8, 5, 2, 2], bt=[5], w2=[6, 5, 3, 3]))
    g_in, g_out = group_of(a, "t"), group_of(a, "u")
    assert g_in.prunable and g_out.prunable and g_out.size == 5
    pruned = prune_channels(model, a, {g_in.id: [1, 2], g_out.id: [4]})
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert dims["wt"] == [6, 4, 2, 2] and dims["bt"] == [4] and dims["w2"] == [6, 4, 3, 3]
    assert oracle(model, a) == 2
