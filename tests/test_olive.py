"""The prunequant pass for Microsoft Olive (plugin/integrations/olive_pass.py), on Olive's real runner.

Olive resolves the pass through prunequant's package configuration
(plugin/integrations/olive_config.json); the end-to-end test runs ``python -m olive run --config
WORKFLOW --package-config FILE`` (Olive's own CLI) on the digits sample's workflow
(samples/digits/olive_workflow.json) and checks the model it writes with onnx and onnxruntime.
Olive's cache and outputs go to tmp dirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # before olive is imported: no network from the tests

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# every test here but the first pays Olive's import (10-25 s on the shared CI cores): all marked slow
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
WORKFLOW = DIGITS / "olive_workflow.json"
FP32_TEST_ACCURACY = 99.44  # samples/digits/meta.json
#: 2 search + 2 QAT epochs measured 98.33% on test.npz (CPU, seed 0); allowed: 3 points under FP32
ACCURACY_MARGIN = 3.0


def _workflow(tmp_path: Path, **pass_settings) -> dict:
    """The sample workflow with absolute paths, its cache and outputs under tmp_path."""
    config = json.loads(WORKFLOW.read_text())
    config["input_model"]["model_path"] = str(DIGITS / "model.onnx")
    settings = config["passes"]["prunequant"]
    settings["data_path"] = str(DIGITS / "train.npz")
    settings.update(pass_settings)
    config["cache_dir"] = str(tmp_path / "olive-cache")
    config["output_dir"] = str(tmp_path / "olive-output")
    return config


def _olive_run(tmp_path: Path, config: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OLIVE_DISABLE_TELEMETRY": "1", "OLIVE_TELEMETRY_CACHE_DIR": str(tmp_path / "telemetry")}
    return subprocess.run(
        [sys.executable, "-m", "olive", "run", "--config", str(workflow), "--package-config",
         str(ROOT / "plugin" / "integrations" / "olive_config.json"), "--disable_telemetry"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _accuracy(path: Path) -> float:
    test = np.load(DIGITS / "test.npz")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": test["input"]})[0]
    return 100.0 * float((logits.argmax(1) == test["labels"]).mean())


def test_core_imports_without_olive() -> None:
    """With olive-ai unimportable, plugin, its API and CLI still import; only the pass module needs it."""
    code = (
        "import sys; sys.modules['olive'] = None\n"  # import olive -> ImportError, as if not installed
        "import plugin, plugin.api, plugin.cli, plugin.integrations\n"
        "try:\n"
        "    import plugin.integrations.olive_pass\n"
        "except ImportError:\n"
        "    print('no olive: ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no olive: ok"


def test_package_config_resolves_the_pass(tmp_path: Path) -> None:
    """Olive's own loader reads the shipped package configuration and imports the pass from it;
    the merged configuration keeps Olive's built-in passes."""
    from olive.package_config import OlivePackageConfig

    from plugin.integrations import olive_pass

    config = OlivePackageConfig.parse_file_or_obj(str(olive_pass.PACKAGE_CONFIG))
    assert config.import_pass_module("PrunequantCompression") is olive_pass.PrunequantCompression
    assert config.get_pass_module_config("prunequantcompression").dataset == "dataset_required"

    assert json.loads(olive_pass.PACKAGE_CONFIG.read_text()) == olive_pass.PASS_DECLARATION
    merged_path = tmp_path / "packages.json"
    assert olive_pass.main(["-o", str(merged_path)]) == 0
    merged = OlivePackageConfig.parse_file_or_obj(str(merged_path))
    default = OlivePackageConfig.load_default_config()
    assert set(default.passes) < set(merged.passes)
    assert merged.get_pass_module_config("PrunequantCompression").module_path == \
        "plugin.integrations.olive_pass.PrunequantCompression"


