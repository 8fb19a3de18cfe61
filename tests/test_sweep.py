"""prunequant sweep: the job grid, the resume rule, the fronts, and a real sweep on local Ray
(2 workers) over the digits sample, stopped and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graph_passes.errors import ConfigError, CostModelError, OutputError, SweepJobsFailed
from plugin import sweep

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"


def test_targets_seeds_and_strategies_parse() -> None:
    assert sweep.parse_targets("size=50%,35%,25%") == ["size=50%", "size=35%", "size=25%"]
    assert sweep.parse_targets("size=50%,mpic=30%,20%") == ["size=50%", "mpic=30%", "mpic=20%"]
    assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
    assert sweep.parse_strategies("gradient,bayesian,rl") == ["gradient", "bayesian", "rl"]
    with pytest.raises(ConfigError, match="cost model"):
        sweep.parse_targets("50%,35%")
    with pytest.raises(CostModelError):
        sweep.parse_targets("size=0.5")
    with pytest.raises(ConfigError, match="twice"):
        sweep.parse_seeds("0,0")
    with pytest.raises(ConfigError, match="nosuch"):
        sweep.parse_strategies("gradient,nosuch")
    with pytest.raises(ConfigError, match="STRATEGY.NAME"):
        sweep.parse_job_options(["trials=3"], ["bayesian"])
    with pytest.raises(ConfigError):
        sweep.parse_job_options(["bayesian.no_such_option=3"], ["bayesian"])
    assert sweep.parse_job_options(["bayesian.trials=3"], ["bayesian"]) == {"bayesian": {"trials": "3"}}


def test_grid_runs_a_budgetless_strategy_once_per_seed() -> None:
    jobs = sweep.grid(["gradient", "uniform"], ["size=50%", "size=25%"], [0, 1], {"gradient": {"prune_init": "0.1"}})
    ids = [j.id for j in jobs]
    assert ids == ["gradient_size50pct_s0", "gradient_size50pct_s1", "gradient_size25pct_s0",
                   "gradient_size25pct_s1", "uniform_none_s0", "uniform_none_s1"]
    assert jobs[0].config == {"strategy_options": {"prune_init": "0.1"}}
    assert jobs[-1].target is None and jobs[-1].config == {"strategy_options": {}}
    sweep.check_jobs(jobs, {"epochs": 1})
    with pytest.raises(ConfigError, match="seed"):
        sweep.check_jobs(jobs, {"seed": 3})
    with pytest.raises(ConfigError, match="repeated"):
        sweep.check_jobs(jobs + jobs[:1], {})


def test_pareto_front_keeps_the_undominated_points() -> None:
    points = [("a", 0.5, 0.99), ("b", 0.3, 0.97), ("c", 0.4, 0.96), ("d", 0.3, 0.90), ("e", 0.2, 0.80),
              ("f", 0.6, 0.99)]
    assert sweep.pareto_front(points) == ["e", "b", "a"]
    records = [{"job_id": p, "strategy": "s" if p < "d" else "t", "status": "ok", "accuracy": acc,
                "size_ratio": cost, "energy_ratio": 1 - cost} for p, cost, acc in points]
    records.append({"job_id": "x", "strategy": "s", "status": "failed", "error": "E: boom"})
    fronts = sweep.pareto_fronts(records)
    assert fronts["size"] == ["e", "b", "a"] and fronts["size/s"] == ["b", "a"]
    assert fronts["energy"] == ["f"] and "x" not in sum(fronts.values(), [])


def test_only_a_complete_ok_record_of_the_same_job_counts_as_finished(tmp_path: Path) -> None:
    job = sweep.Job("gradient_size50pct_s0", "gradient", "size=50%", 0, {"strategy_options": {}})
    settings = job.settings({"epochs": 1})
    folder = tmp_path / job.id
    folder.mkdir()
    assert sweep.load_record(tmp_path, job, settings, "abc") is None  # never finished
    good = {"job_id": job.id, "status": "ok", "settings": settings, "provenance": {"model_sha256": "abc"}}
    (folder / sweep.RESULT_NAME).write_text(json.dumps(good)[:-5])  # cut short
    assert sweep.load_record(tmp_path, job, settings, "abc") is None
    (folder / sweep.RESULT_NAME).write_text(json.dumps(good))
    assert sweep.load_record(tmp_path, job, settings, "abc") == good
    assert sweep.load_record(tmp_path, job, settings, "other model") is None
    assert sweep.load_record(tmp_path, job, job.settings({"epochs": 2}), "abc") is None
    (folder / sweep.RESULT_NAME).write_text(json.dumps({**good, "status": "failed"}))
    assert sweep.load_record(tmp_path, job, settings, "abc") is None


def _spec(out: Path) -> sweep.SweepSpec:
    return sweep.SweepSpec(model=str(DIGITS / "model.onnx"), data=str(DIGITS / "train.npz"), output=str(out),
                           base={"epochs": 1, "finetune_epochs": 1, "max_steps_per_epoch": 2})


def test_missing_ray_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"install prunequant\[sweep\]"):
        sweep.run_sweep(_spec(tmp_path / "out"), sweep.grid(["gradient"], ["size=50%"], [0]))
    assert not (tmp_path / "out").exists()


def test_a_full_folder_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(OutputError, match="--resume"):
        sweep.run_sweep(_spec(out), sweep.grid(["gradient"], ["size=50%"], [0]), executor=sweep.run_in_process)
    assert SweepJobsFailed.exit_code == 15


def _cli(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "prunequant"), "sweep", str(DIGITS / "model.onnx"),
               "--data", str(data), "--eval-data", str(DIGITS / "test.npz"), "-o", str(out),
               "--strategies", "gradient,uniform", "--targets", "size=50%,25%", "--seeds", "0",
               "--epochs", "1", "--finetune-epochs", "1", "--max-steps", "2", "--num-cpus", "2", "--no-progress",
               *extra]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_sweep_on_local_ray_with_two_workers_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    data = tmp_path / "train300.npz"  # 300 of the 1,257 training samples: a quicker search
    with np.load(DIGITS / "train.npz") as full:
        np.savez(data, **{k: v[:300] for k, v in full.items()})
    run = _cli(out, data)
    # uniform with the default --weight-bits 0,2,4,8 fails inside its job (it needs one width):
    # the error is recorded, the other jobs finish, the exit code says so
    assert run.returncode == 15, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 sweep jobs failed")
    document = json.loads((out / "sweep.json").read_text())
    records = {r["job_id"]: r for r in document["records"]}
    assert set(records) == {"gradient_size50pct_s0", "gradient_size25pct_s0", "uniform_none_s0"}
    failed = records["uniform_none_s0"]
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: --strategy uniform needs")
    assert "\n" not in failed["error"]
    model_hash = hashlib.sha256((DIGITS / "model.onnx").read_bytes()).hexdigest()
    for job_id in ("gradient_size50pct_s0", "gradient_size25pct_s0"):
        rec = records[job_id]
        assert rec["status"] == "ok"
        prov = rec["provenance"]
        assert prov["model_sha256"] == model_hash and prov["prunequant"] not in ("", None)
        assert prov["commit"] != "" and "sweep" in prov["command"] and "--strategies gradient,uniform" in prov["command"]
        assert 0 < rec["size_ratio"] <= 1 and 0 < rec["energy_ratio"] <= 1 and 0 <= rec["accuracy"] <= 1
        assert rec["accuracy_source"] == "eval_data" and rec["search_s"] is not None
        assert (out / job_id / "model.onnx").is_file() and (out / job_id / "model.report.json").is_file()
    assert records["gradient_size25pct_s0"]["size_ratio"] <= 0.25 + 1e-6
    # two Ray workers ran jobs at the same time
    spans = sorted((r["started_at"], r["finished_at"], r["worker_pid"]) for r in records.values())
    assert any(b[0] < a[1] and b[2] != a[2] for a, b in zip(spans, spans[1:])), spans
    assert document["fronts"]["size"] and set(document["fronts"]["size"]) <= set(records)
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("job_id,") and len(lines) == 4
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # stop mid-way: one job half-finished (its files, no result record); the other finished
    kept = out / "gradient_size50pct_s0" / sweep.RESULT_NAME
    kept_text, kept_mtime = kept.read_text(), kept.stat().st_mtime_ns
    (out / "gradient_size25pct_s0" / sweep.RESULT_NAME).unlink()
    (out / "gradient_size25pct_s0" / "stray.tmp").write_text("half-written")
    again = _cli(out, data, "--resume")
    assert again.returncode == 15, again.stderr[-2000:]
    assert "(1 finished before, 2 run now)" in again.stdout
    assert kept.read_text() == kept_text and kept.stat().st_mtime_ns == kept_mtime  # skipped
    assert not (out / "gradient_size25pct_s0" / "stray.tmp").exists()  # redone from an empty folder
    redone = json.loads((out / "gradient_size25pct_s0" / sweep.RESULT_NAME).read_text())
    assert redone["status"] == "ok"
    document = json.loads((out / "sweep.json").read_text())
    assert [r["job_id"] for r in document["records"] if r["status"] == "ok"] == [
        "gradient_size50pct_s0", "gradient_size25pct_s0"]
