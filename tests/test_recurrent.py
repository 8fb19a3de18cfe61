"""Recurrent layers (ONNX LSTM / GRU / RNN) end to end.

* the torch bridge (plugin/bridge/ops_recurrent.py) against onnxruntime: torch-exported
  nn.LSTM / nn.GRU / nn.RNN (both directions, batch first or not, stacked) and hand-built graphs
  for what torch does not export (sequence_lens, initial states, clip, peepholes,
  linear_before_reset=0, reverse, Relu); clear refusals for what it does not reproduce;
* channel rules (graph_passes/op_rules/recurrent.py): hidden units are prunable and the pruning
  oracle holds (removing units in the ONNX graph == zeroing them, in onnxruntime);
* parameter counts, MACs and the "recurrent" cost kind;
* the fake-quantized model (per-unit weight quantizer over W and R, pruned units gated) agrees
  with the exported QDQ model at 8, 4 and 2 bits and mixed widths, with units removed;
* the shipped sample samples/sequence compresses through ``prunequant compress``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cost_models import LayerSpec
from graph_passes.channel_groups import analyse
from graph_passes.errors import ConversionError
from graph_passes.normalise import normalise
from graph_passes.ort_utils import make_session
from graph_passes.prepare import prepare_model
from graph_passes.prune import check_pruning, prune_channels
from plugin.bridge import check_parity, convert, write_back

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "sequence"
CELLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


# ----------------------------------------------------------------------------- model builders


class _Stacked(nn.Module):
    """Two recurrent layers and a classifier on the last step."""

    def __init__(self, cell: type[nn.Module], bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        d = 2 if bidirectional else 1
        self.r1 = cell(5, 8, bidirectional=bidirectional, batch_first=batch_first)
        self.r2 = cell(8 * d, 6, batch_first=batch_first)
        self.fc = nn.Linear(6, 3)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r2(self.r1(x)[0])[0]
        return self.fc(y[:, -1] if self.batch_first else y[-1])


def _torch_model(op: str, bidirectional: bool = False, batch_first: bool = False) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = _Stacked(CELLS[op], bidirectional, batch_first).eval()
    x = torch.randn(2, 6, 5) if batch_first else torch.randn(6, 2, 5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _hand_built(op: str, *, direction: str = "forward", seq_lens: bool = False, h0: str | None = None,
                c0: bool = False, clip: float | None = None, lbr: int | None = None, peepholes: bool = False,
                activations: list[str] | None = None, extra: dict | None = None, hidden: int = 4,
                seed: int = 0, then_gemm: bool = False) -> onnx.ModelProto:
    """One recurrent node on X [5, 2, 3]; ``h0``: None, "input" (a graph input) or "const"."""
    rng = np.random.default_rng(seed)
    g, d = _GATES[op], 2 if direction == "bidirectional" else 1
    s, b, i = 5, 2, 3

    def init(name, shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("W", (d, g * hidden, i)), init("R", (d, g * hidden, hidden)), init("B", (d, 2 * g * hidden))]
    inputs = ["X", "W", "R", "B", "", ""]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [s, b, i])]
    if seq_lens:
        inputs[4] = "L"
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [b]))
    if h0 == "input":
        inputs[5] = "H0"
        graph_inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, [d, b, hidden]))
    elif h0 == "const":
        inputs[5] = "H0"
        inits.append(init("H0", (d, b, hidden), 1.0))
    if op == "LSTM":
        inputs.append("")
        if c0:
            inputs[6] = "C0"
            inits.append(init("C0", (d, b, hidden), 1.0))
        if peepholes:
            inputs.append("P")
            inits.append(init("P", (d, 3 * hidden)))
    while not inputs[-1]:
        inputs.pop()
    attrs = {"hidden_size": hidden, "direction": direction, **(extra or {})}
    if clip is not None:
        attrs["clip"] = clip
    if lbr is not None:
        attrs["linear_before_reset"] = lbr
    if activations:
        attrs["activations"] = activations
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes = [helper.make_node(op, inputs, outputs, name="rec", **attrs)]
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    if then_gemm:  # Y_h [D, b, H] -> Transpose [b, D, H] -> Reshape [b, D*H] -> Gemm: units prunable
        inits += [numpy_helper.from_array(np.array([b, d * hidden], np.int64), "shape"),
                  init("Wfc", (3, d * hidden))]
        nodes += [helper.make_node("Transpose", ["Y_h"], ["t"], perm=[1, 0, 2]),
                  helper.make_node("Reshape", ["t", "shape"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "Wfc"], ["out"], transB=1)]
        graph_outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = (np.array([5, 2], np.int32) if value.name == "L"
                             else rng.standard_normal(shape).astype(np.float32))
    return feeds


# ----------------------------------------------------------------------------- the bridge


@pytest.mark.parametrize("op", sorted(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_exports_bridge_with_parity(op: str, bidirectional: bool, batch_first: bool) -> None:
    model = _torch_model(op, bidirectional, batch_first)
    assert [n.op_type for n in model.graph.node].count(op) == 2
    assert check_parity(model, convert(model)) < 1e-5


HAND_BUILT = [
    ("LSTM", {"direction": "reverse"}),
    ("LSTM", {"direction": "bidirectional", "seq_lens": True, "h0": "input", "c0": True}),
    ("LSTM", {"direction": "reverse", "seq_lens": True}),
    ("LSTM", {"clip": 0.3, "peepholes": True, "direction": "bidirectional"}),
    ("GRU", {"lbr": 0}),
    ("GRU", {"lbr": 1, "clip": 0.5}),
    ("GRU", {"lbr": 0, "direction": "bidirectional", "seq_lens": True, "h0": "const"}),
    ("RNN", {"activations": ["Relu"], "clip": 0.3}),
    ("RNN", {"direction": "bidirectional", "activations": ["Relu", "Tanh"], "seq_lens": True}),
]


@pytest.mark.parametrize("op, kwargs", HAND_BUILT, ids=[f"{op}-{'-'.join(k)}" for op, k in HAND_BUILT])
def test_hand_built_graphs_bridge_with_parity(op: str, kwargs: dict) -> None:
    model = _hand_built(op, **kwargs)
    assert check_parity(model, convert(model), feeds=_feeds(model)) < 1e-5


def test_layout_1_equals_layout_0_on_transposed_data() -> None:
    """onnxruntime's CPU kernels refuse layout=1 ("Batchwise recurrent operations"), so the
    batch-first layout is checked against the layout-0 model on transposed tensors."""
    base = _hand_built("LSTM", direction="bidirectional", h0="input", c0=True, seq_lens=True)
    batchwise = onnx.ModelProto()
    batchwise.CopyFrom(base)
    batchwise.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    for index, init in enumerate(batchwise.graph.initializer):  # constant C0: [D, b, H] -> [b, D, H]
        if init.name == "C0":
            batchwise.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).transpose(1, 0, 2).copy(), "C0"))
    feeds = _feeds(base)
    ref = make_session(base).run(None, feeds)
    module = convert(batchwise).module
    got = module(torch.from_numpy(feeds["X"]).transpose(0, 1), torch.from_numpy(feeds["L"]),
                 torch.from_numpy(feeds["H0"]).transpose(0, 1))
    np.testing.assert_allclose(got[0].detach().numpy(), ref[0].transpose(2, 0, 1, 3), atol=1e-5)
    np.testing.assert_allclose(got[1].detach().numpy(), ref[1].transpose(1, 0, 2), atol=1e-5)
    np.testing.assert_allclose(got[2].detach().numpy(), ref[2].transpose(1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("op, extra, named", [
    ("LSTM", {"input_forget": 1}, "input_forget"),
    ("GRU", {"activations": ["HardSigmoid", "Tanh"]}, "HardSigmoid"),
    ("RNN", {"activations": ["LeakyRelu"], "activation_alpha": [0.1]}, "activation_alpha"),
])
def test_unsupported_attributes_are_refused_in_one_line(op: str, extra: dict, named: str) -> None:
    model = _hand_built(op, extra=extra)
    with pytest.raises(ConversionError, match=named) as info:
        convert(model)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- channel rules


@pytest.mark.parametrize("op", sorted(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_hidden_units_are_prunable_and_the_oracle_holds(op: str, bidirectional: bool) -> None:
    prepared = prepare_model(_torch_model(op, bidirectional))
    analysis = prepared.analysis
    recurrent = [layer for layer in analysis.layers if layer.cost_kind == "recurrent"]
    assert [layer.out_channels for layer in recurrent] == [8, 6]
    prunable = {g.id: g for g in analysis.groups if g.prunable}
    assert len(prunable) == 2, [(g.id, g.reasons) for g in analysis.groups]
    removal = {gid: [0, 3] for gid in prunable}
    assert check_pruning(prepared.model, analysis, removal) < 1e-5
    pruned = prune_channels(prepared.model, analysis, removal)
    sizes = [next(a.i for a in n.attribute if a.name == "hidden_size") for n in pruned.graph.node if n.op_type == op]
    assert sizes == [6, 4]


@pytest.mark.parametrize("op, kwargs", [
    ("LSTM", {"h0": "const", "c0": True, "peepholes": True, "direction": "bidirectional"}),
    ("GRU", {"h0": "const", "lbr": 0, "direction": "bidirectional"}),
    ("RNN", {"h0": "const", "direction": "reverse"}),
])
def test_oracle_with_constant_states_and_peepholes(op: str, kwargs: dict) -> None:
    model = _hand_built(op, then_gemm=True, **kwargs)
    analysis = analyse(normalise(model).model)
    group = next(g for g in analysis.groups if g.prunable)
    assert group.size == 4
    feeds = _feeds(model)
    assert check_pruning(analysis.model, analysis, {group.id: [1, 2]}, feeds) < 1e-5


def test_a_run_time_initial_state_blocks_the_units() -> None:
    analysis = analyse(normalise(_hand_built("GRU", h0="input", then_gemm=True)).model)
    group = next(g for g in analysis.groups if g.size == 4)
    assert not group.prunable and "initial state 'H0' is computed at run time" in group.reasons[0]


def test_zero_initial_states_are_dropped_so_the_batch_stays_dynamic() -> None:
    """torch exports zero states as ConstantOfShape(batch); pinned to batch 1 they fold into
    [1, 1, H] zeros, which the normalisation drops (absent states are zeros)."""
    prepared = prepare_model(str(SAMPLE / "model.onnx"))
    for node in prepared.model.graph.node:
        if node.op_type == "LSTM":
            assert len(node.input) == 4, list(node.input)


def test_parameters_macs_and_cost_kind_of_the_sample() -> None:
    meta = json.loads((SAMPLE / "meta.json").read_text())
    analysis = prepare_model(str(SAMPLE / "model.onnx")).analysis
    assert sum(layer.params for layer in analysis.layers) == meta["n_params"]  # W, R, B counted
    lstm1 = analysis.layers[0]
    assert (lstm1.cost_kind, lstm1.in_channels, lstm1.out_channels) == ("recurrent", 2, 24)
    assert lstm1.macs == 16 * 4 * 24 * (2 + 24)  # steps x gates x H x (I + H), batch 1
    spec = LayerSpec("l", "recurrent", 2, 24, lstm1.cost_kernel, lstm1.cost_spatial)
    assert spec.macs == lstm1.macs
    assert spec.fan_in_eff(1.0) == 1.0 + 24


# ----------------------------------------------------------------------------- engine and export


def _engine_and_export(bits_of, kept_of, source=None, x=None):
    from graph_passes.batch import restore_dynamic_batch
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.export import export_plan
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(source or str(SAMPLE / "model.onnx"))
    space = SearchSpace(prepared.analysis, Precisions((0, 2, 4, 8), (8,)))
    engine = FakeQuantModel.build(prepared.model, space=space)
    kept = {g: kept_of(space.group_size(g)) for g in space.prunable_groups}
    plan = space.plan(kept=kept, layer_bits={n: bits_of(len(info.columns)) for n, info in space.layers.items()},
                      site_bits=8)
    if x is None:
        with np.load(SAMPLE / "train.npz") as data:
            x = data["input"][:64]
    name = prepared.model.graph.input[0].name
    engine.calibrate(_dataset(x, name))
    engine.freeze(plan)
    plan = engine.frozen_plan()
    weighted = write_back(prepared.model, engine.materialised_bridge())
    exported = export_plan(weighted, prepared.analysis, plan)
    model, restored = restore_dynamic_batch(exported.model)
    with torch.no_grad():
        fake = engine(torch.from_numpy(x)).numpy()
    onnx_out = make_session(model).run(None, {name: x})[0]
    return model, restored, fake, onnx_out


def _dataset(x: np.ndarray, name: str):
    from plugin.data import Dataset

    return Dataset({name: x}, None, "test")


@pytest.mark.parametrize("bits", [8, 4, 2, "mixed"])
def test_fake_quant_equals_the_exported_model_with_units_removed(bits) -> None:
    def bits_of(c):
        return [(8, 4, 2)[i % 3] for i in range(c)] if bits == "mixed" else [bits] * c

    model, restored, fake, onnx_out = _engine_and_export(bits_of, lambda n: list(range(0, n, 2)))
    assert restored
    sizes = [next(a.i for a in n.attribute if a.name == "hidden_size") for n in model.graph.node if n.op_type == "LSTM"]
    assert sizes == [12, 12]
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    float_inits = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    for node in lstms:  # W and R arrive through DequantizeLinear, never as float initializers
        assert node.input[1] not in float_inits and node.input[2] not in float_inits
    scale = max(float(np.abs(fake).max()), 1e-6)
    assert float(np.abs(fake - onnx_out).max()) / scale < 1e-4


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_bidirectional_fake_quant_equals_the_export(op: str) -> None:
    """Both directions' rows of a unit share its scale; the Reshape to D*H loses both copies."""
    x = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
    model, _, fake, onnx_out = _engine_and_export(lambda c: [(8, 4)[i % 2] for i in range(c)],
                                                  lambda n: list(range(1, n)), _torch_model(op, True, True), x)
    sizes = [next(a.i for a in n.attribute if a.name == "hidden_size") for n in model.graph.node if n.op_type == op]
    assert sizes == [7, 5]
    assert float(np.abs(fake - onnx_out).max()) / max(float(np.abs(fake).max()), 1e-6) < 1e-4


