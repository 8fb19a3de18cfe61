"""Shared weights: one initializer read by several weight layers stays one tensor, its users
share one plan (tied channels, one quantizer), counts and costs count it once, and the export
stores it once (graph_passes.untie, channel_groups, prune, qdq; plugin.space, engine, export)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from graph_passes.prepare import prepare_model
from graph_passes.prune import check_pruning, prune_channels, repair_removal

from .graph_helpers import build, header, oracle


def _torch_conv_twice(path: Path) -> Path:
    """A torch module calling the same 3x3 conv twice (legacy exporter: one initializer)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.body = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            y = torch.relu(self.body(y))
            y = torch.relu(self.body(y))  # the same kernel again
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), buffer, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    path.write_bytes(buffer.getvalue())
    return path


def _linear_twice() -> onnx.ModelProto:
    """A MatMul weight S read by two MatMuls (an unrolled cell, tied layers)."""
    return build(header() + """
    agraph (float[2, 8] x) => (float[2, 4] y) {
        h0 = Gemm <transB = 1> (x, w0, b0)
        r0 = Relu (h0)
        h1 = MatMul (r0, s)
        r1 = Relu (h1)
        h2 = MatMul (r1, s)
        r2 = Relu (h2)
        y = MatMul (r2, w3)
    }""", w0=[16, 8], b0=[16], s=[16, 16], w3=[16, 4])


def _uses(model: onnx.ModelProto) -> Counter:
    inits = {t.name for t in model.graph.initializer}
    return Counter(i for n in model.graph.node for i in n.input if i in inits)


def test_untie_keeps_a_shared_weight_one_tensor_and_couples_its_users(tmp_path: Path) -> None:
    prepared = prepare_model(str(_torch_conv_twice(tmp_path / "m.onnx")))
    a = prepared.analysis
    body = [layer for layer in a.layers if layer.weight_shape == [16, 16, 3, 3]]
    assert len(body) == 2 and body[0].weight == body[1].weight  # one tensor, two layers
    assert body[0].weight_owner is None and body[1].weight_owner == body[0].name
    assert body[1].params == 16  # its own (copied) bias only
    unique = sum(int(np.prod(t.dims)) for t in prepared.original.graph.initializer)
    assert sum(layer.params for layer in a.layers) <= unique + 16  # + the one bias copy
    # stem, body and body again: one group (outputs tied, inputs tied), prunable
    groups = {g for layer in a.layers if layer.op_type == "Conv" for g in layer.output_groups}
    assert len(groups) == 1 and a.group(groups.pop()).prunable


def test_conv_twice_pruning_oracle_and_one_tensor_after_pruning(tmp_path: Path) -> None:
    prepared = prepare_model(str(_torch_conv_twice(tmp_path / "m.onnx")))
    a = prepared.analysis
    assert oracle(prepared.model, a) >= 1
    group = next(g for g in a.prunable_groups if g.size == 16)
    removal = repair_removal(a, {group.id: [0, 3, 5, 9]})
    pruned = prune_channels(prepared.model, a, removal)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    weights = {n.input[1] for n in convs}
    assert len(weights) == 2  # stem + the one shared body kernel
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [12, 12, 3, 3] in [shapes[w] for w in weights]
    assert check_pruning(prepared.model, a, removal) < 1e-5


def test_matmul_weight_reused_counts_once_and_prunes_exactly() -> None:
    prepared = prepare_model(_linear_twice())
    a = prepared.analysis
    users = [layer for layer in a.layers if layer.weight == "s"]
    assert len(users) == 2 and users[1].weight_owner == users[0].name
    assert sum(layer.params for layer in a.layers) == 16 * 8 + 16 + 16 * 16 + 16 * 4
    # x -> w0 -> s -> s: w0's, s's first and s's second outputs are one group
    assert len({g for u in users for g in u.output_groups}) == 1
    assert oracle(prepared.model, a) >= 1


def test_space_costs_the_shared_weight_once_and_shares_bits() -> None:
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(_linear_twice())
    space = SearchSpace(prepared.analysis, Precisions((0, 4, 8), (8,)), model_sha256="0" * 64)
    owner, follower = (layer.name for layer in prepared.analysis.layers if layer.weight == "s")
    assert space.layers[follower].spec.weights_of == owner
    plan = space.uniform_plan(8)
    # size: every weight once, 8 bits each (w0, s, w3; biases are not weights of the model)
    assert space.cost_of_plan(plan, "size") == 8 * (16 * 8 + 16 * 16 + 16 * 4)
    assert space.cost_of_plan(plan, "bops") > 0
    mixed = space.plan(layer_bits={owner: 4, follower: 8})
    assert mixed.layers[follower].bits == mixed.layers[owner].bits == (4,) * 16
    assert not space.supports_sparsity(owner) and not space.supports_sparsity(follower)


def test_a_weight_also_read_by_a_gather_blocks_with_a_reason() -> None:
    """A tied embedding: Gather rows of E and a Gemm reading E (transB=1) as the output layer."""
    model = build(header() + """
    agraph (int64[2] ids, float[2, 8] x) => (float[2, 10] y, float[2, 8] e) {
        e = Gather (table, ids)
        h = Gemm <transB = 1> (x, w0, b0)
        r = Relu (h)
        y = Gemm <transB = 1> (r, table, b1)
        y2 = Gemm <transB = 1> (r, table, b1)
    }""", table=[10, 8], w0=[8, 8], b0=[8], b1=[10])
    model.graph.output.append(helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [2, 10]))
    prepared = prepare_model(model)
    a = prepared.analysis
    users = [layer for layer in a.layers if layer.weight == "table"]
    assert len(users) == 2
    w0 = next(layer for layer in a.layers if layer.weight == "w0")
    group = a.group(w0.output_groups[0])
    assert not group.prunable and any("table" in r and "Gather" in r for r in group.reasons)


