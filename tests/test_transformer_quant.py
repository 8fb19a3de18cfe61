"""Quantization sites of transformers (issue 12): activation x activation MatMuls and embeddings.

* Q K^T and attention x V get an activation site on each operand (consumers: the MatMul), the
  fake-quant engine quantizes them through pre-hooks on the MatMul's module, the export writes
  QuantizeLinear -> DequantizeLinear on both inputs, and the cost models count them as
  ``act_matmul`` layers (MACs = H*S*S*Dh per sample, no stored weights);
* a Gather on a constant table (axis 0) is an embedding: INT8 per row, exported as
  ``DequantizeLinear(axis=0) -> Gather``, counted by the ``size`` model.

Models: torch's nn.TransformerEncoderLayer and a Hugging Face BERT-style encoder (random
weights, built with ``transformers``, no downloads; slow: the export takes ~10-20 s). Each
export is checked in onnxruntime with optimisations off and ORT_ENABLE_ALL and passes the gate.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cost_models import CostInputs, LayerSpec, get_cost_model
from graph_passes.gate import gate
from graph_passes.ort_utils import make_session
from graph_passes.prepare import prepare_model

torch = pytest.importorskip("torch")

from plugin.bridge import write_back  # noqa: E402
from plugin.data import Dataset  # noqa: E402
from plugin.engine.fakequant import FakeQuantModel  # noqa: E402
from plugin.export import export_plan  # noqa: E402
from plugin.space import EMBEDDING_BITS, SearchSpace  # noqa: E402

from .test_attention_groups import _feeds, bert_encoder, torch_encoder_layer  # noqa: E402

COSTS = ("size", "bops", "mpic", "mpic_energy", "ne16", "horowitz_energy")


# --------------------------------------------------------------------------- cost models


def test_act_matmul_and_embedding_specs():
    # Q K^T of 4 heads, S = 8, Dh = 16: c_in = H*k, c_out = H*n, groups = H, positions = m
    spec = LayerSpec("qk", "act_matmul", 4 * 16, 4 * 8, (1, 1), (1, 8), 4)
    assert spec.macs == 4 * 8 * 8 * 16
    inputs = CostInputs.from_bits([4] * 32, 8, 64.0)
    assert get_cost_model("size")(spec, inputs) == 0.0
    assert get_cost_model("bops")(spec, inputs) == spec.macs * 4 * 8
    pruned = CostInputs.from_bits([4] * 16 + [0] * 16, 8, 64.0)  # two heads' columns pruned
    assert get_cost_model("bops")(spec, pruned) == spec.macs * 4 * 8 / 2
    for name in COSTS[2:]:
        assert 0 < get_cost_model(name)(spec, pruned) < get_cost_model(name)(spec, inputs)
    table = LayerSpec("emb", "embedding", 64, 100)
    assert table.macs == 0
    bits = CostInputs.from_bits([8] * 100, 8, 64.0)
    assert get_cost_model("size")(table, bits) == 100 * 64 * 8
    for name in COSTS[1:]:
        assert get_cost_model(name)(table, bits) == 0.0


# --------------------------------------------------------------------------- pipeline


def _pipeline(prepared, bits: int, prune: bool):
    """Calibrate, freeze a uniform plan (optionally half of every prunable group removed),
    export the engine's weights, and pass the gate against the engine's outputs."""
    space = SearchSpace(prepared.analysis)
    engine = FakeQuantModel.build(prepared.model, space=space)
    feeds = _feeds(prepared.model)
    engine.calibrate(Dataset(feeds, None, "random"), batch_size=1)
    kept = {g: list(range(0, space.group_size(g), 2)) for g in space.prunable_groups} if prune else None
    engine.freeze(space.plan(kept=kept, layer_bits={n: bits for n in space.layers}, site_bits=bits))
    plan = engine.frozen_plan()
    with torch.no_grad():
        ref = engine(*[torch.as_tensor(feeds[k]) for k in engine.input_names])
    exported = export_plan(write_back(prepared.model, engine.materialised_bridge()), prepared.analysis, plan)
    report = gate(exported.model, feeds, [ref.numpy()], batch=1)
    for optimize in (False, True):
        out = make_session(exported.model, optimize=optimize).run(None, feeds)[0]
        assert np.all(np.isfinite(out)) and out.shape == tuple(ref.shape)
    return space, plan, exported, report


def _quantized_source(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The DequantizeLinear a tensor comes from, through the narrow-range Clip / no-op Reshape."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(tensor)
    while node is not None and node.op_type in ("Clip", "Reshape"):
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _activation_dq_inputs(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """How many of ``node``'s inputs come from QuantizeLinear -> DequantizeLinear."""
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for tensor in node.input:
        dq = _quantized_source(model, tensor)
        count += dq is not None and getattr(producer.get(dq.input[0]), "op_type", None) == "QuantizeLinear"
    return count


