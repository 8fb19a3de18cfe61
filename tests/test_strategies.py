"""The strategy seam: registry, the uniform and sequential strategies, the supernet's fixed
channels (the sequential strategy's second stage)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from graph_passes.errors import ConfigError
from graph_passes.prepare import prepare_model
from plugin import api
from plugin.engine.config import SearchConfig
from plugin.engine.supernet import Supernet
from plugin.strategies import available_strategies, get_strategy, register_strategy, resolve_options

DIGITS = "samples/digits/model.onnx"
TRAIN = "samples/digits/train.npz"


def test_registry_lists_and_refuses() -> None:
    assert {"gradient", "uniform", "sequential"} <= set(available_strategies())
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*gradient"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_strategy(get_strategy("uniform"))
    gradient = get_strategy("gradient")
    assert resolve_options(gradient, {"prune_init": "0.5"})["prune_init"] == 0.5
    with pytest.raises(ConfigError, match="expects a float"):
        resolve_options(gradient, {"prune_init": "lots"})


def _quick(**extra) -> api.CompressConfig:
    base = dict(epochs=1, finetune_epochs=1, max_steps_per_epoch=2, progress=False)
    base.update(extra)
    return api.CompressConfig(**base)


def test_uniform_is_one_width_everywhere() -> None:
    result = api.compress(DIGITS, TRAIN, config=_quick(strategy="uniform", weight_precisions=(4,), act_bits=(8,)))
    plan = result.plan
    assert {b for layer in plan.layers.values() for b in layer.bits} == {4}
    assert {a.bits for a in plan.activations.values()} == {8}
    assert all(len(g.kept) == g.size for g in plan.groups.values())
    assert plan.metadata["strategy"] == "uniform"
    assert plan.cost_after["size"] == pytest.approx(plan.cost_before["size"] / 2)


def test_uniform_refuses_a_target_and_several_widths_before_work() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot follow a --target"):
        api.compress("does-not-exist.onnx", TRAIN, config=_quick(strategy="uniform", target="size=35%"))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ConfigError, match="needs one weight width"):
        api.compress(DIGITS, TRAIN, config=_quick(strategy="uniform", weight_precisions=(4, 8)))


@pytest.mark.slow
def test_sequential_keeps_the_first_stage_channels() -> None:
    result = api.compress(DIGITS, TRAIN, config=_quick(
        strategy="sequential", lam=20.0, epochs=2, max_steps_per_epoch=4,
        strategy_options={"prune_target": "size=70%"}))
    stages = result.plan.metadata["stages"]
    assert [s["stage"] for s in stages] == ["prune", "mixed_precision"]
    pruned = sum(len(g.pruned) for g in result.plan.groups.values())
    assert pruned == stages[0]["pruned"] > 0
    bits = {b for layer in result.plan.layers.values() for b in layer.bits}
    assert 0 in bits and bits - {0}
    assert result.report["strategy"] == "sequential"


def test_fix_pruned_forces_and_forbids_pruning() -> None:
    prepared = prepare_model(DIGITS)
    net = Supernet.build(prepared.model, SearchConfig(progress=False), analysis=prepared.analysis)
    original = {name: torch.tensor(np.array(prepared.analysis.graph.constant(entry.info.layer.weight)))
                for name, entry in net._layers.items()}
    candidates = len(net.prune_probabilities())
    group = net.space.prunable_groups[0]
    size = net.space.group_size(group)
    keep = list(range(0, size, 2))
    net.fix_pruned({group: keep})
    plan = net.discretise(with_scales=False, prune_threshold=0.99)
    assert plan.groups[group].kept == tuple(keep)
    checked = 0
    for name, entry in net._layers.items():
        if group not in entry.info.layer.output_groups:
            continue
        checked += 1
        raw = net._raw(entry, entry.weight_attr).detach()
        kept_rows = [c for c, b in enumerate(plan.layers[name].bits) if b]
        # kept channels cannot be pruned any more: the initial rescale is 1, the weights are the original's
        assert torch.allclose(raw[kept_rows], original[name][kept_rows].to(raw.dtype), rtol=1e-6, atol=0)
    assert checked >= 1
    assert all(torch.isfinite(t).all() for t in net.thetas())
    # fixed channels are no longer candidates of the budget controller's threshold search
    assert len(net.prune_probabilities()) == candidates - (size - len(keep))


def test_qat_never_ends_below_its_start() -> None:
    """With validation data, QAT keeps the best epoch; a destructive learning rate ends on epoch 0
    (the calibrated frozen plan) with exactly its validation figures."""
    from plugin.data import load_dataset, input_specs
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.engine.training import FinetuneConfig, finetune, validation_score

    prepared = prepare_model(DIGITS)
    data = load_dataset(TRAIN, input_specs(prepared.model))
    train, held = data.split(0.2, seed=0)
    net = FakeQuantModel.build(prepared.model, SearchConfig(progress=False), analysis=prepared.analysis)
    net.calibrate(train)
    plan = net.space.uniform_plan(8)
    result = finetune(net, plan, train, FinetuneConfig(epochs=2, lr=1.0, max_steps_per_epoch=3, progress=False),
                      validation=held)
    assert [f["epoch"] for f in result.validation] == [0, 1, 2]
    start = result.validation[0]
    assert start["accuracy"] > 0.9  # the calibrated 8-bit start of the digits CNN
    assert max(f["accuracy"] for f in result.validation[1:]) < start["accuracy"]  # lr 1.0 wrecks it
    assert result.best_epoch == 0 and result.plan.metadata["finetune"]["best_epoch"] == 0
    after = validation_score(net, held)
    assert after["accuracy"] == start["accuracy"] and after["label_loss"] == pytest.approx(start["label_loss"])


def test_the_gradient_recipe_sets_the_defaults_an_option_given_wins() -> None:
    from plugin.strategies.gradient import RECIPES, resolve_recipe

    gradient = get_strategy("gradient")
    given = resolve_options(gradient, {})  # the default: auto
    with_target = resolve_recipe(given, "size=20%")
    assert with_target["recipe"] == "budget"
    assert {k: with_target[k] for k in RECIPES["budget"]} == {"discretisation": "expected", "settle": True,
                                                              "start": "4", "logit_steps": "adam"}
    assert {k: resolve_recipe(given, None)[k] for k in RECIPES["paper"]} == RECIPES["paper"]
    mine = resolve_recipe(resolve_options(gradient, {"settle": "false", "recipe": "budget"}), None)
    assert mine["settle"] is False and mine["logit_steps"] == "adam"  # the recipe asked for, my settle
    paper = resolve_recipe(resolve_options(gradient, {"recipe": "paper"}), "size=20%")
    assert paper["discretisation"] == "keep_first" and paper["settle"] is False
    with pytest.raises(ConfigError, match="recipe"):
        resolve_options(gradient, {"recipe": "fast"})


def test_the_plan_records_the_options_the_recipe_resolved() -> None:
    result = api.compress(DIGITS, TRAIN, config=_quick(target="size=50%", weight_precisions=(0, 2, 8)))
    options = result.plan.metadata["strategy_options"]
    assert options["recipe"] == "budget" and options["settle"] is True
    assert options["start"] == "4"  # 4 is not searched here: the recipe's start falls back to the default
    assert options["discretisation"] == "expected" and options["logit_steps"] == "adam"


def test_a_budget_met_before_the_temperature_step_is_checked_again() -> None:
    """The controller checks the plan inside an epoch; the epoch's end then lowers the
    temperature, which moves theta and so an ``expected`` plan. Measured before the fix (digits
    sample, size=35%, 2 + 2 epochs, the budget recipe): met at 14.55 KB inside epoch 5, the plan
    returned 0.360 of W8 (15.2 KB > 14.79 KB)."""
    result = api.compress(DIGITS, TRAIN, config=api.CompressConfig(
        target="size=35%", weight_precisions=(0, 2, 4, 8), act_bits=(8,), epochs=2, finetune_epochs=1, seed=0,
        progress=False, strategy_options={"recipe": "budget"}))
    assert result.plan.cost_after["size"] <= 0.35 * result.report["cost_before_8bit"]["size"] * 1.0001
