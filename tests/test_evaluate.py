"""plugin.evaluate and the `evaluate` command: accuracy, agreement, errors, CLI behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graph_passes.errors import DataError, InputFileError, UnsupportedModelError
from plugin.cli.evaluate import evaluate_command
from plugin.data import Dataset, input_specs, load_dataset
from plugin.evaluate import EvaluationResult, evaluate, load_runnable

DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"

IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N, 3] y) { y = Identity(x) }
"""

SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N, 3] y) <float k = {1.1}> { y = Mul(x, k) }
"""

FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 3] x) => (float[4, 3] y) { y = Identity(x) }
"""

NOT_A_CLASSIFIER = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N] y) <int64[1] axes = {1}> { y = ReduceSum <keepdims = 0> (x, axes) }
"""

TWO_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) <float k = {2.0}> {
  y = Identity(x)
  z = Mul(x, k)
}
"""

TWO_OUTPUTS_REF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) <float k = {2.5}> {
  y = Identity(x)
  z = Mul(x, k)
}
"""

OTHER_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 5] x) => (float[N, 5] y) { y = Identity(x) }
"""


def _model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def _scores(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)


def _dataset(model: onnx.ModelProto, n: int = 10, labels: np.ndarray | None = None) -> Dataset:
    return load_dataset(_scores(n), input_specs(model), labels)


# ----------------------------------------------------------------------------- samples


def test_digits_accuracy_matches_meta() -> None:
    meta = json.loads((DIGITS / "meta.json").read_text())
    runnable = load_runnable(DIGITS / "model.onnx")
    dataset = load_dataset(DIGITS / "test.npz", runnable.specs)
    result = evaluate(runnable, dataset, batch_size=64, progress=False)
    assert result.samples == meta["n_test"] == 540
    assert result.accuracy == pytest.approx(meta["test_accuracy"], abs=1e-12)
    assert result.correct == round(meta["test_accuracy"] * 540)
    assert result.agreement is None and result.reference is None


def test_digits_agrees_with_itself() -> None:
    path = str(DIGITS / "model.onnx")
    dataset = load_dataset(DIGITS / "calib.npz", load_runnable(path).specs)
    result = evaluate(path, dataset, reference=path, batch_size=100, progress=True)
    assert result.agreement == 1.0
    assert result.max_rel_error == 0.0 and result.mean_rel_error == 0.0
    assert result.accuracy is None
    assert [o.name for o in result.outputs] == ["logits"]


def test_batch_size_does_not_change_accuracy() -> None:
    runnable = load_runnable(DIGITS / "model.onnx")
    dataset = load_dataset(DIGITS / "test.npz", runnable.specs).subset(100)
    results = {evaluate(runnable, dataset, batch_size=b, progress=False).correct
               for b in (1, 7, 512)}
    assert len(results) == 1


# ------------------------------------------------------------------------ tiny models


def test_accuracy_counts_top1() -> None:
    model = _model(IDENTITY)
    labels = np.argmax(_scores(), axis=1)
    labels[:3] = (labels[:3] + 1) % 3
    result = evaluate(model, _dataset(model, labels=labels), batch_size=4, progress=False)
    assert result.correct == 7 and result.accuracy == pytest.approx(0.7)


def test_relative_error_and_agreement_against_reference() -> None:
    model, ref = _model(SCALED), _model(IDENTITY)
    x = _scores()
    result = evaluate(model, _dataset(model), reference=ref, batch_size=3, progress=False)
    assert result.agreement == 1.0
    assert result.max_rel_error == pytest.approx(0.1, rel=1e-5)
    expected_mean = 0.1 * np.abs(x).mean() / np.abs(x).max()
    assert result.mean_rel_error == pytest.approx(expected_mean, rel=1e-5)


def test_accuracy_and_reference_together() -> None:
    model = _model(IDENTITY)
    labels = np.argmax(_scores(), axis=1)
    dataset = _dataset(model, labels=labels)
    result = evaluate(model, dataset, reference=_model(SCALED), progress=False)
    assert result.accuracy == 1.0 and result.agreement == 1.0
    assert result.max_rel_error == pytest.approx(0.1 / 1.1, rel=1e-5)


def test_per_output_errors_headline_is_worst() -> None:
    model = _model(TWO_OUTPUTS)
    result = evaluate(model, _dataset(model), reference=_model(TWO_OUTPUTS_REF), progress=False)
    by_name = {o.name: o for o in result.outputs}
    assert by_name["y"].max_rel_error == 0.0
    assert by_name["z"].max_rel_error == pytest.approx(0.2, rel=1e-5)
    assert result.max_rel_error == by_name["z"].max_rel_error


