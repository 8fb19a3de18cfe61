"""The gradient search, the budget controller and QAT on samples/digits (short runs on a subset)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from graph_passes.errors import CostModelError
from plugin.budget import BudgetConfig, parse_target, search_to_budget
from plugin.data import Dataset
from plugin.engine.training import FinetuneConfig, evaluate, finetune
from plugin.inspect_cmd import PreparedModel, prepare_model
from plugin.engine.config import SearchConfig, SearchConfigError
from plugin.engine.supernet import run_search
from plugin.engine.supernet import Supernet as SearchableModel

DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"


@pytest.fixture(scope="module")
def digits() -> PreparedModel:
    return prepare_model(str(DIGITS / "model.onnx"), ["input=1x1x8x8"])


@pytest.fixture(scope="module")
def train() -> Dataset:
    data = np.load(DIGITS / "train.npz")
    return Dataset({"input": data["input"][:256]}, data["labels"][:256].astype(np.int64))


def _searchable(digits: PreparedModel, **config: object) -> SearchableModel:
    cfg = SearchConfig(progress=False, batch_size=64, **config)  # type: ignore[arg-type]
    return SearchableModel.build(digits.model, cfg, analysis=digits.analysis)


def test_large_lambda_prunes_and_lowers_cost(digits: PreparedModel, train: Dataset) -> None:
    sm = _searchable(digits, epochs=3, lam=20000.0)
    plan = run_search(sm, train, sm.config)
    pruned = sum(len(g.pruned) for g in plan.groups.values())
    assert pruned > 0
    assert all(g.kept for g in plan.groups.values())
    assert plan.cost_after["size"] < plan.cost_before["size"]
    assert plan.cost_before["size"] == sm.cost_before("size") == 42256 * 8
    assert plan.metadata["strategy"] == "gradient" and len(plan.metadata["history"]) == 3
    assert set(plan.cost_after) >= {"size", "bops", "mpic"}


@pytest.mark.parametrize(
    ("text", "model", "value", "relative"),
    [("size=25%", "size", 0.25, True), ("size=25 %", "size", 0.25, True), ("size=40KB", "size", 320000, False),
     ("size=40000B", "size", 320000, False), ("size=1KiB", "size", 8192, False),
     ("mpic=1.2e6cycles", "mpic", 1.2e6, False)],
)
def test_parse_target(text: str, model: str, value: float, relative: bool) -> None:
    budget = parse_target(text)
    assert (budget.cost_model, budget.relative) == (model, relative)
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["size", "size=", "=0.5", "size=abc", "size=-1", "size=0", "size=150%",
                                  "size=3parsec", "mpic=3KB", "size=0.5=1", "nosuchmodel=50%"])
def test_parse_target_errors(text: str) -> None:
    with pytest.raises(CostModelError) as info:
        parse_target(text)
    message = str(info.value)
    assert text in message or "unknown cost model" in message


def test_unreachable_budget_fails_fast_with_smallest_value(digits: PreparedModel, train: Dataset) -> None:
    sm = _searchable(digits)
    smallest = sm.minimal_plan(["size"]).cost_after["size"]
    start = time.perf_counter()
    with pytest.raises(CostModelError, match="smallest reachable size cost is 14 B") as info:
        search_to_budget(sm, train, "size=10B")
    assert time.perf_counter() - start < 5
    assert smallest == 110  # 1 channel per prunable group at 2 bits; the Gemm keeps 10 outputs
    assert "0.0003 of the 8-bit model" in str(info.value)


def test_relative_budget_is_met_then_finetuned(digits: PreparedModel, train: Dataset) -> None:
    sm = _searchable(digits, seed=1)
    result = search_to_budget(sm, train, "size=50%", sm.config,
                              BudgetConfig(lam_start=1000.0, lam_factor=2.0, check_every=1, max_rounds=6))
    plan = result.plan
    assert plan.cost_after["size"] <= 0.5 * plan.cost_before["size"]
    assert sm.cost_of_plan(plan, "size") == plan.cost_after["size"] <= result.target
    assert plan.metadata["budget"] == "size=50%"
    tuned = finetune(sm, plan, train, FinetuneConfig(epochs=1, max_steps_per_epoch=2, progress=False))
    assert [layer.bits for layer in tuned.plan.layers.values()] == [layer.bits for layer in plan.layers.values()]
    for entry in sm._layers.values():
        bits = torch.tensor(plan.layers[entry.info.name].bits)
        weight = getattr(sm.net.get_submodule(entry.owner), entry.weight_attr).detach()
        assert torch.count_nonzero(weight.movedim(entry.quantizer.ch_axis, 0)[bits == 0]) == 0
    metrics = evaluate(sm, train)
    with torch.no_grad():
        inputs = torch.as_tensor(train.arrays[sm.input_names[0]])
        predicted = sm(inputs).argmax(dim=1).numpy()
        teacher = sm.teacher_outputs(inputs).argmax(dim=1).numpy()
    assert metrics["samples"] == len(train)
    assert metrics["accuracy"] == pytest.approx(float((predicted == train.labels).mean()))
    assert metrics["agreement"] == pytest.approx(float((predicted == teacher).mean()))


def test_budget_settle_searches_every_epoch_and_meets_the_budget(digits: PreparedModel, train: Dataset) -> None:
    """settle: after the budget is first met the search goes on for the rest of the epochs,
    lambda fed back from the plan's cost, the temperature annealed to settle_temperature; the
    returned plan still meets the budget."""
    sm = _searchable(digits, seed=1, epochs=5, budget_settle=True, settle_temperature=0.2)
    result = search_to_budget(sm, train, "size=40%", sm.config,
                              BudgetConfig(lam_start=1000.0, lam_factor=2.0, check_every=1, max_rounds=6))
    history = result.plan.metadata["history"]
    assert result.epochs == len(history) == 5
    settled = [t for t in result.trace if t.get("settle")]
    first = next(i for i, h in enumerate(history) if h["epoch"] == settled[0]["epoch"])
    assert settled and settled[-1]["epoch"] == 5 and first < 4
    assert history[-1]["temperature"] == pytest.approx(0.2)
    assert result.plan.cost_after["size"] <= result.target
    # lambda follows the plan's cost at every check: it falls under the budget and rises above it
    for before, after in zip(settled, settled[1:]):
        ratio = before["plan_cost"] / result.target
        assert after["lambda"] == pytest.approx(before["lambda"] * min(2.0, max(0.5, ratio ** 2)))
    assert any(t["plan_cost"] < result.target for t in settled)


def test_budget_without_settle_hands_the_unused_epochs_back(digits: PreparedModel, train: Dataset) -> None:
    sm = _searchable(digits, seed=1, epochs=5)
    result = search_to_budget(sm, train, "size=40%", sm.config,
                              BudgetConfig(lam_start=1000.0, lam_factor=2.0, check_every=1, max_rounds=6))
    assert result.epochs < 5 and not any(t.get("settle") for t in result.trace)


def test_config_errors() -> None:
    with pytest.raises(SearchConfigError, match="task_loss"):
        SearchConfig(task_loss="hinge")
    with pytest.raises(SearchConfigError, match="discretisation"):
        SearchConfig(discretisation="round")
    with pytest.raises(SearchConfigError, match="settle_temperature"):
        SearchConfig(settle_temperature=0.0)


def test_start_at_width_starts_near_that_uniform_plan(digits: PreparedModel, train: Dataset) -> None:
    """start=4: the discretised starting plan is uniform 4-bit, and the starting mixture is
    closer to the FP32 model than the default start's."""
    from plugin.engine.search_start import start_at_width, widest_width_within

    default, started = _searchable(digits), _searchable(digits)
    before = started.cost_before("size")
    assert widest_width_within(started, "size", 0.5 * before) == 4
    assert widest_width_within(started, "size", 0.3 * before) == 2
    assert widest_width_within(started, "size", 0.1 * before) == 2  # none fits: the narrowest (pruning on top)
    assert start_at_width(started, 4, 2.0) == len(started.alphas)
    plan = started.discretise(cost_models=["size"])
    assert {b for layer in plan.layers.values() for b in layer.bits} == {4}
    x = torch.as_tensor(train.arrays["input"][:128])
    default.eval(), started.eval()
    with torch.no_grad():
        teacher = default.teacher_outputs(x)
        error = [float((net(x) - teacher).abs().mean()) for net in (default, started)]
    assert error[1] < error[0]