@pytest.mark.parametrize("change, expected", [
    ({"strategy": "nope"}, "PrunequantCompression: unknown strategy 'nope'; available:"),
    ({"target": "size=2x"}, "PrunequantCompression: budget 'size=2x': multipliers are not budgets"),
    ({"strtegy": "uniform"}, "PrunequantCompression: unknown setting(s) 'strtegy'"),
    ({"strategy_options": {"bogus": 1}}, "PrunequantCompression: strategy_options.bogus: strategy 'gradient' has"),
    ({"weight_bits": [0, 3]}, "PrunequantCompression: weight_bits 0,3: 3 bit(s) cannot be exported"),
    ({"epochs": -1}, "PrunequantCompression: epochs must be an integer >= 0, got -1"),
    ({"strategy": "uniform"}, "PrunequantCompression: strategy 'uniform' cannot follow a target budget"),
    ({"lam": 1.0}, "PrunequantCompression: give either lam or target, not both"),
    ({"data_path": "missing.npz"}, "PrunequantCompression: data_path 'missing.npz' does not exist"),
])
def test_bad_pass_config_fails_before_any_work(tmp_path: Path, change: dict, expected: str) -> None:
    """Olive's runner (in process) refuses a bad pass config while validating it: a ValueError
    whose message holds our one line, before the model is loaded or anything is written."""
    from olive.workflows import run

    from plugin.integrations import olive_pass

    config = _workflow(tmp_path, **change)
    with pytest.raises(ValueError) as caught:
        run(config, package_config=str(olive_pass.PACKAGE_CONFIG))
    lines = [line for line in str(caught.value).splitlines() if expected in line]
    assert len(lines) == 1, str(caught.value)
    assert "\n" not in str(olive_pass.PrunequantError(lines[0]))
    assert not list((tmp_path / "olive-output").glob("*.onnx"))
    assert not (tmp_path / "olive-cache" / "default_workflow" / "runs").exists() or \
        not list((tmp_path / "olive-cache" / "default_workflow" / "runs").iterdir())


def test_run_time_error_is_raised_with_one_line(tmp_path: Path) -> None:
    """A prunequant error during the pass (data for another model) reaches the caller of Olive's
    runner as one line (Olive swallows anything but a ValueError & co. into a warning)."""
    from olive.workflows import run

    from plugin.integrations import olive_pass

    config = _workflow(tmp_path, data_path=str(ROOT / "samples" / "mnist1d" / "train.npz"))
    with pytest.raises(olive_pass.OlivePassError) as caught:
        run(config, package_config=str(olive_pass.PACKAGE_CONFIG))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("PrunequantCompression: data file ")
    assert "model input 'input' expects [N,1,8,8]" in message
    assert caught.value.exit_code == 10  # DataError's
    assert not list((tmp_path / "olive-output").glob("**/*.onnx"))


def test_olive_run_cli_compresses_digits(tmp_path: Path) -> None:
    """`olive run --config samples/digits/olive_workflow.json --package-config ...` (Olive's CLI,
    in a subprocess): the output model exists, is smaller, passes the checker, runs in
    onnxruntime and is within ACCURACY_MARGIN points of FP32 on test.npz."""
    config = _workflow(tmp_path)
    done = _olive_run(tmp_path, config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "olive-output"
    model = out / "model.onnx"
    assert model.is_file(), sorted(p.name for p in out.iterdir())
    # the plan and report travel with the model; Olive's model config points at the folder
    assert (out / "model.plan.json").is_file() and (out / "model.report.json").is_file()
    described = json.loads((out / "model_config.json").read_text())
    assert described["type"].lower() == "onnxmodel"
    assert described["config"]["model_attributes"]["prunequant"]["report"] == "model.report.json"

    source = DIGITS / "model.onnx"
    assert model.stat().st_size < source.stat().st_size / 4  # 177 kB FP32 -> about 30 kB
    onnx.checker.check_model(onnx.load(str(model)), full_check=True)
    assert any(node.op_type == "DequantizeLinear" for node in onnx.load(str(model)).graph.node)
    accuracy = _accuracy(model)
    print(f"olive run: {model.stat().st_size} B (FP32 {source.stat().st_size} B), test accuracy {accuracy:.2f}% "
          f"(FP32 {FP32_TEST_ACCURACY}%)")
    assert accuracy >= FP32_TEST_ACCURACY - ACCURACY_MARGIN

    report = json.loads((out / "model.report.json").read_text())
    assert report["strategy"] == "gradient"
    assert report["config"]["epochs"] == 2 and report["config"]["finetune_epochs"] == 2
    assert report["cost_after"]["size"] <= 0.35 * report["cost_before_8bit"]["size"] * 1.0001


def test_olive_cli_bad_config_one_line(tmp_path: Path) -> None:
    """Olive's CLI entry point (``olive run``, called in process: it lets the error propagate, so
    the user sees this traceback) fails on a bad setting with our one line, raised by Olive's
    config validation: no frame of prunequant's code in the traceback, nothing written."""
    import traceback

    from olive.cli.launcher import main as olive_main

    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(_workflow(tmp_path, strategy="nope")))
    with pytest.raises(ValueError) as caught:
        olive_main(["run", "--config", str(workflow), "--package-config",
                    str(ROOT / "plugin" / "integrations" / "olive_config.json"), "--disable_telemetry"])
    ours = [line for line in str(caught.value).splitlines()
            if "PrunequantCompression: unknown strategy 'nope'" in line]
    assert len(ours) == 1, str(caught.value)
    assert "available: " in ours[0] and "gradient" in ours[0]
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert frames and not [f for f in frames if f.filename.startswith(str(ROOT / "plugin"))], frames
    assert caught.value.__cause__ is None  # no chained traceback from our validator either
    assert not list(tmp_path.glob("olive-output/**/*.onnx"))