def test_fixed_batch_model_runs_padded_chunks() -> None:
    model = _model(FIXED_BATCH)
    labels = np.argmax(_scores(), axis=1)
    runnable = load_runnable(model)
    assert runnable.fixed_batch == 4
    dataset = load_dataset(_scores(), runnable.specs, labels)
    result = evaluate(runnable, dataset, reference=_model(IDENTITY), batch_size=3, progress=False)
    assert result.samples == 10 and result.accuracy == 1.0
    assert result.agreement == 1.0 and result.max_rel_error == 0.0


def test_non_classifier_reference_only_errors() -> None:
    model = _model(NOT_A_CLASSIFIER)
    result = evaluate(model, _dataset(model), reference=model, progress=False)
    assert result.agreement is None and result.max_rel_error == 0.0


def test_non_classifier_with_labels_refused() -> None:
    model = _model(NOT_A_CLASSIFIER)
    with pytest.raises(UnsupportedModelError, match=r"\[N, C\]"):
        evaluate(model, _dataset(model, labels=np.zeros(10, np.int64)), progress=False)


def test_labels_beyond_output_classes() -> None:
    model = _model(IDENTITY)
    labels = np.zeros(10, np.int64)
    labels[4] = 3
    with pytest.raises(DataError, match=r"class id 3 \(sample 4\).*3 classes"):
        evaluate(model, _dataset(model, labels=labels), progress=False)


def test_no_labels_no_reference() -> None:
    model = _model(IDENTITY)
    with pytest.raises(DataError, match="--labels.*--reference"):
        evaluate(model, _dataset(model), progress=False)


def test_reference_with_other_inputs_refused() -> None:
    model = _model(IDENTITY)
    with pytest.raises(InputFileError, match="does not match"):
        evaluate(model, _dataset(model), reference=_model(OTHER_INPUT), progress=False)


def test_dataset_for_another_model_refused() -> None:
    other = _model(OTHER_INPUT)
    dataset = load_dataset(np.zeros((2, 5), np.float32), input_specs(other), np.zeros(2, np.int64))
    with pytest.raises(DataError, match="input specs"):
        evaluate(_model(IDENTITY), dataset, progress=False)


def test_bad_batch_size() -> None:
    model = _model(IDENTITY)
    with pytest.raises(DataError, match="positive integer"):
        evaluate(model, _dataset(model, labels=np.zeros(10, np.int64)), batch_size=0)


def test_to_dict_is_json_with_non_finite_as_null() -> None:
    result = EvaluationResult(model="m", samples=3, reference="r", max_rel_error=float("inf"),
                              mean_rel_error=0.5)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["max_rel_error"] is None and data["mean_rel_error"] == 0.5
    assert "max rel error" in result.to_text()


# --------------------------------------------------------------------------------- CLI


def _cli(args: list[str]) -> click.testing.Result:
    group = click.Group("prunequant")
    group.add_command(evaluate_command)
    return CliRunner().invoke(group, ["evaluate", *args])


def test_cli_text_table() -> None:
    result = _cli([str(DIGITS / "model.onnx"), "--data", str(DIGITS / "test.npz")])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "99.44% (537/540)" in result.stdout


def test_cli_json_with_reference_and_limit() -> None:
    model = str(DIGITS / "model.onnx")
    result = _cli([model, "--data", str(DIGITS / "calib.npz"), "--reference", model, "--json",
                   "--limit", "50", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["samples"] == 50 and data["agreement"] == 1.0 and data["max_rel_error"] == 0.0
    assert data["model"] == model and data["reference"] == model


def test_cli_separate_labels_file(tmp_path: Path) -> None:
    with np.load(DIGITS / "test.npz") as archive:
        np.save(tmp_path / "x.npy", archive["input"])
        np.save(tmp_path / "y.npy", archive["labels"])
    result = _cli([str(DIGITS / "model.onnx"), "--data", str(tmp_path / "x.npy"),
                   "--labels", str(tmp_path / "y.npy"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["correct"] == 537


def _assert_one_line_error(result: click.testing.Result, code: int, fragment: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert result.stdout == ""


def test_cli_bad_data_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 7, 7), np.float32))
    result = _cli([str(DIGITS / "model.onnx"), "--data", str(tmp_path / "x.npy")])
    _assert_one_line_error(result, DataError.exit_code, "[N,1,8,8]")


def test_cli_missing_data_file(tmp_path: Path) -> None:
    result = _cli([str(DIGITS / "model.onnx"), "--data", str(tmp_path / "none.npz")])
    _assert_one_line_error(result, DataError.exit_code, "does not exist")


def test_cli_no_labels_no_reference() -> None:
    result = _cli([str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz")])
    _assert_one_line_error(result, DataError.exit_code, "--reference")


def test_cli_missing_model(tmp_path: Path) -> None:
    result = _cli([str(tmp_path / "none.onnx"), "--data", str(DIGITS / "test.npz")])
    _assert_one_line_error(result, InputFileError.exit_code, "none.onnx")


def test_cli_help_has_example() -> None:
    result = _cli(["--help"])
    assert result.exit_code == 0 and "prunequant evaluate model.onnx --data" in result.stdout
