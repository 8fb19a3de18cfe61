"""--strategy rl: the environment's action wall, the reward, a short end-to-end run, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graph_passes.errors import ConfigError, CostModelError
from graph_passes.prepare import prepare_model
from plugin import api
from plugin.cli import main
from plugin.evaluator import channel_scores
from plugin.space import Precisions, SearchSpace
from plugin.strategies import available_strategies, get_strategy
from plugin.strategies.rl import ACTION_DIM, Decision, Walk, episode_reward, make_env

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "samples" / "digits" / "model.onnx")
TRAIN = str(REPO / "samples" / "digits" / "train.npz")
_SAMPLES = np.load(TRAIN)
N_SAMPLES = 300  # 60 held out: every run here takes a few seconds
DATA = {"input": _SAMPLES["input"][:N_SAMPLES]}
LABELS = _SAMPLES["labels"][:N_SAMPLES]


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(prepare_model(DIGITS).analysis, Precisions())


def _walk(space: SearchSpace) -> Walk:
    return Walk(space, channel_scores(space, "ql1", 8), 0.2)


def _run_episode(env, actions) -> Decision:
    env.reset(seed=0)
    done = False
    for action in actions:
        assert not done
        _obs, _reward, done, _trunc, _info = env.step(np.asarray(action, dtype=np.float32))
    assert done
    return env.decision


def test_registered_with_its_options() -> None:
    assert "rl" in available_strategies()
    strategy = get_strategy("rl")
    assert {"episodes", "accuracy_loss", "energy", "target", "agent", "warmup"} <= set(strategy.options)
    assert strategy.options["accuracy_loss"].default == 1.7


def test_walk_shares_a_coupled_groups_decision(space: SearchSpace) -> None:
    walk = _walk(space)
    decided = [g for g in walk.group_of.values() if g is not None]
    assert sorted(decided) == sorted(space.prunable_groups)  # each prunable group decided exactly once
    # the residual block: two convs write g1; only the first decides it
    writers = [n for n, info in space.layers.items() if {u.group_id for u in space.map.units.values()
                                                        if u.alpha_index == info.alpha_index} == {"g1"}]
    assert len(writers) == 2 and walk.group_of[writers[0]] == "g1" and walk.group_of[writers[1]] is None


@pytest.mark.parametrize("budget", ["mpic_energy=30%", "size=20%", "horowitz_energy=25%"])
def test_action_wall_keeps_every_episode_within_the_budget(space: SearchSpace, budget: str) -> None:
    from plugin.targets import parse_target

    b = parse_target(budget)
    limit = b.absolute(space.cost_before(b.cost_model))
    walk = _walk(space)
    env = make_env(walk, lambda d: (0.0, {}), wall=(b.cost_model, limit))
    rng = np.random.default_rng(0)
    steps = len(walk.names)
    episodes = [np.ones((steps, ACTION_DIM))] + [rng.uniform(0, 1, (steps, ACTION_DIM)) for _ in range(15)]
    for actions in episodes:
        decision = _run_episode(env, actions)
        cost = walk.plan(decision, cost_models=[b.cost_model]).cost_after[b.cost_model]
        assert cost <= limit * (1 + 1e-9)
    assert env.wall_hits > 0  # the all-ones episode (nothing compressed) had to be walled
    # without a wall the widest actions compress nothing
    free = make_env(walk, lambda d: (0.0, {}), wall=None)
    decision = _run_episode(free, np.ones((steps, 3)))
    plan = walk.plan(decision, cost_models=["size"])
    assert plan.cost_after["size"] == pytest.approx(plan.cost_before["size"])


def test_granularity_actions(space: SearchSpace) -> None:
    walk = _walk(space)
    env = make_env(walk, lambda d: (0.0, {}))
    steps = len(walk.names)
    deciders = [n for n in walk.names if walk.group_of[n] is not None]
    # fine (granularity >= 0.5) at ratio 0.5: sparsity 0.9 * 0.5 on every layer, no channel removed
    fine = _run_episode(env, np.tile([0.5, 1.0, 1.0, 0.9], (steps, 1)))
    assert fine.sparsity == {n: pytest.approx(0.45) for n in walk.names}
    assert all(fine.keep[walk.group_of[n]] == space.group_size(walk.group_of[n]) for n in deciders)
    plan = walk.plan(fine, cost_models=["horowitz_energy", "mpic_energy"])
    assert all(lp.sparsity == pytest.approx(0.45) for lp in plan.layers.values())
    assert plan.cost_after["mpic_energy"] == pytest.approx(plan.cost_before["mpic_energy"])  # mpic skips no zero
    assert plan.cost_after["horowitz_energy"] < 0.7 * plan.cost_before["horowitz_energy"]
    # coarse at ratio 0: the deciding layers keep min_keep of their group, dense; a layer that decides
    # no group has only fine-grained pruning to offer
    coarse = _run_episode(env, np.tile([0.0, 1.0, 1.0, 0.1], (steps, 1)))
    assert all(coarse.keep[walk.group_of[n]] == walk.lowest_keep(walk.group_of[n]) for n in deciders)
    assert set(coarse.sparsity) == set(walk.names) - set(deciders)
    # -S granularity=coarse: never sparse; =fine: never a channel removed
    only_coarse = Walk(space, walk.scores, 0.2, "coarse")
    env = make_env(only_coarse, lambda d: (0.0, {}))
    rng = np.random.default_rng(1)
    assert not _run_episode(env, rng.uniform(0, 1, (steps, ACTION_DIM))).sparsity
    only_fine = Walk(space, walk.scores, 0.2, "fine", max_sparsity=0.6)
    env = make_env(only_fine, lambda d: (0.0, {}))
    decision = _run_episode(env, rng.uniform(0, 1, (steps, ACTION_DIM)))
    assert all(decision.keep[g] == space.group_size(g) for g in decision.keep)
    assert decision.sparsity and max(decision.sparsity.values()) <= 0.6


def test_observation_is_normalised(space: SearchSpace) -> None:
    env = make_env(_walk(space), lambda d: (1.0, {}))
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and env.observation_space.contains(obs)
    for _ in range(len(env.walk.names)):
        obs, reward, done, _t, _i = env.step(np.full(3, 0.3, dtype=np.float32))
        assert env.observation_space.contains(obs)
        assert reward == (1.0 if done else 0.0)  # the reward only at the episode end


def test_reward_penalises_a_loss_over_the_constraint() -> None:
    # same energy; within 1.7 points no penalty beyond the score term, over it a penalty per point
    r_ok, loss_ok, ok = episode_reward(0.99, 1.0, 5.0, 10.0, 1.7, 0.2, 0.1)
    r_bad, loss_bad, bad = episode_reward(0.95, 1.0, 5.0, 10.0, 1.7, 0.2, 0.1)
    assert ok and not bad and loss_ok == pytest.approx(1.0) and loss_bad == pytest.approx(5.0)
    assert r_ok == pytest.approx(0.5 + 0.099)
    assert r_bad == pytest.approx(0.095 - 0.2 * 3.3)  # the saving counts only within the constraint
    assert r_bad < episode_reward(1.0, 1.0, 10.0, 10.0, 1.7, 0.2, 0.1)[0]  # below any feasible plan
    # the penalty grows with the loss, up to 10 points over the constraint
    assert episode_reward(0.90, 1.0, 5.0, 10.0, 1.7, 0.2, 0.1)[0] < r_bad
    assert episode_reward(0.10, 1.0, 5.0, 10.0, 1.7, 0.2, 0.1)[0] == pytest.approx(0.01 - 0.2 * 10)
    # less energy is better at equal accuracy
    assert episode_reward(0.99, 1.0, 4.0, 10.0, 1.7, 0.2, 0.1)[0] > r_ok


def test_short_run_keeps_the_budget_and_warns_when_no_plan_meets_the_constraint(tmp_path: Path, caplog) -> None:
    out = tmp_path / "d.onnx"
    config = api.CompressConfig(strategy="rl", strategy_options={
        "episodes": 5, "accuracy_loss": 0.0, "target": "mpic_energy=25%", "hidden": 32},
        epochs=1, finetune_epochs=1, max_steps_per_epoch=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="plugin.strategies.rl"):
        result = api.compress(DIGITS, DATA, labels=LABELS, output=str(out), config=config)
    assert out.exists()
    warnings = [r for r in caplog.records if r.name == "plugin.strategies.rl" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no episode of 5" in warnings[0].getMessage()
    report = json.loads((tmp_path / "d.report.json").read_text())
    episodes = [h for h in report["history"] if h["kind"] == "episode"]
    assert len(episodes) == 5
    assert all(h["cost"]["mpic_energy"] <= 0.25 + 1e-9 for h in episodes)
    summary = next(h for h in report["history"] if h["kind"] == "rl")
    assert summary["constraint_met"] is False and summary["feasible_episodes"] == 0
    assert report["cost_after"]["mpic_energy"] <= 0.25 * report["cost_before_8bit"]["mpic_energy"] * (1 + 1e-9)
    losses = [h["accuracy_loss_points"] for h in episodes]
    assert losses[summary["best_episode"]] == min(losses)  # the best found: the smallest loss
    assert result.report["history"] == report["history"]


def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    result = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(out), "--strategy", "rl",
                                       "-S", "episodes=12", "-S", "hidden=64", "--epochs", "1",
                                       "--finetune-epochs", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["cost_before_8bit"]["mpic_energy"] > 0 and report["cost_after"]["mpic_energy"] > 0
    assert report["quality"]["accuracy_before"] is not None and report["quality"]["accuracy_after"] is not None
    episodes = [h for h in report["history"] if h["kind"] == "episode"]
    assert len(episodes) == 12 and all({"energy", "accuracy", "reward"} <= set(h) for h in episodes)
    assert sum(h["warmup"] for h in episodes) == 3


def test_bad_input(tmp_path: Path) -> None:
    def run(**options):
        config = api.CompressConfig(strategy="rl", strategy_options=options, epochs=1, finetune_epochs=0,
                                    progress=False)
        return api.compress(DIGITS, DATA, labels=LABELS, output=None, config=config)

    with pytest.raises(ConfigError, match="has no option 'bogus'"):
        run(bogus=1)
    with pytest.raises(ConfigError, match="episodes=0"):
        run(episodes=0)
    with pytest.raises(ConfigError, match="agent"):
        run(agent="ppo")
    with pytest.raises(ConfigError, match="granularity=rows"):
        run(granularity="rows")
    with pytest.raises(ConfigError, match="max_sparsity=1.5"):
        run(max_sparsity=1.5)
    with pytest.raises(CostModelError, match="cannot be met"):
        run(target="mpic_energy=1%")
    cli = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(tmp_path / "x.onnx"),
                                    "--strategy", "rl", "--target", "size=30%", "-S", "target=size=20%"])
    assert cli.exit_code == 14 and "give one of them" in cli.stderr
    cli = CliRunner().invoke(main, ["compress", DIGITS, "--data", TRAIN, "-o", str(tmp_path / "x.onnx"),
                                    "--strategy", "rl", "-S", "nope=1"])
    assert cli.exit_code != 0 and len(cli.stderr.strip().splitlines()) == 1 and "nope" in cli.stderr
    assert not (tmp_path / "x.onnx").exists()
