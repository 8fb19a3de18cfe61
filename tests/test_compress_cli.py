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
    assert report["budget"] is None  # --lambda: no budget steered the search
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
    # the report and the CLI table say which budget steered the search and how much of it is used
    budget = first.report["budget"]
    assert budget["target"] == "size=40%" and budget["cost_model"] == "size"
    assert budget["absolute"] == pytest.approx(0.4 * first.report["cost_before_8bit"]["size"])
    assert budget["used"] == pytest.approx(first.report["cost_after"]["size"] / budget["absolute"])
    row = next(line for line in plugin.api.summary_table(first.report).splitlines() if line.startswith("budget"))
    assert "budget (size=40%)" in row and f"{100 * budget['used']:.0f}% of it used" in row


BAD_FLAGS = [
    (["--act-bits", "x"], "--act-bits"),
    (["--weight-bits", "0"], "--weight-bits"),
    (["--weight-bits", "0,3,8"], "--weight-bits"),
    (["--act-bits", "1"], "--act-bits"),
    (["--act-bits", "0,8"], "--act-bits"),
    (["--weight-bits", "8,8"], "--weight-bits"),
    (["--target", "size=0.25"], "size=25%"),
    (["--target", "mpic=1.2e6"], "mpic=1.2e6cycles"),
    (["--cost", "latency9000"], "latency9000"),
    (["--strategy", "no_such_strategy"], "no_such_strategy"),
    (["-S", "novalue"], "--strategy-option"),
]


@pytest.mark.parametrize(("flags", "needle"), BAD_FLAGS)
def test_bad_flags_are_refused_before_the_model_is_touched(tmp_path, flags, needle):
    """The model path does not exist: an error about the flag proves the model was not loaded."""
    _run("compress", "x.onnx", "--data", "d", "-o", str(tmp_path / "m.onnx"), "--act-bits", "x")  # warm imports
    start = time.perf_counter()
    code, out, err = _run("compress", str(tmp_path / "no_such_model.onnx"), "--data", str(tmp_path / "no.npz"),
                          "-o", str(tmp_path / "m.onnx"), *flags)
    elapsed = time.perf_counter() - start
    assert code in (11, 14), (code, err)
    _clean_failure(code, out, err, needle, tmp_path, set())
    assert "no_such_model" not in err
    assert elapsed < 0.5, f"{flags}: {elapsed:.2f} s"


def test_usage_errors_have_their_own_exit_code(tmp_path):
    for args in (["compress", str(DIGITS / "model.onnx"), "-o", str(tmp_path / "m.onnx")],
                 ["compress", str(DIGITS / "model.onnx"), "--data", "d", "-o", "m.onnx", "--epochs", "x"],
                 ["no-such-command"], ["--no-such-option"]):
        code, out, err = _run(*args)
        assert code == 64 != 2, (args, code, err)
        assert "Usage:" in err and "Traceback" not in err


def test_compress_help_teaches_strategies_and_budgets():
    code, out, _ = _run("compress", "--help")
    assert code == 0
    text = " ".join(out.split())
    for needle in ("--strategy", "--strategy-option", "gradient", "uniform", "sequential",
                   "--weight-bits 8 --act-bits 8 is W8A8 QAT", "[default: <cost>=35% when no --lambda]",
                   "size=35%", "size=40KB", "mpic=1.2e6cycles", "pruning alone"):
        assert needle in text, needle


def test_compress_builds_the_api_config(tmp_path, monkeypatch):
    """Flags map onto plugin.api.CompressConfig; strategy options reach it as a dict of strings."""
    from plugin import api

    seen = {}

    def fake_compress(model, data, *, labels=None, output=None, config=None):
        seen.update(model=model, data=data, labels=labels, output=output, config=config)
        return type("R", (), {"report": {"fake": True}})()

    monkeypatch.setattr(api, "compress", fake_compress)
    monkeypatch.setattr(api, "summary_table", lambda report: f"TABLE {sorted(report)}")
    out_path = str(tmp_path / "w8a8.onnx")
    code, out, err = _run("compress", "m.onnx", "--data", "d.npz", "-o", out_path, "--strategy", "uniform",
                          "--weight-bits", "8", "--act-bits", "8", "-S", "alpha=1", "-S", "mode = fast",
                          "--cost", "mpic", "--target", "mpic=1.2e6cycles", "--input-shape", "x=1x3x4x4")
    assert code == 0, err
    config = seen["config"]
    assert (seen["model"], seen["data"], seen["output"]) == ("m.onnx", "d.npz", out_path)
    assert config.strategy == "uniform" and config.strategy_options == {"alpha": "1", "mode": "fast"}
    assert config.weight_precisions == (8,) and config.act_bits == (8,)
    assert (config.cost, config.target, config.lam) == ("mpic", "mpic=1.2e6cycles", None)
    assert config.input_shapes == {"x": [1, 3, 4, 4]}
    assert out.splitlines() == ["TABLE ['fake']", f"wrote {out_path}"]
    # neither --lambda nor --target: the library picks the default budget (from --cost)
    code, _, err = _run("compress", "m.onnx", "--data", "d.npz", "-o", out_path, "--cost", "mpic")
    assert code == 0, err
    assert seen["config"].target is None and seen["config"].lam is None and seen["config"].cost == "mpic"
    assert seen["config"].strategy == "gradient"


def test_strategies_lists_a_registered_toy_and_survives_a_broken_one(monkeypatch):
    from plugin.strategies import StrategyOption, register_strategy, registry

    class ToyStrategy:
        name = "toy_for_cli_test"
        summary = "keeps everything at 8 bits (a test double)"
        steerable = False
        options = {"depth": StrategyOption("depth", int, 3, "how deep to look")}

        def search(self, problem, options):  # pragma: no cover - never run here
            raise NotImplementedError

    register_strategy(ToyStrategy)
    try:
        monkeypatch.setitem(registry._BUILTINS, "broken_for_cli_test", "no_such_module_for_cli_test:Broken")
        code, out, err = _run("strategies")
        assert code == 0, err
        assert "toy_for_cli_test: keeps everything at 8 bits (a test double)" in out
        assert "follows --target: no" in out and "depth=3" in out and "how deep to look" in out
        assert "broken_for_cli_test" in out and "failed to load" in out and "no_such_module_for_cli_test" in out
        code, out, err = _run("strategies", "--json")
        assert code == 0, err
        entries = {e["name"]: e for e in json.loads(out)}
        assert entries["toy_for_cli_test"]["steerable"] is False
        assert entries["toy_for_cli_test"]["options"] == [
            {"name": "depth", "type": "int", "default": 3, "help": "how deep to look"}]
        assert "error" in entries["broken_for_cli_test"]
    finally:
        registry._REGISTERED.pop("toy_for_cli_test", None)


def test_export_refuses_a_bad_plan_and_a_bad_output_before_loading(tmp_path):
    bad = tmp_path / "bad.plan.json"
    bad.write_text("not json")
    before = set(os.listdir(tmp_path))
    code, out, err = _run("export", str(tmp_path / "no_model.onnx"), "--plan", str(bad), "-o", str(tmp_path / "o.onnx"))
    assert code == 12, err
    _clean_failure(code, out, err, "bad.plan.json", tmp_path, before)
    code, out, err = _run("export", str(DIGITS / "model.onnx"), "--plan", str(bad),
                          "-o", str(tmp_path / "missing" / "o.onnx"))
    assert code == 13, err
    _clean_failure(code, out, err, "does not exist", tmp_path, before)
