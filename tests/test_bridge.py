"""The bridge end to end: name maps, trainable weights, write-back, parity errors, coverage."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from torch import nn

from graph_passes.errors import ConversionError
from graph_passes.ort_utils import make_session, random_feeds, run
from plugin.bridge import check_parity, convert, coverage, write_back

MLP = """
<ir_version: 10, opset_import: ["" : 20]>
mlp (float[2,3,4,4] x) => (float[2,5] y, float[2,5] z) {
    c = Conv <pads=[1, 1, 1, 1], strides=[2, 2]> (x, cw, cb)
    n = BatchNormalization (c, s, b, m, v)
    r = Relu (n)
    f = Reshape (r, shp)
    h = Gemm (f, w1, b1)
    g = Gelu (h)
    y = Gemm <transB=1, alpha=0.5> (g, w2, b2)
    z = MatMul (g, w3)
}
"""


MLP_WEIGHTS = {"cw": (6, 3, 3, 3), "cb": (6,), "s": (6,), "b": (6,), "m": (6,), "v": (6,),
               "w1": (24, 8), "b1": (8,), "w2": (5, 8), "b2": (5,), "w3": (8, 5)}


def _mlp() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MLP)
    rng = np.random.default_rng(1)
    for name, shape in MLP_WEIGHTS.items():
        value = rng.standard_normal(shape).astype(np.float32)
        if name == "v":
            value = np.abs(value) + 0.5
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 24], np.int64), "shp"))
    return model


def test_weights_are_parameters_and_mapped() -> None:
    model = _mlp()
    bridged = convert(model)
    params = dict(bridged.module.named_parameters())
    for name in ("cw", "cb", "w1", "b1", "w2", "b2", "w3", "s", "b"):
        assert bridged.param_map[name] in params, name
    assert isinstance(bridged.module.get_submodule(bridged.node_map["Gemm_4"]), nn.Linear)
    assert isinstance(bridged.module.get_submodule(bridged.node_map["MatMul_7"]), nn.Linear)
    assert set(bridged.node_map) == {n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)}
    assert check_parity(model, bridged, rtol=1e-5) <= 1e-5


def test_write_back_round_trip() -> None:
    model = _mlp()
    bridged = convert(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in bridged.module.parameters():
            param.add_(0.1 * torch.randn_like(param))
    updated = write_back(model, bridged)
    feeds = random_feeds(make_session(updated), seed=3)
    ref = run(updated, feeds)
    with torch.no_grad():
        got = bridged.module(torch.from_numpy(feeds["x"]))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-5)
    assert check_parity(updated, bridged, feeds=feeds, rtol=1e-5) <= 1e-5
    w1_new, w1_old = (onnx.numpy_helper.to_array(m.graph.initializer[6]) for m in (updated, model))
    assert w1_new.shape == w1_old.shape == (24, 8) and not np.array_equal(w1_new, w1_old)


def test_shared_weight_is_one_parameter() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[2,4] x) => (float[2,4] y) {
        a = MatMul (x, w)
        y = MatMul (a, w)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w"))
    bridged = convert(model)
    assert len(list(bridged.module.parameters())) == 1
    assert check_parity(model, bridged, rtol=1e-6) <= 1e-6


def test_a_parameter_also_read_as_a_constant_trains_as_one_tensor() -> None:
    """Exporters merge equal tensors: BERT's LayerNorm zero bias is also the bias Adds' constant.
    Training the LayerNorm's bias then changes what the Adds read, in torch as in the written-back
    ONNX (before: the Adds kept a private copy in torch, and the exported model differed)."""
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2,3,4] x) => (float[2,3,4] y) {
        n = LayerNormalization <axis = -1> (x, s, z)
        y = Add (n, z)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(4, np.float32), "s"),
                                    onnx.numpy_helper.from_array(np.zeros(4, np.float32), "z")])
    bridged = convert(model)
    bias = bridged.module.get_parameter(bridged.param_map["z"])
    with torch.no_grad():
        bias.add_(0.25)
    updated = write_back(model, bridged)
    feeds = random_feeds(make_session(updated), seed=1)
    with torch.no_grad():
        got = bridged.module(torch.from_numpy(feeds["x"]))
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(got.numpy(), run(updated, feeds)[0], rtol=1e-5, atol=1e-5)
    assert check_parity(updated, bridged, feeds=feeds, rtol=1e-5) <= 1e-5


def test_parity_names_the_diverging_node() -> None:
    model = _mlp()
    bridged = convert(model)
    with torch.no_grad():
        bridged.module.get_parameter(bridged.param_map["b1"]).add_(1.0)
    with pytest.raises(ConversionError, match=r"first diverging node 'Gemm_4' \(Gemm\)") as info:
        check_parity(model, bridged)
    assert "\n" not in str(info.value)


def test_unsupported_ops_listed_before_converting() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 18, "custom" : 1]>
    g (float[2,4] x) => (float[2,4] y) {
        a = custom.Foo (x)
        b = custom.Foo (a)
        c = Relu (b)
        y = Mish (c)
    }"""
    model = onnx.parser.parse_model(text)
    rows = {row[0]: row for row in coverage(model)}
    assert rows["custom::Foo"] == ("custom::Foo", 1, 2, False)
    assert rows["Relu"][3] and not rows["Mish"][3]
    with pytest.raises(ConversionError, match=r"Mish-18 x1, custom::Foo-1 x2") as info:
        convert(model)
    assert "\n" not in str(info.value)


def test_plain_onnx2torch_untouched_by_overrides() -> None:
    import onnx2torch

    convert(_mlp())  # overrides are active only inside convert
    plain = onnx2torch.convert(onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 13]> g (float[1,2,3,3] x) => (float y) '
        '<float[2] s = {1.0, 1.0}, float[2] b = {0.0, 0.0}, float[2] m = {0.0, 0.0}, float[2] v = {1.0, 1.0}>'
        '{ y = BatchNormalization (x, s, b, m, v) }'))
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def _fold_identity_of_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    inits = {i.name: i for i in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


@pytest.mark.slow
def test_densenet121_legacy_export_parity(tmp_path) -> None:
    """Was silently wrong (max abs diff ~1.8): BatchNorm followed module.training."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.densenet121(weights=None).eval()
    path = tmp_path / "densenet121.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 32, 32), str(path), dynamo=False, opset_version=17)
    model = _fold_identity_of_initializers(onnx.load(str(path)))
    bridged = convert(model)
    assert check_parity(model, bridged, rtol=1e-4) <= 1e-4
    bridged.module.train()  # training mode must not change what the module computes
    assert check_parity(model, bridged, rtol=1e-4) <= 1e-4