@pytest.mark.parametrize("key", ["oww-hey-mycroft", "romanizer-encoder",
                                 pytest.param("ddddocr-rec", marks=pytest.mark.slow)])  # 13.5M params: ~11 s
def test_oracle_on_real_recurrent_models(key: str) -> None:
    """Third-party recurrent nets from the PyPI corpus (openwakeword's LSTMs, a GRU encoder, a
    captcha CNN + bidirectional LSTM), when already in the corpus cache (never downloaded here):
    their units are prunable and removing a third of them equals zeroing them."""
    from tests import pypi_corpus

    model = pypi_corpus.BY_KEY[key]
    path = pypi_corpus.model_path(model)
    if not path.exists():
        pytest.skip(f"{key} is not in the corpus cache ({path}); python -m tests.pypi_corpus fetches it")
    extra = {"input_values": list(model.input_values)} if model.input_values else {}
    prepared = prepare_model(str(path), input_shapes=list(model.input_shapes), **extra)
    analysis = prepared.analysis
    groups = {g for layer in analysis.layers if layer.cost_kind == "recurrent"
              for g in layer.output_groups if analysis.group(g).prunable}
    assert groups
    removal = {g: list(range(0, analysis.group(g).size, 3)) for g in groups}
    assert check_pruning(prepared.model, analysis, removal) < 1e-5


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_sample_compresses_with_pruned_hidden_units(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from plugin.cli import main

    out = tmp_path / "s.onnx"
    result = CliRunner().invoke(main, [
        "compress", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "train.npz"), "-o", str(out),
        "--weight-bits", "0,4,8", "--target", "size=35%", "--epochs", "3", "--finetune-epochs", "2",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.report.json").read_text())
    after = [v["channels_after"] for v in report["layers"].values()]
    before = [v["channels_before"] for v in report["layers"].values()]
    assert sum(after) < sum(before)
    assert out.stat().st_size < (SAMPLE / "model.onnx").stat().st_size
