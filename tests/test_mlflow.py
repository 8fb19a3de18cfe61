"""``prunequant compress --mlflow-uri``: the run logged to a real MLflow store (local SQLite, no
server: MLflow 3 refuses its file store by default), read back through MlflowClient; a missing
mlflow or an unusable URI is one line, before the model is even loaded."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"

try:
    import mlflow  # noqa: F401
except ImportError:  # in CI (PRUNEQUANT_CI=1) a missing mlflow is a failure
    if os.environ.get("PRUNEQUANT_CI") == "1":
        raise
    pytest.skip("mlflow is not installed (pip install 'prunequant[mlflow]')", allow_module_level=True)


def _run(*args: object):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _compress_args(out: Path, *extra: object) -> list[object]:
    return ["compress", DIGITS / "model.onnx", "--data", DIGITS / "train.npz", "-o", out, "--epochs", "1",
            "--finetune-epochs", "1", "--no-progress", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    """A check that happens before the model is loaded: loading it fails the test (exit 70)."""
    import plugin.api

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the MLflow URI was checked")

    monkeypatch.setattr(plugin.api, "_prepare_with_data", refuse)


def test_missing_mlflow_names_the_extra(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code, _, err = _run(*_compress_args(tmp_path / "d.onnx", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"))
    lines = err.strip().splitlines()
    assert code == 14 and len(lines) == 1 and "prunequant[mlflow]" in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri, needle", [
    ("bogus://nowhere", "unsupported URI 'bogus://nowhere'"),
    ("http://127.0.0.1:1", "127.0.0.1"),               # nothing listens: refused at once, no retries
    ("file:{tmp}/mlruns", "filesystem tracking backend"),  # MLflow 3: maintenance mode, refused
    ("sqlite:///{tmp}/a-file/m.db", "cannot be used"),  # a parent that is a file: no database there
])
def test_unusable_uri_fails_in_seconds_before_the_search(tmp_path, monkeypatch, no_model_loading, uri, needle):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(tmp=tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    start = time.perf_counter()
    code, _, err = _run(*_compress_args(tmp_path / "d.onnx", "--mlflow-uri", uri))
    seconds = time.perf_counter() - start
    lines = err.strip().splitlines()
    assert code == 13 and len(lines) == 1 and lines[0].startswith("error: MLflow tracking URI"), err
    assert needle in lines[0], err
    assert seconds < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, no ./mlruns
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick check restored MLflow's settings


def test_empty_uri_is_a_config_error(tmp_path, no_model_loading):
    code, _, err = _run(*_compress_args(tmp_path / "d.onnx", "--mlflow-uri", " "))
    assert code == 14 and "--mlflow-uri" in err


@pytest.mark.slow
def test_compress_logs_params_metrics_and_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory (MLflow's ./mlruns)
    out = tmp_path / "out" / "d.onnx"
    out.parent.mkdir()
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    code, stdout, err = _run(*_compress_args(out, "--mlflow-uri", uri, "--mlflow-experiment", "digits", "--seed", "3",
                                             "--target", "size=40%"))
    assert code == 0, err
    assert "logged MLflow run" in stdout
    report = json.loads(out.with_name("d.report.json").read_text())

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in stdout and run.info.run_name == "d"
    params, metrics = run.data.params, run.data.metrics
    assert params["strategy"] == "gradient" and params["target"] == "size=40%" and params["seed"] == "3"
    assert params["epochs"] == "1" and params["finetune_epochs"] == "1" and params["cost"] == "size"
    assert params["weight_precisions"] == "0,2,4,8" and params["activation_precisions"] == "2,4,8"
    assert params["input_model_sha256"] == hashlib.sha256((DIGITS / "model.onnx").read_bytes()).hexdigest()
    assert params["input_model_digest"] == report["plan_model_sha256"]
    assert "strategy_option.discretisation" in params  # the strategy's resolved options
    quality = report["quality"]
    assert metrics["accuracy_before"] == pytest.approx(quality["accuracy_before"])
    assert metrics["accuracy_after"] == pytest.approx(quality["accuracy_after"])
    assert metrics["agreement_after"] == pytest.approx(quality["top1_agreement_with_original"])
    for name, value in report["cost_after"].items():
        assert metrics[f"cost_after.{name}"] == pytest.approx(value)
        assert metrics[f"cost_before.{name}"] == pytest.approx(report["cost_before_8bit"][name])
    assert metrics["size_bytes_after"] == pytest.approx(report["cost_after"]["size"] / 8)
    assert metrics["file_bytes_after"] == report["file"]["bytes"]
    # every phase; the report on disk was serialised before its own write phase ended
    assert 0 <= metrics["wall_seconds"] - sum(report["seconds"].values()) < 1.0
    assert report["runtimes"]["openvino"]["status"] in ("ok", "unsupported")  # never a failed compress
    if report["runtimes"]["openvino"]["status"] == "ok":
        assert "openvino_top1_agreement_with_onnxruntime" in metrics

    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "model"))
    assert artifacts == ["model/d.onnx", "model/d.plan.json", "model/d.report.json"]
    local = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl")))
    for name in ("d.onnx", "d.plan.json", "d.report.json"):
        assert (local / name).read_bytes() == out.with_name(name).read_bytes()
    # artifacts beside the database, not in the current directory
    assert experiment.artifact_location.startswith((tmp_path / "store").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "out", "store"]

    # the Python API: log a result in hand (no output file: model, plan and report staged)
    import onnx

    from plugin import api
    from plugin.integrations.mlflow_log import log_run
    from plugin.plan import CompressionPlan

    result = api.CompressResult(onnx.load(out), CompressionPlan.load(out.with_name("d.plan.json")), report)
    run_id = log_run(result, uri, "digits", run_name="again")
    again = client.get_run(run_id)
    assert again.data.params["strategy"] == "gradient" and again.info.run_name == "again"
    assert sorted(a.path for a in client.list_artifacts(run_id, "model")) == [
        "model/model.onnx", "model/model.plan.json", "model/model.report.json"]
