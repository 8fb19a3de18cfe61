"""TensorFlow / Keras exports (issue 11, item 2): tf2onnx-style NHWC graphs.

tf2onnx keeps the Keras layout: the model's tensors are NHWC and every Conv / pool is wrapped in
a Transpose to NCHW and back; per-channel biases are Adds of a [C] vector on the last axis; Pads
and Reduces name NHWC axes; convs and pools may carry ``auto_pad=SAME_UPPER|SAME_LOWER``;
SpaceToDepth / DepthToSpace move blocks of pixels into channels and back. Each graph below is
built with ``onnx.helper`` the way tf2onnx writes it, and checked with the suite's oracle
(removing a group's channels in the ONNX graph == zeroing them, in onnxruntime) and for the
groups that must (or must not) be prunable.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.prune import prune_channels

from .graph_helpers import group_of, oracle, prepare


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    ir = 8 if opset <= 18 else 9 if opset <= 20 else 10
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir,
                             producer_name="tf2onnx")


def _rand(rng, *shape, positive: bool = False) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return np.abs(v) + 0.5 if positive else v


def _i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _nchw(name: str, x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Transpose", [x], [out], name=name, perm=[0, 3, 1, 2])


def _nhwc(name: str, x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Transpose", [x], [out], name=name, perm=[0, 2, 3, 1])


def _conv(name: str, x: str, w: str, out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [out], name=name, **attrs)


# --- the main chain ---------------------------------------------------------------------------
def _chain(opset: int = 13, pad_channels: bool = False, reduce_axes=(1, 2), negative_axes: bool = False):
    """x NHWC -> Transpose -> Conv (SAME_UPPER, stride 2) -> Transpose -> Add [C] bias -> Relu ->
    Pad (NHWC axes) -> Transpose -> MaxPool (SAME_LOWER) -> Transpose -> ReduceMean -> MatMul."""
    rng = np.random.default_rng(0)
    c = 8
    pads = [0, 1, 2, 1 if pad_channels else 0, 0, 2, 1, 0]  # N H W C begins, N H W C ends
    axes = [a - 4 for a in reduce_axes] if negative_axes else list(reduce_axes)
    inits = {
        "conv1/kernel": _rand(rng, c, 3, 3, 3),
        "conv1/bias": _rand(rng, c),
        "pad/paddings": _i64(*pads),
        "dense/kernel": _rand(rng, c + (1 if pad_channels else 0), 5),
    }
    nodes = [
        _nchw("conv1/Conv2D__6", "input_1", "t0"),
        _conv("conv1/Conv2D", "t0", "conv1/kernel", "t1", kernel_shape=[3, 3], strides=[2, 2],
              auto_pad="SAME_UPPER"),
        _nhwc("conv1/Conv2D__8", "t1", "t2"),
        helper.make_node("Add", ["t2", "conv1/bias"], ["t3"], name="conv1/BiasAdd"),
        helper.make_node("Relu", ["t3"], ["t4"], name="conv1/Relu"),
        helper.make_node("Pad", ["t4", "pad/paddings"], ["t5"], name="pad/Pad", mode="constant"),
        _nchw("pool/MaxPool__12", "t5", "t6"),
        helper.make_node("MaxPool", ["t6"], ["t7"], name="pool/MaxPool", kernel_shape=[3, 3],
                         strides=[2, 2], auto_pad="SAME_LOWER"),
        _nhwc("pool/MaxPool__14", "t7", "t8"),
    ]
    if opset >= 18:
        inits["gap/axes"] = _i64(*axes)
        nodes.append(helper.make_node("ReduceMean", ["t8", "gap/axes"], ["t9"], name="gap/Mean", keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", ["t8"], ["t9"], name="gap/Mean", axes=axes, keepdims=0))
    out_dims = [1, 5]
    if sorted(reduce_axes) != [1, 2]:
        out_dims = [1, 4]  # over H and C of [1, 4, 4, 8]: the output is the graph's
    nodes.append(helper.make_node("MatMul", ["t9", "dense/kernel"], ["logits"], name="dense/MatMul"))
    if sorted(reduce_axes) != [1, 2]:
        nodes[-1] = helper.make_node("Identity", ["t9"], ["logits"], name="out")
    return _model(nodes, [("input_1", [1, 9, 9, 3])], [("logits", out_dims)], inits, opset)


@pytest.mark.parametrize("opset", [13, 18])
def test_tf2onnx_chain_conv_group_is_prunable(opset):
    model, a = prepare(_chain(opset))
    conv = group_of(a, "conv1/Conv2D")
    assert conv.prunable and conv.size == 8, conv.reasons
    assert "conv1/bias" in [m.tensor for m in conv.members_of("constant")]
    assert conv.consumers == ["dense/MatMul"]
    assert not group_of(a, "dense/MatMul").prunable  # the graph output
    assert [g.id for g in a.prunable_groups] == [conv.id]
    pruned = prune_channels(model, a, {conv.id: [1, 6]})
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [6, 3, 3, 3] in dims.values() and [6, 5] in dims.values() and [6] in dims.values()
    # auto_pad stays what it was: the pads of SAME_* depend on spatial sizes only
    modes = {n.op_type: helper.get_attribute_value(next(x for x in n.attribute if x.name == "auto_pad"))
             for n in pruned.graph.node if n.op_type in ("Conv", "MaxPool")}
    assert modes == {"Conv": b"SAME_UPPER", "MaxPool": b"SAME_LOWER"}
    assert oracle(model, a) == 1


def test_reduce_axes_are_read_relative_to_the_tracked_channel_axis():
    model, a = prepare(_chain(negative_axes=True))
    assert group_of(a, "conv1/Conv2D").prunable
    oracle(model, a)
    # reducing over H and C (NHWC axes 1 and 3) mixes the channels
    _, a = prepare(_chain(reduce_axes=(1, 3)))
    g = group_of(a, "conv1/Conv2D")
    assert not g.prunable and any("reduces over the channel axis" in r for r in g.reasons), g.reasons


def test_pad_on_the_nhwc_channel_axis_blocks():
    _, a = prepare(_chain(pad_channels=True))
    g = group_of(a, "conv1/Conv2D")
    assert not g.prunable and any("pads the channel axis" in r for r in g.reasons), g.reasons


@pytest.mark.parametrize("opset", [13, 18])
def test_pad_with_axes_input_names_the_nhwc_axes(opset):
    """Pad-18 with an axes input: the pads apply to the listed axes only."""
    rng = np.random.default_rng(1)
    inits = {"k1": _rand(rng, 6, 3, 3, 3), "k2": _rand(rng, 4, 6, 3, 3)}
    if opset >= 18:
        inits.update(pads=_i64(1, 2, 1, 0), axes=_i64(-2, 1))  # W begin, H begin, W end, H end
        pad = helper.make_node("Pad", ["a2", "pads", "", "axes"], ["a3"], name="Pad", mode="reflect")
    else:
        inits.update(pads=_i64(0, 2, 1, 0, 0, 0, 1, 0))
        pad = helper.make_node("Pad", ["a2", "pads"], ["a3"], name="Pad", mode="reflect")
    nodes = [
        _nchw("T0", "x", "a0"), _conv("conv_a", "a0", "k1", "a1", pads=[1, 1, 1, 1]), _nhwc("T1", "a1", "a2"),
        pad, _nchw("T2", "a3", "a4"), _conv("conv_b", "a4", "k2", "y", pads=[1, 1, 1, 1]),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 5, 5, 3])], [("y", [1, 4, 7, 6])], inits, opset))
    g = group_of(a, "conv_a")
    assert g.prunable and g.consumers == ["conv_b"], g.reasons
    assert oracle(model, a) == 1


def test_pad_axes_input_that_names_the_channel_axis_blocks():
    rng = np.random.default_rng(1)
    inits = {"k1": _rand(rng, 6, 3, 3, 3), "k2": _rand(rng, 4, 7, 3, 3), "pads": _i64(0, 1), "axes": _i64(-1)}
    nodes = [
        _nchw("T0", "x", "a0"), _conv("conv_a", "a0", "k1", "a1", pads=[1, 1, 1, 1]), _nhwc("T1", "a1", "a2"),
        helper.make_node("Pad", ["a2", "pads", "", "axes"], ["a3"], name="Pad"),
        _nchw("T2", "a3", "a4"), _conv("conv_b", "a4", "k2", "y", pads=[1, 1, 1, 1]),
    ]
    _, a = prepare(_model(nodes, [("x", [1, 5, 5, 3])], [("y", [1, 4, 5, 5])], inits, 18))
    g = group_of(a, "conv_a")
    assert not g.prunable and any("pads the channel axis" in r for r in g.reasons), g.reasons


# --- DepthToSpace / SpaceToDepth -----------------------------------------------------------------
def _space_depth(op: str, mode: str | None, bs: int = 2):
    """conv_a (NCHW, C1) -> op -> conv_b; DepthToSpace takes C1 = 4 * 3, SpaceToDepth C1 = 3."""
    rng = np.random.default_rng(2)
    c1 = 12 if op == "DepthToSpace" else 3
    c2 = c1 // (bs * bs) if op == "DepthToSpace" else c1 * bs * bs
    attrs = {"blocksize": bs} | ({"mode": mode} if mode else {})
    inits = {"ka": _rand(rng, c1, 2, 3, 3), "ba": _rand(rng, c1), "kb": _rand(rng, 4, c2, 3, 3)}
    nodes = [
        _nchw("T0", "x", "a0"),
        helper.make_node("Conv", ["a0", "ka", "ba"], ["a1"], name="conv_a", kernel_shape=[3, 3],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["a1"], ["a2"], name="relu"),
        helper.make_node(op, ["a2"], ["a3"], name="s2d", **attrs),
        _conv("conv_b", "a3", "kb", "a4", kernel_shape=[3, 3], auto_pad="SAME_LOWER"),
        _nhwc("T1", "a4", "y"),
    ]
    h = 4
    out_h = h * bs if op == "DepthToSpace" else h // bs
    return _model(nodes, [("x", [1, h, h, 2])], [("y", [1, out_h, out_h, 4])], inits, 13)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_prunes_blocks_of_bs2_channels(mode):
    model, a = prepare(_space_depth("DepthToSpace", mode))
    g = group_of(a, "conv_a")
    assert g.prunable and g.size == 3, g.reasons  # 12 channels = 3 output channels x 2x2 blocks
    assert g.consumers == ["conv_b"]
    pruned = prune_channels(model, a, {g.id: [1]})
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [8, 2, 3, 3] in dims.values() and [4, 2, 3, 3] in dims.values()
    producer = [m for m in g.members_of("producer")][0]
    expected = [4, 5, 6, 7] if mode == "CRD" else [1, 4, 7, 10]  # output channel 1's input channels
    assert sorted(np.flatnonzero(producer.channels == 1).tolist()) == expected
    assert oracle(model, a) == 1


def test_space_to_depth_prunes_each_channel_with_its_bs2_copies():
    model, a = prepare(_space_depth("SpaceToDepth", None))
    g = group_of(a, "conv_a")
    assert g.prunable and g.size == 3, g.reasons
    consumer = [m for m in g.members_of("consumer")][0]
    assert consumer.positions.size == 12 and list(consumer.channels[:6]) == [0, 1, 2, 0, 1, 2]
    pruned = prune_channels(model, a, {g.id: [0]})
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [2, 2, 3, 3] in dims.values() and [4, 8, 3, 3] in dims.values()
    assert oracle(model, a) == 1


def test_space_to_depth_then_depth_to_space_between_convs():
    """An NHWC round trip: SpaceToDepth (C -> 4C) and DepthToSpace (CRD, 4C -> C) in a row."""
    rng = np.random.default_rng(3)
    inits = {"ka": _rand(rng, 5, 2, 3, 3), "kb": _rand(rng, 20, 20, 1, 1), "kc": _rand(rng, 3, 5, 3, 3)}
    nodes = [
        _nchw("T0", "x", "a0"),
        _conv("conv_a", "a0", "ka", "a1", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("SpaceToDepth", ["a1"], ["a2"], name="s2d", blocksize=2),
        _conv("conv_b", "a2", "kb", "a3"),
        helper.make_node("DepthToSpace", ["a3"], ["a4"], name="d2s", blocksize=2, mode="CRD"),
        _conv("conv_c", "a4", "kc", "a5", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("T1", "a5", "y"),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 4, 4, 2])], [("y", [1, 4, 4, 3])], inits, 13))
    ga, gb = group_of(a, "conv_a"), group_of(a, "conv_b")
    assert ga.prunable and ga.size == 5 and gb.prunable and gb.size == 5
    assert oracle(model, a) == 2


def test_depth_to_space_on_channels_not_on_axis_1_blocks():
    """DepthToSpace reads axis 1; when the tracked channels sit elsewhere it is a wall."""
    rng = np.random.default_rng(4)
    inits = {"k": _rand(rng, 4, 4, 1, 1), "k2": _rand(rng, 3, 1, 1, 1)}
    nodes = [
        _conv("conv_a", "x", "k", "a1"),
        helper.make_node("Transpose", ["a1"], ["a2"], name="T", perm=[0, 2, 1, 3]),  # C on axis 2
        helper.make_node("DepthToSpace", ["a2"], ["a3"], name="d2s", blocksize=2),
        _conv("conv_b", "a3", "k2", "y"),
    ]
    _, a = prepare(_model(nodes, [("x", [1, 4, 4, 4])], [("y", [1, 3, 8, 8])], inits, 13))
    g = group_of(a, "conv_a")
    assert not g.prunable and any("DepthToSpace" in r for r in g.reasons), g.reasons


# --- GlobalMaxPool, Concat on the last axis, Flatten -> Dense ------------------------------------
def test_global_max_pool_then_squeeze_dense():
    rng = np.random.default_rng(5)
    inits = {"k": _rand(rng, 6, 3, 3, 3), "b": _rand(rng, 6), "axes": _i64(2, 3), "w": _rand(rng, 6, 4)}
    nodes = [
        _nchw("T0", "x", "a0"),
        _conv("conv", "a0", "k", "a1", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("T1", "a1", "a2"),
        helper.make_node("Add", ["a2", "b"], ["a3"], name="BiasAdd"),
        _nchw("T2", "a3", "a4"),
        helper.make_node("GlobalMaxPool", ["a4"], ["a5"], name="gmp"),
        helper.make_node("Squeeze", ["a5", "axes"], ["a6"], name="sq"),
        helper.make_node("MatMul", ["a6", "w"], ["y"], name="dense"),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 6, 6, 3])], [("y", [1, 4])], inits, 13))
    g = group_of(a, "conv")
    assert g.prunable and g.consumers == ["dense"], g.reasons
    assert oracle(model, a) == 1


def test_concat_on_the_last_axis_of_nhwc_branches():
    rng = np.random.default_rng(6)
    inits = {"ka": _rand(rng, 4, 3, 1, 1), "kb": _rand(rng, 5, 3, 3, 3), "ba": _rand(rng, 4),
             "bb": _rand(rng, 5), "kc": _rand(rng, 2, 9, 3, 3)}
    nodes = [
        _nchw("T0", "x", "a0"),
        _conv("conv_a", "a0", "ka", "a1"), _nhwc("Ta", "a1", "a2"),
        helper.make_node("Add", ["a2", "ba"], ["a3"], name="BiasAdd_a"),
        _conv("conv_b", "a0", "kb", "b1", kernel_shape=[3, 3], auto_pad="SAME_LOWER"), _nhwc("Tb", "b1", "b2"),
        helper.make_node("Add", ["b2", "bb"], ["b3"], name="BiasAdd_b"),
        helper.make_node("Concat", ["a3", "b3"], ["c"], name="concat", axis=-1),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        _nchw("Tc", "r", "r0"),
        _conv("conv_c", "r0", "kc", "c1", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("Td", "c1", "y"),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 5, 5, 3])], [("y", [1, 5, 5, 2])], inits, 13))
    ga, gb = group_of(a, "conv_a"), group_of(a, "conv_b")
    assert ga is not gb and ga.prunable and gb.prunable and (ga.size, gb.size) == (4, 5)
    cons_b = [m for m in gb.members_of("consumer")][0]
    assert list(cons_b.positions) == list(range(4, 9))
    assert oracle(model, a) == 2


def test_keras_flatten_of_nhwc_feeds_dense_rows_per_position():
    """Keras Flatten on NHWC: [1, H, W, C] -> [1, H*W*C]; channel c owns rows p*C + c."""
    rng = np.random.default_rng(7)
    inits = {"k": _rand(rng, 4, 3, 3, 3), "shape": _i64(-1, 2 * 2 * 4), "w": _rand(rng, 16, 3)}
    nodes = [
        _nchw("T0", "x", "a0"),
        _conv("conv", "a0", "k", "a1", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        _nhwc("T1", "a1", "a2"),
        helper.make_node("Reshape", ["a2", "shape"], ["f"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["f", "w"], ["y"], name="dense"),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 4, 4, 3])], [("y", [1, 3])], inits, 13))
    g = group_of(a, "conv")
    assert g.prunable, g.reasons
    consumer = [m for m in g.members_of("consumer")][0]
    assert list(consumer.channels[:8]) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert oracle(model, a) == 1


@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize_on_nhwc_rewrites_the_channel_entry_of_sizes(by):
    """tf2onnx's UpSampling2D: Resize on NHWC, scales [1, 2, 2, 1] or sizes [1, 2H, 2W, C]."""
    rng = np.random.default_rng(9)
    inits = {"k1": _rand(rng, 6, 3, 3, 3), "k2": _rand(rng, 2, 6, 3, 3), "roi": np.zeros(0, np.float32)}
    if by == "scales":
        inits["scales"] = np.asarray([1, 2, 2, 1], np.float32)
        resize_inputs = ["a2", "roi", "scales"]
    else:
        inits.update(scales=np.zeros(0, np.float32), sizes=_i64(1, 8, 8, 6))
        resize_inputs = ["a2", "roi", "scales", "sizes"]
    nodes = [
        _nchw("T0", "x", "a0"), _conv("conv_a", "a0", "k1", "a1", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("T1", "a1", "a2"),
        helper.make_node("Resize", resize_inputs, ["a3"], name="up/Resize", mode="nearest"),
        _nchw("T2", "a3", "a4"), _conv("conv_b", "a4", "k2", "a5", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("T3", "a5", "y"),
    ]
    model, a = prepare(_model(nodes, [("x", [1, 4, 4, 3])], [("y", [1, 8, 8, 2])], inits, 13))
    g = group_of(a, "conv_a")
    assert g.prunable and g.consumers == ["conv_b"], g.reasons
    if by == "sizes":
        pruned = prune_channels(model, a, {g.id: [0, 3]})
        sizes = [numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer
                 if t.data_type == TensorProto.INT64 and list(t.dims) == [4]]
        assert sizes == [[1, 8, 8, 4]]
    assert oracle(model, a) == 1


# --- the bridge --------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: _chain(13), lambda: _space_depth("DepthToSpace", "DCR"),
                                   lambda: _space_depth("DepthToSpace", "CRD"),
                                   lambda: _space_depth("SpaceToDepth", None)],
                         ids=["chain", "d2s-DCR", "d2s-CRD", "s2d"])
