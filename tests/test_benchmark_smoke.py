"""Smoke test of ``benchmarks/pareto.py``: the smallest configuration (digits, a tiny DS-CNN,
2 search + 1 fine-tune epochs on 600 samples, 2 lambdas) writes the JSON, CSV and PNG with every
method present. About 30 s on one core; the FP32 network is trained into a temporary cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"fp32", "uniform", "ort_static", "prune-only", "sequential", "joint-size"}


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
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0
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
