"""Adding a strategy is one module: a toy strategy installed through the ``prunequant.strategies``
entry-point group of a temporary package (a real ``.dist-info`` on the path) compresses the
digits sample from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"

TOY = '''
"""A toy strategy: keep half of every prunable group's channels (by L1 importance), 4-bit weights."""
from plugin.importance import channel_importance, keep_indices
from plugin.strategies import StrategyOption, StrategyResult


class HalfStrategy:
    name = "half"
    summary = "toy: keep a share of every prunable group by L1 norm, 4-bit weights"
    steerable = False
    options = {"keep": StrategyOption("keep", float, 0.5, "share of channels kept")}

    def search(self, problem, options):
        space = problem.space
        scores = channel_importance(space)
        kept = {g: keep_indices(scores[g], options["keep"]) for g in space.prunable_groups}
        plan = space.plan(kept=kept, layer_bits={n: 4 for n in space.layers}, site_bits=8,
                          metadata={"toy": True})
        return StrategyResult(plan, [{"kept": {g: len(k) for g, k in kept.items()}}])
'''


def _install(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "pq_toy_strategy").mkdir(parents=True)
    (site / "pq_toy_strategy" / "__init__.py").write_text(textwrap.dedent(TOY))
    info = site / "pq_toy_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pq-toy-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[prunequant.strategies]\nhalf = pq_toy_strategy:HalfStrategy\n")
    (info / "RECORD").write_text("")
    return site


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([str(Path(sys.executable).parent / "prunequant"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_entry_point_strategy_compresses_digits(tmp_path: Path) -> None:
    site = _install(tmp_path)
    listed = _run(["strategies"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "half" in listed.stdout and "toy: keep a share" in listed.stdout

    out = tmp_path / "half.onnx"
    done = _run(["compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"), "-o", str(out),
                 "--strategy", "half", "-S", "keep=0.5", "--epochs", "1", "--finetune-epochs", "1",
                 "--no-progress", "--json"], site, tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "half.plan.json").read_text())
    report = json.loads((tmp_path / "half.report.json").read_text())
    assert out.exists() and report["strategy"] == "half"
    assert plan["metadata"]["strategy"] == "half" and plan["metadata"]["toy"] is True
    groups = plan["groups"]
    prunable = [g for g in groups.values() if len(g["kept"]) < g["size"]]
    assert prunable, "the toy strategy pruned nothing"
    for group in prunable:
        assert len(group["kept"]) == max(1, round(group["size"] / 2))
    bits = {b for layer in plan["layers"].values() for b in layer["bits"]}
    assert bits == {0, 4}
    assert report["history"][0]["kept"]


def test_entry_point_strategy_unknown_option_is_refused(tmp_path: Path) -> None:
    site = _install(tmp_path)
    done = _run(["compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"), "-o",
                 str(tmp_path / "x.onnx"), "--strategy", "half", "-S", "ratio=0.5"], site, tmp_path)
    assert done.returncode == 14, done.stderr
    assert "no option 'ratio'" in done.stderr and "keep" in done.stderr
    assert not list(tmp_path.glob("x*"))
