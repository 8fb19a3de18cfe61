"""``--strategy bayesian``: the study in optuna's storage (beside the output, resumable, shared by
worker processes without a trial evaluated twice), the model hash and settings it records, the
budget, the Pareto front and its PNG, and bad input (unreachable budget, a storage that cannot be
opened, a study of another model, Ctrl-C during a trial)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from graph_passes.errors import ConfigError, CostModelError, PlanError
from plugin import api
from plugin.cli import main
from plugin.strategies import available_strategies, get_strategy
from plugin.strategies.bayesian import open_storage, pareto_front, redact, study_path

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "samples" / "digits" / "model.onnx")
TRAIN = str(REPO / "samples" / "digits" / "train.npz")
_SAMPLES = np.load(TRAIN)
N_SAMPLES = 300  # the first 300 of train.npz: 60 held out; keeps every run here to a few seconds
DATA = {"input": _SAMPLES["input"][:N_SAMPLES]}
LABELS = _SAMPLES["labels"][:N_SAMPLES]


def _compress(output: str | None = None, **config):
    return api.compress(DIGITS, DATA, labels=LABELS, output=output, config=_config(**config))


def _config(trials: int = 6, **extra) -> api.CompressConfig:
    options = {"trials": trials, **extra.pop("options", {})}
    base = dict(strategy="bayesian", strategy_options=options, target="size=50%", epochs=1, finetune_epochs=0,
                max_steps_per_epoch=2, progress=False)
    base.update(extra)
    return api.CompressConfig(**base)


def _trials(db: Path, name: str | None = None) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{db}"
    name = name or optuna.study.get_all_study_names(storage)[0]
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_registered_with_its_options() -> None:
    assert "bayesian" in available_strategies()
    strategy = get_strategy("bayesian")
    assert strategy.steerable
    assert {"trials", "bits", "criterion", "sampler", "study", "storage", "resume"} <= set(strategy.options)


def test_study_beside_the_output_front_png_and_history(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    result = _compress(str(out), trials=6)
    assert out.exists() and (tmp_path / "d.pareto.png").stat().st_size > 1000
    db = Path(study_path(str(out)))
    assert db == tmp_path / "d.study.db"
    trials = _trials(db)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    study = optuna.load_study(study_name=optuna.study.get_all_study_names(f"sqlite:///{db}")[0],
                              storage=f"sqlite:///{db}")
    assert study.user_attrs["model_sha256"] == result.plan.model_sha256
    history = result.report["history"]
    rows = [h for h in history if h["kind"] == "trial"]
    assert len(rows) == 6 and all({"params", "kept", "cost", "feasible", "score"} <= set(h) for h in rows)
    front = next(h for h in history if h["kind"] == "pareto_front")["points"]
    costs = [p["cost"] for p in front]
    assert costs == sorted(costs) and [p["score"] for p in front] == sorted(p["score"] for p in front)
    evaluator = next(h for h in history if h["kind"] == "evaluator")
    assert evaluator["mean_forward_passes"] > 0
    plan = result.plan
    assert plan.metadata["strategy"] == "bayesian" and plan.metadata["weight_bits"] == 8
    assert {b for layer in plan.layers.values() for b in layer.bits} <= {0, 8}
    assert plan.cost_after["size"] <= 0.5 * plan.cost_before["size"] * (1 + 1e-9)  # the budget is met
    best = plan.metadata["best_trial"]
    chosen = next(h for h in rows if h["trial"] == best)
    assert chosen["feasible"] and chosen["score"] == max(h["score"] for h in rows if h["feasible"])

    # an existing study is continued only with --resume; --trials is the study's total
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        _compress(str(tmp_path / "d2.onnx"), trials=8, options={"storage": f"sqlite:///{db}"})
    _compress(str(out), trials=8, options={"resume": True})
    complete = [t for t in _trials(db) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in complete) == list(range(8))  # 6 kept, 2 more, nothing re-run


def test_a_study_of_another_model_or_other_settings_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    storage = f"sqlite:///{db}"
    other = optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    other.set_user_attr("model_sha256", "f" * 64)
    with pytest.raises(PlanError, match="another model"):
        _compress(options={"storage": storage, "study": "shared", "resume": True})
    _compress(trials=2, options={"storage": storage, "study": "mine", "resume": True})
    with pytest.raises(ConfigError, match="other settings.*bits"):
        _compress(trials=2, options={"storage": storage, "study": "mine", "resume": True, "bits": 4})


def test_bad_input_is_one_line() -> None:
    with pytest.raises(ConfigError, match="cannot be opened") as info:
        open_storage("nosuchdb+driver://x/y", None)
    assert "\n" not in str(info.value)
    with pytest.raises(CostModelError, match="cannot be met by pruning a W8 model"):
        _compress(target="size=1%")
    with pytest.raises(ConfigError, match="must include 0"):
        _compress(weight_precisions=(2, 4, 8))
    assert redact("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"


def test_cli_flags_map_to_the_strategy_and_are_refused_elsewhere(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(tmp_path / "x.onnx"),
                                       "--trials", "5", "--resume"])
    assert result.exit_code == 14
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trials, --resume: only --strategy bayesian" in lines[0]
    result = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(tmp_path / "x.onnx"),
                                       "--strategy", "bayesian", "--trials", "5", "-S", "trials=4"])
    assert result.exit_code == 14 and "give one of them" in result.stderr
    result = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(tmp_path / "x.onnx"),
                                       "--strategy", "bayesian", "--storage", "nosuchdb+driver://x/y"])
    assert result.exit_code == 14 and "cannot be opened" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_lambda_objective_and_front_helper() -> None:
    result = _compress(trials=4, target=None, lam=0.5)
    rows = [h for h in result.report["history"] if h["kind"] == "trial"]
    assert len(rows) == 4 and all(h["feasible"] for h in rows)
    for h in rows:
        if h["score"] is not None and "duplicate_of" not in h:
            assert h["value"] == pytest.approx(h["score"] - 0.5 * h["cost"]["size"], abs=1e-9)
    front = pareto_front([{"kind": "trial", "trial": i, "score": s, "cost": {"size": c}}
                          for i, (s, c) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.95, 0.7), (0.5, 0.2)])])
    assert [p["trial"] for p in front] == [3, 0, 2]


def test_ctrl_c_during_a_trial_keeps_completed_trials(tmp_path: Path, monkeypatch) -> None:
    from plugin.evaluator import CandidateEvaluator

    calls = {"n": 0}
    original = CandidateEvaluator.evaluate

    def interrupt_third(self, plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, plan)

    monkeypatch.setattr(CandidateEvaluator, "evaluate", interrupt_third)
    out = tmp_path / "d.onnx"
    with pytest.raises(KeyboardInterrupt):
        _compress(str(out), trials=10, target="size=80%")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.study.db"]  # no model, plan, report or PNG
    states = [t.state for t in _trials(tmp_path / "d.study.db")]
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and optuna.trial.TrialState.RUNNING not in states


_WORKER = """
import os, sys, time
from plugin import api
# start together: on a loaded machine one worker's imports can outlast the other's whole study
ready = sys.argv[5]
open(os.path.join(ready, f"ready-{os.getpid()}"), "w").close()
deadline = time.time() + 180
while len(os.listdir(ready)) < 2 and time.time() < deadline:
    time.sleep(0.05)
api.compress(sys.argv[1], sys.argv[2], config=api.CompressConfig(
    strategy="bayesian", target="size=60%", epochs=1, finetune_epochs=0, max_steps_per_epoch=1, progress=False,
    strategy_options={"trials": int(sys.argv[4]), "storage": sys.argv[3], "study": "shared", "resume": True}))
"""


@pytest.mark.slow
def test_two_workers_share_one_study_without_evaluating_a_trial_twice(tmp_path: Path) -> None:
    journal = str(tmp_path / "study.journal")
    data = tmp_path / "data.npz"
    np.savez(data, input=DATA["input"], labels=LABELS)
    n = 10
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, DIGITS, str(data), journal, str(n), str(ready)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    storage, _ = open_storage(journal, None)
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n
    records = [t.user_attrs["prunequant"] for t in complete]
    assert len({r["worker"] for r in records}) == 2  # both workers ran trials
    evaluated = [r["key"] for r in records if r["evaluated"]]
    assert len(evaluated) == len(set(evaluated))  # no plan evaluated twice
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    assert json.dumps([t.params for t in complete])  # params are in the storage
    assert np.isfinite([t.value for t in complete]).all()
