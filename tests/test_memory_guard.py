"""The memory guard (plugin/memory.py): a batch that cannot fit is lowered with one warning, a
model whose single sample cannot fit fails in seconds with one line (exit 14), nothing written."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from graph_passes.errors import ConfigError
from plugin import memory
from plugin.api import CompressConfig, compress
from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"
MB = 1024 * 1024


@pytest.fixture
def digits_model() -> onnx.ModelProto:
    from graph_passes.prepare import prepare_model

    return prepare_model(str(DIGITS / "model.onnx")).model


def test_activation_bytes_counts_every_computed_tensor(digits_model):
    per_sample = memory.activation_bytes_per_sample(digits_model)
    # the input alone is 1x8x8 float32; every conv / relu / pool output adds to it
    assert per_sample > 4 * 64
    assert per_sample < 1 * MB


def test_fits_keeps_batch(monkeypatch, digits_model):
    monkeypatch.setattr(memory, "available_memory", lambda: 64 * 1024 * MB)
    est = memory.fit_batch_size(digits_model, 64)
    assert (est.batch_size, est.lowered) == (64, False)


def test_lowered_with_one_warning(monkeypatch, caplog, digits_model):
    monkeypatch.setattr(memory, "available_memory", lambda: 1 * MB)
    with caplog.at_level(logging.WARNING, logger="plugin.memory"):
        est = memory.fit_batch_size(digits_model, 64)
    assert est.lowered and 1 <= est.batch_size < 64
    assert est.batch_size * est.bytes_per_sample <= 0.8 * MB < (est.batch_size + 1) * est.bytes_per_sample
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lowered to" in warnings[0].getMessage()
    assert memory.ENV in warnings[0].getMessage()


def test_guard_off_and_no_meminfo(monkeypatch, digits_model):
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    monkeypatch.setenv(memory.ENV, "off")
    assert memory.fit_batch_size(digits_model, 64).batch_size == 64
    monkeypatch.delenv(memory.ENV)
    assert memory.fit_batch_size(digits_model, 64, enabled=False).skipped == "turned off"
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert memory.fit_batch_size(digits_model, 64).skipped is not None


def test_available_memory_reads_meminfo():
    value = memory.available_memory()
    if Path("/proc/meminfo").exists():
        assert value is not None and value > 0


def test_compress_lowers_batch_and_records_it(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_memory", lambda: 1 * MB)
    out = tmp_path / "d.onnx"
    result = compress(str(DIGITS / "model.onnx"), str(DIGITS / "train.npz"), output=str(out),
                      config=CompressConfig(epochs=1, finetune_epochs=1, max_steps_per_epoch=2, progress=False,
                                            compare_runtimes=False, min_top1_agreement=0.0))
    rec = result.report["memory"]
    assert rec["lowered"] and rec["requested_batch_size"] == 64 and 1 <= rec["batch_size"] < 64
    assert result.report["config"]["batch_size"] == rec["batch_size"]
    assert out.exists()


def test_cli_one_line_error_when_one_sample_cannot_fit(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    out = tmp_path / "d.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"),
                                       "-o", str(out), "--epochs", "1", "--finetune-epochs", "1", "--no-progress"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == ConfigError.exit_code == 14, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "single sample" in lines[0], lines
    assert "available" in lines[0]
    assert list(tmp_path.iterdir()) == []