def _check_products(space: SearchSpace, plan, exported, n_products: int, heads: int) -> None:
    assert len(space.products) == n_products
    for name, info in space.products.items():
        for tensor in (info.product.a, info.product.b):
            site = space.sites[tensor]
            assert name in site.consumers and tensor in plan.activations
        assert info.spec.kind == "act_matmul" and info.spec.groups == heads
    # the export (node names may be shortened): MatMuls with QDQ on both inputs, one per product
    both = [n for n in exported.model.graph.node
            if n.op_type == "MatMul" and _activation_dq_inputs(exported.model, n) == 2]
    assert len(both) == n_products


def _check_costs(space: SearchSpace, plan) -> None:
    """The plan's costs include the products (and embeddings): recomputed here from the pairs."""
    pairs = space.extra_pairs(plan)
    bops = get_cost_model("bops")
    for (spec, inputs), info in zip(pairs, space.products.values()):
        a_bits = plan.activations[info.product.a].bits
        b_bits = plan.activations[info.product.b].bits
        kept_columns = int(sum(1 for b in inputs.w_theta.argmax(0) if inputs.w_precisions[b] != 0))
        assert float(bops(spec, inputs)) == pytest.approx(
            spec.macs * kept_columns / spec.c_out * a_bits * b_bits)
    for name in COSTS:
        weights_only = float(get_cost_model(name).total(space.plan_pairs(plan)))
        assert plan.cost_after[name] == pytest.approx(weights_only + float(get_cost_model(name).total(pairs)))


@pytest.fixture(scope="module")
def encoder_layer(tmp_path_factory):
    return prepare_model(torch_encoder_layer(tmp_path_factory.mktemp("tel") / "tel.onnx"))


@pytest.mark.parametrize("bits, prune", [(8, False), (4, True)])
def test_transformer_encoder_layer_products(encoder_layer, bits, prune):
    space, plan, exported, report = _pipeline(encoder_layer, bits, prune)
    _check_products(space, plan, exported, n_products=2, heads=4)
    assert not space.embeddings  # nn.TransformerEncoderLayer has none
    _check_costs(space, plan)
    before = space.baseline_plan()
    product_bops = sum(float(get_cost_model("bops")(s, i)) for s, i in space.extra_pairs(before))
    assert product_bops == 2 * (4 * 6 * 6 * 8) * 8 * 8  # H*S*S*Dh MACs at 8 x 8 bits, two MatMuls
    assert report.plain[0].sqnr_db > 40
    if prune:
        assert plan.cost_after["bops"] < plan.cost_before["bops"]


def test_supernet_cost_sees_the_product_sites(encoder_layer):
    """The differentiable cost has a gradient on every activation-MatMul operand's logits."""
    from plugin.engine.config import SearchConfig
    from plugin.engine.supernet import Supernet

    net = Supernet.build(encoder_layer.model, SearchConfig(cost_model="bops"), analysis=encoder_layer.analysis)
    cost = net.cost("bops")
    cost.backward()
    for info in net.space.products.values():
        for tensor in (info.product.a, info.product.b):
            quantizer = net.sites[net._site_key[tensor]].quantizer
            grads = [p.grad for p in quantizer.parameters() if p.requires_grad and p.grad is not None]
            assert grads and any(float(g.abs().sum()) > 0 for g in grads), tensor


# --------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return prepare_model(bert_encoder(tmp_path_factory.mktemp("bert") / "bert.onnx"))


@pytest.mark.slow  # the BERT export (transformers + torch.onnx): ~10-20 s
@pytest.mark.parametrize("bits, prune", [(8, False), (4, True)])
def test_bert_products_and_embedding(bert, bits, prune):
    space, plan, exported, report = _pipeline(bert, bits, prune)
    _check_products(space, plan, exported, n_products=4, heads=4)
    _check_costs(space, plan)
    # the word embeddings: INT8, one scale per row, DequantizeLinear(axis 0) -> Gather
    (name, table), = space.embeddings.items()
    assert (table.rows, table.dim) == (100, 64)
    inits = {t.name: t for t in exported.model.graph.initializer}
    tables = [dq for dq in (_quantized_source(exported.model, n.input[0]) for n in exported.model.graph.node
                            if n.op_type == "Gather") if dq is not None and dq.input[0] in inits]
    assert len(tables) == 1
    dq = tables[0]
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8 and list(inits[dq.input[0]].dims) == [100, 64]
    assert numpy_helper.to_array(inits[dq.input[1]]).shape == (100,)
    # counted: the size model's bits, the file accounting's bytes
    size = get_cost_model("size")
    emb_bits = sum(float(size(s, i)) for s, i in space.extra_pairs(plan) if s.kind == "embedding")
    assert emb_bits == 100 * 64 * EMBEDDING_BITS
    assert exported.qdq.layers[name].weight_bytes == 100 * 64
    assert exported.qdq.predicted_bytes == pytest.approx(plan.cost_after["size"] / 8)
    assert report.plain[0].sqnr_db > 40 and report.optimized[0].sqnr_db > 25
    ops = Counter(n.op_type for n in exported.model.graph.node)
    assert ops["QuantizeLinear"] == len(space.sites) == 8 + 2 * 4  # 8 weight-layer inputs + 8 operands
