"""`prunequant evaluate` on models whose inputs take no batch in dim 0 (graph_passes.batch layouts).

* a GRU with a state input h [2, 1, 12] and an hn output [2, 1, 12], compressed through the API:
  evaluated against its reference on N whole inputs ([N, 2, 1, 12]) via the CLI and the API;
* a wrong-shaped whole input: one-line DataError (exit 10);
* a model whose free dim 0 is time (CumSum over it) runs one sample at a time, as compress runs it;
* OpenVINO: the report's runtime comparison and ``evaluate --runtime openvino`` run per sample.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graph_passes.errors import DataError
from plugin.api import CompressConfig, compress
from plugin.cli import main
from plugin.data import load_dataset
from plugin.evaluate import evaluate, load_runnable
from plugin.runtimes import openvino_available, runtimes_report
from tests.test_batch_layouts import QUICK, _export, _gru_data, _GruNet

import torch


@pytest.fixture(scope="module")
def gru_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The GRU (x [4,1,8], h [2,1,12] -> logits [1,3], hn [2,1,12]), its whole-input data with
    labels, and the model compressed from it with a short run (no 2-bit widths: OpenVINO reads it)."""
    root = tmp_path_factory.mktemp("gru")
    model = _export(_GruNet(), (torch.zeros(4, 1, 8), torch.zeros(2, 1, 12)), ["x", "h"], ["logits", "hn"])
    onnx.save(model, str(root / "gru.onnx"))
    data = _gru_data(24)
    labels = np.arange(24, dtype=np.int64) % 3
    np.savez(root / "gru.npz", **data, labels=labels)
    compress(str(root / "gru.onnx"), data, output=str(root / "small.onnx"),
             config=CompressConfig(target="size=60%", weight_precisions=(0, 4, 8), activation_precisions=(8,),
                                   **{**QUICK, "compare_runtimes": openvino_available()}))
    return {"original": root / "gru.onnx", "small": root / "small.onnx", "data": root / "gru.npz"}


def test_whole_inputs_are_found_at_load(gru_files: dict[str, Path]) -> None:
    runnable = load_runnable(gru_files["small"])
    assert runnable.whole == {"x", "h"} and runnable.fixed_batch is None
    dataset = load_dataset(gru_files["data"], runnable.specs)
    assert dataset.arrays["h"].shape == (24, 2, 1, 12)


def test_api_evaluates_against_reference(gru_files: dict[str, Path]) -> None:
    runnable = load_runnable(gru_files["small"])
    dataset = load_dataset(gru_files["data"], runnable.specs)
    result = evaluate(runnable, dataset, reference=str(gru_files["original"]), batch_size=5)
    assert result.samples == 24 and result.accuracy is not None and result.correct is not None
    assert result.agreement is not None and 0.0 <= result.agreement <= 1.0
    assert [o.name for o in result.outputs] == ["logits", "hn"]
    assert result.max_rel_error is not None and 0.0 < result.max_rel_error < 1.0
    same = evaluate(str(gru_files["original"]), load_dataset(gru_files["data"], load_runnable(
        gru_files["original"]).specs), reference=str(gru_files["original"]))
    assert same.agreement == 1.0 and same.max_rel_error == 0.0


def test_cli_evaluates_whole_input_data(gru_files: dict[str, Path]) -> None:
    args = ["evaluate", str(gru_files["small"]), "--data", str(gru_files["data"]), "--reference",
            str(gru_files["original"])]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "top-1 agreement" in text.stdout and "output hn" in text.stdout
    result = CliRunner().invoke(main, [*args, "--json", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["samples"] == 24 and data["agreement"] is not None and data["accuracy"] is not None
    assert {o["name"] for o in data["outputs"]} == {"logits", "hn"}


def test_cli_wrong_shaped_whole_input_is_one_line(gru_files: dict[str, Path], tmp_path: Path) -> None:
    data = _gru_data(6)
    np.savez(tmp_path / "bad.npz", x=data["x"], h=np.zeros((6, 1, 12), np.float32))
    result = CliRunner().invoke(main, ["evaluate", str(gru_files["small"]), "--data", str(tmp_path / "bad.npz"),
                                       "--reference", str(gru_files["original"])])
    assert result.exit_code == DataError.exit_code == 10, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'h' expects [N,2,1,12]" in lines[0], result.stderr


def _time_first(batch: int | str) -> onnx.ModelProto:
    """y = CumSum(x, axis 0) W with x [T, 8]: dim 0 is time, not a batch."""
    axis = numpy_helper.from_array(np.array(0, np.int64), "axis")
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((8, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["c"]), helper.make_node("MatMul", ["c", "w"], ["y"])]
    graph = helper.make_graph(nodes, "time", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [axis, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_free_dim0_that_is_not_a_batch_runs_per_sample() -> None:
    """The symbolic-dim-0 model evaluated against its batch-1 copy: equal only when each sample
    runs alone (batched, CumSum would sum across samples)."""
    free, single = _time_first("T"), _time_first(1)
    runnable = load_runnable(free)
    x = np.random.default_rng(6).standard_normal((10, 8)).astype(np.float32)
    result = evaluate(runnable, load_dataset(x, runnable.specs), reference=single, batch_size=4)
    assert result.samples == 10 and result.max_rel_error == 0.0 and result.agreement == 1.0


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_openvino_runs_whole_inputs_per_sample(gru_files: dict[str, Path]) -> None:
    model = onnx.load(str(gru_files["small"]))
    data = _gru_data(24)
    report = runtimes_report(model, data, batch=1, whole={"x", "h"})["openvino"]
    assert report["status"] == "ok" and report["samples"] == 24, report
    assert report["top1_agreement_with_onnxruntime"] >= 0.9 and report["max_abs_diff"] < 0.05
    assert [o["name"] for o in report["outputs"]] == ["logits", "hn"]
    written = json.loads(gru_files["small"].with_suffix(".report.json").read_text())["runtimes"]["openvino"]
    assert written["status"] == "ok" and written["samples"] > 0, written  # compress's own report
    result = CliRunner().invoke(main, ["evaluate", str(gru_files["small"]), "--data", str(gru_files["data"]),
                                       "--reference", str(gru_files["small"]), "--runtime", "openvino", "--json"])
    assert result.exit_code == 0, result.output
    data_out = json.loads(result.stdout)
    assert data_out["runtime"] == "openvino" and data_out["agreement"] >= 0.9


logging.getLogger("graph_passes").setLevel(logging.WARNING)