_NPZ_SCRIPT = '''
import numpy as np
from olive.data.registry import Registry


class DigitsNpz:
    def __init__(self, path):
        arrays = np.load(path)
        self.x, self.y = arrays["input"], arrays["labels"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input": self.x[i]}, int(self.y[i])


@Registry.register_dataset()
def digits_npz(path):
    return DigitsNpz(path)
'''


def _npz_data_config(name: str, script: Path, path: Path) -> dict:
    return {"name": name, "user_script": str(script),
            "load_dataset_config": {"type": "digits_npz", "params": {"path": str(path)}},
            "post_process_data_config": {"type": "text_classification_post_process"},  # argmax of the logits
            "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": 64}}}


def test_olive_data_config_and_evaluator(tmp_path: Path) -> None:
    """The pass reads an Olive data config (a user script's dataset, (inputs, labels) batches)
    instead of data_path, runs another strategy with its options (geta: sparsity, bit range), and
    Olive's own evaluator scores the output model on test.npz: the accuracy Olive reports is the
    one onnxruntime gives here."""
    from olive.workflows import run

    from plugin.integrations import olive_pass

    script = tmp_path / "digits_data.py"
    script.write_text(_NPZ_SCRIPT)
    config = _workflow(tmp_path, data_config="digits_train", epochs=1, finetune_epochs=1, max_steps_per_epoch=8,
                       strategy="geta", strategy_options={"sparsity": 0.2, "bits": "4-8"}, target=None)
    del config["passes"]["prunequant"]["data_path"]
    config["data_configs"] = [_npz_data_config("digits_train", script, DIGITS / "train.npz"),
                              _npz_data_config("digits_test", script, DIGITS / "test.npz")]
    config["evaluators"] = {"accuracy": {"type": "OnnxEvaluator", "metrics": [{
        "name": "accuracy", "type": "accuracy", "data_config": "digits_test",
        "sub_types": [{"name": "accuracy_score", "priority": 1,
                       "metric_config": {"task": "multiclass", "num_classes": 10}}]}]}}
    config["evaluator"] = "accuracy"
    config["evaluate_input_model"] = True
    output = run(config, package_config=str(olive_pass.PACKAGE_CONFIG))

    out = tmp_path / "olive-output"
    model = out / "model.onnx"
    assert model.is_file()
    report = json.loads((out / "model.report.json").read_text())
    assert report["quality"]["accuracy_after"] is not None  # the labels came through the data config
    assert report["strategy"] == "geta"
    plan = json.loads((out / "model.plan.json").read_text())
    assert {k: plan["metadata"]["strategy_options"][k] for k in ("sparsity", "bits")} == \
        {"sparsity": 0.2, "bits": "4-8"}
    ours = _accuracy(model)
    best = output.get_best_candidate()
    olive_accuracy = 100.0 * float(best.metrics_value["accuracy-accuracy_score"]["value"])
    input_accuracy = 100.0 * float(json.loads((out / "input_model_metrics.json").read_text())
                                   ["accuracy-accuracy_score"]["value"])
    print(f"Olive evaluator: input {input_accuracy:.2f}%, output {olive_accuracy:.2f}% "
          f"(onnxruntime here {ours:.2f}%)")
    assert abs(input_accuracy - FP32_TEST_ACCURACY) < 0.01
    # Olive's metric is a float32 fraction (99.444443 for 537/540): equal within its rounding,
    # far below one test sample (0.19 points)
    assert abs(olive_accuracy - ours) < 1e-4
    assert ours >= 90.0  # geta, 1 epoch + 1 QAT epoch of 8 steps each: measured 99.44% (CPU, seed 0; 97.59% with constant QAT)
