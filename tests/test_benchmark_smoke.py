"""Smoke test of ``benchmarks/pareto.py``: the smallest configuration (digits, a tiny DS-CNN,
2 search + 1 fine-tune epochs on 600 samples, 2 lambdas) writes the JSON, CSV and PNG with every
method present. About 30 s on one core; the FP32 network is trained into a temporary cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"fp32", "uniform", "ort_static", "onnxsim", "prune-only", "sequential", "joint-size"}


@pytest.mark.slow
def test_pareto_smoke(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT))
    import bench_networks
    import pareto

    monkeypatch.setattr(bench_networks, "CACHE", tmp_path / "cache")
    threads = torch.get_num_threads()
    try:
        assert pareto.main(["--smoke", "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "out"
    data = json.loads((out / "pareto.json").read_text())
    (experiment,) = data["experiments"]
    rows = experiment["rows"]
    assert {r["method"] for r in rows} == METHODS
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    labels = {r["label"] for r in rows}
    assert {"W8A8 QAT", "W4A8 QAT", "W2A8 QAT", "FP32 original"} <= labels
    assert sum(r["method"] == "joint-size" for r in rows) == 2
    by_label = {r["label"]: r for r in rows}
    fp32 = by_label["FP32 original"]["test_acc"]
    # the smoke network is trained for a few steps only (measured: 49% on 10 classes); every
    # quantized row is scored by onnxruntime on the same held-out test split
    assert fp32 > 0.3
    assert by_label["W8A8 QAT"]["test_acc"] > fp32 - 0.1
    assert abs(by_label["ORT quantize_static int8"]["test_acc"] - fp32) < 0.05
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["test_acc"] > 0.1  # above chance (10 classes)
        assert r["file_bytes"] > 0
        assert r["size_model_bytes"] > 0
        assert r["latency_b1_ms"] is not None and r["latency_b1_ms"] > 0
    by = {r["label"]: r for r in rows}
    assert by["W2A8 QAT"]["size_model_bytes"] == pytest.approx(by["W8A8 QAT"]["size_model_bytes"] / 4)
    assert by["FP32 original"]["size_model_bytes"] == pytest.approx(4 * by["W8A8 QAT"]["size_model_bytes"])

    with open(out / "pareto.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["method"] for r in csv_rows} == METHODS
    assert len(csv_rows) == len(rows)

    png = out / f"pareto_{experiment['task']}_{experiment['network']}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def _row(label: str, method: str, acc: float, size: float, train: float, **extra: object) -> dict:
    return {"label": label, "method": method, "test_acc": acc, "size_model_bytes": size, "file_bytes": int(size) + 1000,
            "train_s": train, **extra}


def test_headline_iso_accuracy_and_joint_vs_sequential(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT))
    import pareto

    rows = [_row("W8A8 QAT", "uniform", 0.980, 1000, 10), _row("W2A8 QAT", "uniform", 0.950, 250, 10),
            _row("sequential 20/35", "sequential", 0.970, 400, 40),
            _row("joint size lam=10", "joint-size", 0.978, 500, 15),  # iso with W8 (-0.2 pt)
            _row("joint size lam=50", "joint-size", 0.968, 300, 18),  # as accurate as sequential, smaller
            _row("joint size lam=150", "joint-size", 0.946, 70, 12),  # iso with W2
            _row("broken", "joint-size", 0.99, 10, 1, error="boom")]
    rows[-1].pop("size_model_bytes")
    h = pareto.headline(rows, 0.5)
    assert h["W8A8 QAT"]["joint"] == "joint size lam=10"
    assert h["W8A8 QAT"]["size_reduction_pct"] == pytest.approx(50.0)
    assert h["W2A8 QAT"]["joint"] == "joint size lam=150"
    assert h["W2A8 QAT"]["size_reduction_pct"] == pytest.approx(72.0)
    (seq,) = h["joint_vs_sequential"]
    # lam=10 is as accurate but larger: not counted; lam=50 is within 0.5 pt and smaller
    assert seq["joint"] == "joint size lam=50" and seq["time_ratio"] == pytest.approx(18 / 40)
    meta = {"mode": "test", "epochs": 1, "finetune_epochs": 1, "torch_threads": 1, "cpu_count": 2, "seconds": 60}
    result = {"task": "t", "network": "n", "task_description": "d", "n_compress": 1, "n_test": 1,
              "rows": rows, "headline": h}
    md = pareto.markdown([result], meta)
    assert "| joint size lam=50 | 96.80% | 300 B |" in md
    assert "size -72.0% (paper: -69.54%)" in md and "training time x0.45" in md
    assert pareto.pareto_front([(1, 0.5), (2, 0.4), (3, 0.9), (3, 0.8)]) == [(1, 0.5), (3, 0.9)]


def test_report_only_merges_partial_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT))
    import pareto

    # the smoke mode's experiment: digits / dscnn, size lambdas 10 and 100
    info = {"task": "digits", "network": "dscnn", "task_description": "d", "n_compress": 10, "n_test": 5}
    ref8 = {"size": 8000.0, "bops": 1.0, "mpic": 1.0}
    baselines = pareto.finish_experiment(info, [_row("W8A8 QAT", "uniform", 0.98, 1000, 10),
                                                _row("joint size lam=10", "joint-size", 0.90, 400, 10),
                                                _row("joint size lam=99", "joint-size", 0.5, 10, 1)],  # old grid
                                         ref8, 30.0, True)
    sweep = pareto.finish_experiment(info, [_row("joint size lam=10", "joint-size", 0.979, 450, 12),
                                            _row("joint size lam=100", "joint-size", 0.95, 300, 12)],
                                     None, 20.0, True)
    meta = {"mode": "smoke", "epochs": 2, "finetune_epochs": 1, "torch_threads": 1, "cpu_count": 2, "seconds": 1}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pareto.json").write_text(json.dumps({"meta": meta, "experiments": [baselines]}))
    (tmp_path / "b" / "partial").mkdir(parents=True)
    (tmp_path / "b" / "partial" / "digits_dscnn.json").write_text(json.dumps(sweep))
    out = tmp_path / "merged"
    assert pareto.main(["--report-only", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    (merged,) = json.loads((out / "pareto.json").read_text())["experiments"]
    by = {r["label"]: r for r in merged["rows"]}
    assert set(by) == {"W8A8 QAT", "joint size lam=10", "joint size lam=100"}  # lam=99: not in the mode's grid
    assert by["joint size lam=10"]["test_acc"] == 0.979  # the later run wins
    assert by["joint size lam=100"]["size_vs_w8"] == pytest.approx(0.3)  # 8-bit reference carried over
    assert merged["headline"]["W8A8 QAT"]["joint"] == "joint size lam=10"
    assert (out / "pareto.md").exists() and (out / "pareto_digits_dscnn.png").exists()
    assert pareto.main(["--report-only", str(tmp_path / "empty"), "--out", str(out)]) == 2
