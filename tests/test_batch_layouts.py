"""Models whose inputs take no batch in dim 0 (issue 11, item 10): graph_passes.batch layouts.

* a GRU whose state input is [layers, 1, H] and whose outputs include hn [layers, 1, H]: a sample
  is the whole input, the model runs one sample at a time, hn is never taken for a batch;
* a class token concatenated to the batch (a baked-in batch of 1 no Reshape rewrite fixes): batch
  1 throughout;
* ICLabel-style copies of one sample in dim 0 (averaged over dim 0): whole inputs;
* a model whose output is NaN on the user's data: one-line DataError (exit 10), nothing written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graph_passes.batch import (batch_independent, batch_layout, join_outputs, restore_dynamic_batch,
                                run_samples, whole_inputs)
from graph_passes.errors import DataError
from graph_passes.ort_utils import make_session
from graph_passes.shapes import BATCH_DIMS_KEY
from plugin.api import CompressConfig, compress
from plugin.data import input_specs, load_dataset, with_whole

QUICK = dict(epochs=1, finetune_epochs=1, batch_size=4, max_steps_per_epoch=2, progress=False,
             held_out=0.25, min_top1_agreement=0.0, seed=0, compare_runtimes=False)


class _GruNet(nn.Module):
    """x [T, 1, 8] (time first), h [2, 1, 12] -> (logits [1, 3], hn [2, 1, 12])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.gru = nn.GRU(16, 12, num_layers=2)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        y, hn = self.gru(torch.relu(self.inp(x)), h)
        return self.head(y[-1]), hn


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), args, buffer, dynamo=False, opset_version=17, input_names=names,
                      output_names=outputs)
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def gru_model() -> onnx.ModelProto:
    return _export(_GruNet(), (torch.zeros(4, 1, 8), torch.zeros(2, 1, 12)), ["x", "h"], ["logits", "hn"])


def _gru_data(n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 4, 1, 8)).astype(np.float32),
            "h": rng.standard_normal((n, 2, 1, 12)).astype(np.float32) * 0.1}


def test_whole_inputs_found_by_shape(gru_model: onnx.ModelProto) -> None:
    assert set(whole_inputs(gru_model)) == {"x", "h"}
    layout = batch_layout(gru_model)
    assert layout.per_sample and layout.whole == {"x", "h"}


def test_whole_input_data_is_stacked_inputs(gru_model: onnx.ModelProto) -> None:
    specs = with_whole(input_specs(gru_model), whole_inputs(gru_model))
    data = load_dataset(_gru_data(6), specs)
    feed = data.feeds([2])
    assert feed["h"].shape == (2, 1, 12) and feed["x"].shape == (4, 1, 8)
    with pytest.raises(DataError, match=r"'h' expects \[N,2,1,12\]: its dim 0 is not a batch"):
        load_dataset({"x": _gru_data(6)["x"], "h": np.zeros((6, 1, 12), np.float32)}, specs)