def test_qdq_stores_a_shared_weight_once_and_runs_at_every_level(tmp_path: Path) -> None:
    from graph_passes.qdq import ActivationQuant, WeightQuant, insert_qdq

    prepared = prepare_model(str(_torch_conv_twice(tmp_path / "m.onnx")))
    convs = [layer for layer in prepared.analysis.layers if layer.op_type == "Conv"]
    for bits in (8, 4):
        weights = {layer.name: WeightQuant((bits,) * layer.out_channels) for layer in convs}
        acts = {layer.input: ActivationQuant(8, True, 0.05) for layer in convs}
        result = insert_qdq(prepared.model, weights, acts)
        ints = [t for t in result.model.graph.initializer if "int" in t.name and len(t.dims) == 4]
        assert len(ints) == 2  # stem + one body kernel
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
        outs = []
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            sess = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, feeds)[0])
        for out in outs[1:]:
            np.testing.assert_allclose(out, outs[0], rtol=1e-3, atol=1e-3)
        assert sum(layer.total for layer in result.layers.values()) == sum(
            layer.total for name, layer in result.layers.items() if name != convs[2].name)


def test_fake_quant_quantizes_a_shared_weight_once(tmp_path: Path) -> None:
    from plugin.engine.fakequant import FakeQuantModel

    prepared = prepare_model(str(_torch_conv_twice(tmp_path / "m.onnx")))
    engine = FakeQuantModel.build(prepared.model, analysis=prepared.analysis)
    body = [layer.name for layer in prepared.analysis.layers if layer.weight_shape == [16, 16, 3, 3]]
    entries = engine._layers
    assert entries[body[0]].quantizer is entries[body[1]].quantizer
    assert entries[body[0]].owner != entries[body[1]].owner
    plan = engine.space.uniform_plan(4)
    engine.freeze(plan)
    net = engine.net
    w0 = getattr(net.get_submodule(entries[body[0]].owner), entries[body[0]].weight_attr)
    w1 = getattr(net.get_submodule(entries[body[1]].owner), entries[body[1]].weight_attr)
    assert float((w0 - w1).abs().max().detach()) == 0.0
    assert len(np.unique(w0.detach().numpy()[0])) <= 15  # 4-bit: at most 15 levels per channel
    raw = engine._raw(entries[body[0]], entries[body[0]].weight_attr)
    assert raw is engine._raw(entries[body[1]], entries[body[1]].weight_attr)  # one trained tensor
    ids = [id(p) for p in engine.net_parameters()]
    assert len(ids) == len(set(ids)) and ids.count(id(raw)) == 1


def test_compress_writes_the_shared_weight_once_and_smaller(tmp_path: Path) -> None:
    from plugin.api import CompressConfig, compress

    source = _torch_conv_twice(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    out = tmp_path / "c.onnx"
    compress(str(source), data, output=str(out),
             config=CompressConfig(strategy="gradient", target="size=40%", weight_precisions=(0, 4, 8),
                                   epochs=2, finetune_epochs=1, progress=False, min_top1_agreement=0.0,
                                   compare_runtimes=False))
    written = onnx.load(str(out))
    convs = [n for n in written.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    int_kernels = [t for t in written.graph.initializer if len(t.dims) == 4]
    assert len(int_kernels) == 2, [t.name for t in int_kernels]  # stem + the shared kernel, once
    assert out.stat().st_size < source.stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {"x": data["x"][:2]})[0]).all()


def test_a_weight_read_transposed_by_another_layer_is_copied() -> None:
    """Gemm transB=1 reads w as [out, in], MatMul as [in, out]: two layouts, one copy each."""
    from graph_passes.untie import untie_weight_initializers

    model = build(header() + """
    agraph (float[2, 16] x) => (float[2, 16] y) {
        h = Gemm <transB = 1> (x, w)
        r = Relu (h)
        y = MatMul (r, w)
    }""", w=[16, 16])
    untied, copies = untie_weight_initializers(model)
    assert copies == 1 and untied.graph.node[2].input[1] != "w"
    prepared = prepare_model(model)
    assert all(layer.weight_owner is None for layer in prepared.analysis.layers)
    assert oracle(prepared.model, prepared.analysis) >= 1


def test_the_corpus_model_with_a_reused_cqt_kernel_counts_it_once() -> None:
    """basic-pitch (tf2onnx): the constant-Q transform's conv kernels, each reused for the 9
    octaves. Before: 185,292 parameters counted (5.1x the 36,037 stored values)."""
    from . import pypi_corpus

    entry = pypi_corpus.BY_KEY["basic-pitch"]
    path = pypi_corpus.model_path(entry)
    if not path.exists():
        pytest.skip(f"basic-pitch is not in the corpus cache ({path}); python -m tests.pypi_corpus fetches it")
    prepared = prepare_model(str(path), input_shapes=list(entry.input_shapes))
    layers = prepared.analysis.layers
    stored = sum(int(np.prod(t.dims)) for t in prepared.original.graph.initializer)
    assert sum(1 for layer in layers if layer.weight_owner) == 23
    assert sum(layer.params for layer in layers) <= stored * 1.01
    elements = sum(int(np.prod(t.dims)) for t in prepared.model.graph.initializer)
    assert elements <= stored * 1.05  # normalised: no longer 5x the input