def test_start_option_needs_a_budget_or_a_width() -> None:
    from graph_passes.errors import ConfigError
    from plugin.strategies.gradient import _start

    class Net:
        alphas = [type("A", (), {"precisions": (0, 2, 4, 8)})()]

    with pytest.raises(ConfigError, match="needs a --target"):
        _start(Net(), "budget", 2.0, None)
    with pytest.raises(ConfigError, match="not a searched weight width"):
        _start(Net(), "3", 2.0, None)
    with pytest.raises(ConfigError, match="use default, budget or a weight width"):
        _start(Net(), "wide", 2.0, None)


def test_a_budget_met_far_below_says_so(digits: PreparedModel, train: Dataset, caplog) -> None:
    """A start at 4 bits meets size=90% at once and settling does not widen it to 90%: the
    controller warns that the plan uses a small share of the budget; a tight budget does not."""
    import logging

    from plugin.engine.search_start import start_at_width

    sm = _searchable(digits, seed=1, epochs=2, budget_settle=True)
    start_at_width(sm, 4, 2.0)
    with caplog.at_level(logging.WARNING, logger="plugin.budget"):
        result = search_to_budget(sm, train, "size=90%", sm.config, BudgetConfig(check_every=1, max_rounds=2))
    share = result.plan.cost_after["size"] / result.target
    assert share < 0.75
    loose = [r.getMessage() for r in caplog.records if "room to spare" in r.getMessage()]
    assert len(loose) == 1 and f"{100 * share:.0f}% of the budget" in loose[0] and "size=90%" in loose[0]
    caplog.clear()
    tight = _searchable(digits, seed=1)
    with caplog.at_level(logging.WARNING, logger="plugin.budget"):
        result = search_to_budget(tight, train, "size=50%", tight.config,
                                  BudgetConfig(lam_start=1000.0, lam_factor=2.0, check_every=1, max_rounds=6))
    assert result.plan.cost_after["size"] >= 0.75 * result.target
    assert not [r for r in caplog.records if "room to spare" in r.getMessage()]