def test_nhwc_graphs_bridge_with_parity(build):
    from plugin.bridge import check_parity, convert

    model, _ = prepare(build())
    assert check_parity(model, convert(model)) <= 1e-4


# --- end to end --------------------------------------------------------------------------------
def _keras_cnn(path) -> str:
    """A Keras-like NHWC CNN with SAME convs and pools, a DepthToSpace upsampler and a dense head."""
    rng = np.random.default_rng(8)
    inits = {
        "c1/kernel": _rand(rng, 32, 3, 3, 3) * 0.3, "c1/bias": _rand(rng, 32) * 0.1,
        "c2/kernel": _rand(rng, 32, 32, 3, 3) * 0.1, "c2/bias": _rand(rng, 32) * 0.1,
        "c3/kernel": _rand(rng, 16, 8, 3, 3) * 0.2, "gap/axes": _i64(1, 2), "dense/kernel": _rand(rng, 16, 10),
    }
    nodes = [
        _nchw("c1/T", "x", "a0"),
        _conv("c1/Conv2D", "a0", "c1/kernel", "a1", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        _nhwc("c1/T2", "a1", "a2"),
        helper.make_node("Add", ["a2", "c1/bias"], ["a3"], name="c1/BiasAdd"),
        helper.make_node("Relu", ["a3"], ["a4"], name="c1/Relu"),
        _nchw("c2/T", "a4", "b0"),
        helper.make_node("Conv", ["b0", "c2/kernel", "c2/bias"], ["b1"], name="c2/Conv2D", kernel_shape=[3, 3],
                         auto_pad="SAME_LOWER"),
        helper.make_node("Relu", ["b1"], ["b2"], name="c2/Relu"),
        helper.make_node("DepthToSpace", ["b2"], ["b3"], name="up/DepthToSpace", blocksize=2, mode="DCR"),
        helper.make_node("MaxPool", ["b3"], ["b4"], name="pool/MaxPool", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        _conv("c3/Conv2D", "b4", "c3/kernel", "b5", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        _nhwc("c3/T2", "b5", "b6"),
        helper.make_node("Relu", ["b6"], ["b7"], name="c3/Relu"),
        helper.make_node("ReduceMean", ["b7", "gap/axes"], ["b8"], name="gap/Mean", keepdims=0),
        helper.make_node("MatMul", ["b8", "dense/kernel"], ["logits"], name="dense/MatMul"),
    ]
    model = _model(nodes, [("x", [1, 16, 16, 3])], [("logits", [1, 10])], inits, 18)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.slow
def test_compress_an_nhwc_model_end_to_end(tmp_path):
    """A short compress prunes and quantizes a tf2onnx-style model: the export passes the gate
    (checker, onnxruntime, outputs vs the fake-quant model) and is smaller than the input."""
    import onnxruntime as ort

    from plugin.api import CompressConfig, compress

    source = _keras_cnn(tmp_path / "keras.onnx")
    _, a = prepare(onnx.load(source))
    assert {g.size for g in a.prunable_groups} == {32, 8, 16}  # c1, c2 (8 units of 2x2), c3
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((48, 16, 16, 3)).astype(np.float32)}
    out = tmp_path / "c.onnx"
    res = compress(source, data, output=str(out),
                   config=CompressConfig(strategy="gradient", target="size=40%", weight_precisions=(0, 4, 8),
                                         epochs=2, finetune_epochs=1, progress=False, min_top1_agreement=0.0,
                                         compare_runtimes=False, seed=0))
    kept = {g: len(plan.kept) for g, plan in res.plan.groups.items()}
    assert sum(kept[g.id] for g in a.prunable_groups) < 32 + 8 + 16, kept  # some channels were pruned
    written = onnx.load(str(out))
    inferred = onnx.shape_inference.infer_shapes(written)
    d2s = next(n for n in inferred.graph.node if n.op_type == "DepthToSpace")
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    assert dims[d2s.input[0]][1] == 4 * kept[group_of(a, "c2/Conv2D").id]  # whole 2x2 blocks went
    assert {helper.get_attribute_value(x) for n in written.graph.node for x in n.attribute
            if x.name == "auto_pad"} == {b"SAME_UPPER", b"SAME_LOWER"}
    assert out.stat().st_size < (tmp_path / "keras.onnx").stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": data["x"][:1]})[0].shape == (1, 10)