def test_symbolic_batch_in_dim_1_is_pinned_from_whole_input_data() -> None:
    """h [2, 'batch', 12] and x [4, 'batch', 8] fed N whole inputs [N, 2, 1, 12] / [N, 4, 1, 8]:
    pinned from the data's per-sample shapes (no --input-shape needed), then whole inputs."""
    from plugin.api import _prepare_with_data

    buffer = io.BytesIO()
    torch.onnx.export(_GruNet().eval(), (torch.zeros(4, 1, 8), torch.zeros(2, 1, 12)), buffer, dynamo=False,
                      opset_version=17, input_names=["x", "h"], output_names=["logits", "hn"],
                      dynamic_axes={"x": {1: "batch"}, "h": {1: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    prepared = _prepare_with_data(model, _gru_data(3), None)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in prepared.model.graph.input}
    assert dims == {"x": [4, 1, 8], "h": [2, 1, 12]}
    assert set(whole_inputs(prepared.model)) == {"x", "h"}


def test_outputs_joined_per_sample(gru_model: onnx.ModelProto) -> None:
    feeds = _gru_data(3)
    logits, hn = run_samples(make_session(gru_model), feeds, {"x", "h"})
    assert logits.shape == (3, 3)          # [1, 3] per sample: concatenated
    assert hn.shape == (3, 2, 1, 12)       # [2, 1, 12] per sample: stacked, never a batch of 2
    assert join_outputs([[np.zeros((1, 3))], [np.ones((1, 3))]])[0].shape == (2, 3)


class _ClassToken(nn.Module):
    """A ViT-style class token of batch 1 concatenated to the tokens: the batch is baked in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls, x], dim=1)          # [1, 1 + T, 8]: a batch of 1 only
        return self.head(torch.relu(self.proj(tokens))[:, 0])


@pytest.mark.slow
def test_baked_in_batch_runs_batch_1_throughout(tmp_path: Path) -> None:
    model = _export(_ClassToken(), (torch.zeros(1, 5, 8),), ["x"], ["y"])
    rng = np.random.default_rng(1)
    data = rng.standard_normal((12, 5, 8)).astype(np.float32)
    assert not whole_inputs(model)
    ok, why = batch_independent(model, [{"x": data[:1]}, {"x": data[1:2]}])
    assert not ok and "two samples along dim 0" in why
    result = compress(model, data, output=str(tmp_path / "cls.onnx"), config=CompressConfig(target="size=60%", **QUICK))
    assert result.report["quality"]["per_sample"] and result.report["gate"]["batch"] == 1
    assert (tmp_path / "cls.onnx").exists()


def test_time_first_input_runs_per_sample() -> None:
    """x [T, 8] whose dim 0 is time (a running sum over it): dim 0 pinned to 1 looks like a
    batch of 1, but two samples along it do not give the two single results."""
    axis = numpy_helper.from_array(np.array(0, np.int64), "axis")
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((8, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["c"]), helper.make_node("MatMul", ["c", "w"], ["y"])]
    graph = helper.make_graph(nodes, "time", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [axis, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    data = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    layout = batch_layout(model, {"x": data})
    assert layout.per_sample and not layout.whole and "not give the two single results" in layout.reason
    relu = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "rows",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    assert not batch_layout(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 14)]),
                            {"x": data}).per_sample


def _copies_model() -> onnx.ModelProto:
    """x [4, 6] holds 4 copies of ONE sample: y = mean over dim 0 of relu(x W) -> [1, 5]."""
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[0], keepdims=1)]
    graph = helper.make_graph(nodes, "copies", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _fixed_batch_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_copies_of_one_sample_are_whole_but_a_fixed_batch_is_a_batch() -> None:
    assert set(whole_inputs(_copies_model())) == {"x"}
    assert whole_inputs(_fixed_batch_model()) == {}


def test_outputs_whose_dim0_is_not_batch_are_never_restored() -> None:
    """An output whose dim 0 of 1 does not follow the batch (here: independent of the input)
    stays static while the batch is restored; a GRU's hn [1, B, H] (batch in dim 1) is never
    restored in dim 0: its model keeps the static batch."""
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("ReduceSum", ["w"], ["z"], axes=[0], keepdims=1)]
    graph = helper.make_graph(nodes, "const_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.metadata_props.add(key=BATCH_DIMS_KEY, value='{"x": "batch"}')
    restored, ok = restore_dynamic_batch(model)
    dims = {v.name: v.type.tensor_type.shape.dim[0] for v in restored.graph.output}
    assert ok and dims["y"].dim_param == "batch" and dims["z"].dim_value == 1
    y, z = make_session(restored).run(None, {"x": np.ones((3, 6), np.float32)})
    assert y.shape == (3, 5) and z.shape == (1, 5)

    gru = _export(_OneLayer(), (torch.zeros(1, 3, 8),), ["x"], ["y", "hn"])
    gru.metadata_props.add(key=BATCH_DIMS_KEY, value='{"x": "batch"}')
    restored, ok = restore_dynamic_batch(gru)
    assert not ok and all(v.type.tensor_type.shape.dim[0].dim_value == 1 for v in restored.graph.output)


class _OneLayer(nn.Module):
    """x [B, T, 8] batch first -> (y [B, 4], hn [1, B, 6])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        y, hn = self.gru(x)
        return self.head(y[:, -1]), hn


def _sqrt_model(path: Path) -> Path:
    """y = Sqrt(x) W: NaN on negative data."""
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32), "w")
    nodes = [helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "sqrt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_nan_outputs_on_the_data_are_a_data_error(tmp_path: Path) -> None:
    model = _sqrt_model(tmp_path / "sqrt.onnx")
    data = np.random.default_rng(4).standard_normal((16, 6)).astype(np.float32)
    with pytest.raises(DataError, match=r"output 'y' is NaN/Inf on sample 0 of .*inputs 'x' \[6\]") as info:
        compress(str(model), data, output=str(tmp_path / "out.onnx"), config=CompressConfig(**QUICK))
    assert "\n" not in str(info.value)
    assert not list(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def test_onnxruntime_failing_on_the_data_is_a_data_error() -> None:
    """An onnxruntime failure on the user's data (an index past a Gather table) names the sample
    and the inputs in one line instead of dying later inside torch."""
    from graph_passes.batch import BatchLayout, check_model_on_data

    table = numpy_helper.from_array(np.ones((4, 3), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "gather",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    ids = np.zeros((40, 2), np.int64)
    ids[37, 1] = 9
    check_model_on_data(model, {"ids": ids[:30]}, "data")  # in range: passes
    for layout in (BatchLayout(), BatchLayout(per_sample=True)):
        feeds = {"ids": ids if not layout.per_sample else ids[36:]}
        with pytest.raises(DataError, match=r"fails on sample (37|1) of data \(inputs 'ids' \[2\] per sample\)") as info:
            check_model_on_data(model, feeds, "data", layout)
        assert "\n" not in str(info.value)


def test_cli_nan_outputs_exit_10(tmp_path: Path) -> None:
    from plugin.cli import main

    model = _sqrt_model(tmp_path / "sqrt.onnx")
    np.save(tmp_path / "neg.npy", -np.ones((8, 6), np.float32))
    bad = CliRunner().invoke(main, ["compress", str(model), "--data", str(tmp_path / "neg.npy"), "-o",
                                    str(tmp_path / "o.onnx"), "--epochs", "1", "--finetune-epochs", "1",
                                    "--no-progress"])
    assert bad.exit_code == 10, bad.output
    assert "NaN/Inf" in bad.output and not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_cli_gru_state_model_compresses_one_sample_at_a_time(gru_model: onnx.ModelProto, tmp_path: Path) -> None:
    """Exit 0; the report says per sample; the written model keeps x [4,1,8], h [2,1,12], and
    its hn output [2,1,12] is not a batch."""
    import json

    from plugin.cli import main

    onnx.save(gru_model, str(tmp_path / "gru.onnx"))
    np.savez(tmp_path / "gru.npz", **_gru_data())
    out = tmp_path / "g.onnx"
    good = CliRunner().invoke(main, ["compress", str(tmp_path / "gru.onnx"), "--data", str(tmp_path / "gru.npz"),
                                     "-o", str(out), "--epochs", "1", "--finetune-epochs", "1", "--no-progress",
                                     "--target", "size=60%"])
    assert good.exit_code == 0, good.output
    report = json.loads((tmp_path / "g.report.json").read_text())
    quality = report["quality"]
    assert quality["per_sample"] and quality["whole_inputs"] == ["h", "x"]
    assert not quality["dynamic_batch_restored"] and report["gate"]["batch"] == 1
    written = onnx.load(str(out))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in written.graph.input}
    assert dims == {"x": [4, 1, 8], "h": [2, 1, 12]}
    logits, hn = make_session(written).run(None, {k: v[0] for k, v in _gru_data(1).items()})
    assert logits.shape == (1, 3) and hn.shape == (2, 1, 12)


logging.getLogger("graph_passes").setLevel(logging.WARNING)
