"""`prunequant compress` / `export`: bad input gives one clear line, a non-zero exit code and
writes nothing; a short real run on the digits sample writes a validated model + plan + report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"
QUICK = ["--epochs", "1", "--finetune-epochs", "1", "--no-progress"]


def _run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _clean_failure(code: int, out: str, err: str, needle: str, directory: Path, before: set) -> None:
    lines = err.strip().splitlines()
    assert code not in (0, 1, 70), (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in out + err
    assert set(os.listdir(directory)) == before, "something was written"


def test_bad_inputs_write_nothing(tmp_path):
    x = np.load(DIGITS / "train.npz")["input"]
    y = np.load(DIGITS / "train.npz")["labels"]
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    out = tmp_path / "out"
    out.mkdir()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    cases = [
        ("shape", [_npz(tmp_path / "shape.npz", input=x[:, :, :4, :4])], "shape"),
        ("dtype", [_npz(tmp_path / "dtype.npz", input=(x * 16).astype(np.int64))], "int64"),
        ("nan", [_npz(tmp_path / "nan.npz", input=nan)], "NaN"),
        ("count", [_npz(tmp_path / "one.npz", input=x[:1])], "at least 2"),
        ("labels", [_npz(tmp_path / "ok.npz", input=x), "--labels", _npz(tmp_path / "lab.npz", labels=y[:10])], "labels"),
        ("cost", [str(DIGITS / "calib.npz"), "--cost", "latency9000"], "latency9000"),
        ("budget", [str(DIGITS / "calib.npz"), "--target", "size=10B"], "smallest reachable"),
        ("both", [str(DIGITS / "calib.npz"), "--target", "size=50%", "--lambda", "1"], "not both"),
    ]
    before = set(os.listdir(out))
    for label, data_args, needle in cases:
        code, o, e = _run("compress", str(DIGITS / "model.onnx"), "--data", *data_args,
                          "-o", str(out / "m.onnx"), *QUICK)
        try:
            _clean_failure(code, o, e, needle, out, before)
        except AssertionError as exc:
            raise AssertionError(f"case {label}: {exc}") from None
    code, o, e = _run("compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz"),
                      "-o", str(tmp_path / "missing" / "m.onnx"), *QUICK)
    _clean_failure(code, o, e, "does not exist", tmp_path, set(os.listdir(tmp_path)))


def test_compress_digits_end_to_end(tmp_path):
    target = tmp_path / "digits_pq.onnx"
    code, out, err = _run("compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"),
                          "-o", str(target), "--json", *QUICK, "--lambda", "3")
    assert code == 0, err
    report = json.loads(out)
    files = sorted(os.listdir(tmp_path))
    assert files == ["digits_pq.onnx", "digits_pq.plan.json", "digits_pq.report.json"]
    model = onnx.load(target)
    onnx.checker.check_model(model, full_check=True)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert report["quality"]["fake_quant_top1_agreement"] >= 0.995
    assert report["quality"]["dynamic_batch_restored"] is True
    file = report["file"]
    assert file["bytes"] == target.stat().st_size
    assert abs(file["prediction_error"]) <= 0.05, file  # packed weights vs the size cost model
    assert file["overhead_bytes"] == file["bytes"] - file["packed_weight_bytes"]
    assert file["size_model_bytes"] == pytest.approx(report["cost_after"]["size"] / 8)
    plan = json.loads((tmp_path / "digits_pq.plan.json").read_text())
    assert plan["format"] == "prunequant.plan"
    # export --plan reproduces a valid model from the plan without searching
    again = tmp_path / "again.onnx"
    code, _, err = _run("export", str(DIGITS / "model.onnx"), "--plan", str(tmp_path / "digits_pq.plan.json"),
                        "-o", str(again))
    assert code == 0, err
    assert again.exists()


def test_ctrl_c_leaves_no_partial_output(tmp_path):
    exe = Path(sys.executable).with_name("prunequant")
    target = tmp_path / "m.onnx"
    # a test run started in the background of a non-interactive shell inherits SIGINT ignored
    # (and Python then keeps ignoring it): give the child the default disposition, as a
    # terminal would
    proc = subprocess.Popen([str(exe), "compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"),
                             "-o", str(target), "--epochs", "50", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    assert os.listdir(tmp_path) == []


def test_python_api_is_seeded_and_deterministic():
    import plugin

    data = np.load(DIGITS / "train.npz")
    dataset = {"input": data["input"][:400]}
    config = dict(epochs=2, finetune_epochs=1, target="size=40%", progress=False, seed=7)
    first = plugin.compress(str(DIGITS / "model.onnx"), dataset, config=plugin.CompressConfig(**config))
    second = plugin.compress(str(DIGITS / "model.onnx"), dataset, config=plugin.CompressConfig(**config))
    assert first.plan.to_json() == second.plan.to_json()
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.report["cost_after"]["size"] <= 0.4 * first.report["cost_before_8bit"]["size"]
    assert first.output is None
