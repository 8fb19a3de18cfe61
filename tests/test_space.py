"""plugin.space: Precisions validated once; decisions -> costed plans without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from graph_passes.errors import ConfigError, PlanError
from graph_passes.prepare import prepare_model
from plugin.importance import channel_importance, keep_indices
from plugin.space import Precisions, SearchSpace, weight_scales


@pytest.mark.parametrize("weights,acts,flag,fragment", [
    ("0", None, "--weight-bits", "at least one non-zero"),
    ("0,3,8", None, "--weight-bits", "3 bit(s) cannot be exported"),
    ("8,8", None, "--weight-bits", "listed twice"),
    ("", None, "--weight-bits", "comma-separated"),
    (None, "x", "--act-bits", "'x' is not a whole number"),
    (None, "1", "--act-bits", "1 bit(s) cannot be exported"),
    (None, "0,8", "--act-bits", "only a weight option"),
    (None, "2,,8", "--act-bits", "comma-separated"),
])
def test_precisions_refuse_bad_widths_naming_the_flag(weights, acts, flag, fragment) -> None:
    with pytest.raises(ConfigError) as refused:
        Precisions.parse(weights, acts)
    assert str(refused.value).startswith(flag) and fragment in str(refused.value)


def test_precisions_sorted_and_defaults() -> None:
    p = Precisions.parse("8,0,2", "8,4")
    assert p.weights == (0, 2, 8) and p.activations == (4, 8) and p.prunes and p.weight_widths == (2, 8)
    assert Precisions() == Precisions.parse(None, None) == Precisions((0, 2, 4, 8), (2, 4, 8))
    with pytest.raises(ConfigError):
        Precisions((True, 8))  # a bool is not a bit-width


def test_space_module_is_torch_free() -> None:
    code = ("import sys; import plugin.space, plugin.importance, plugin.strategies, plugin.targets; "
            "from graph_passes.prepare import prepare_model; "
            "s = plugin.space.SearchSpace(prepare_model('samples/digits/model.onnx').analysis); "
            "s.cost_of_plan(s.minimal_plan()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def digits():
    return prepare_model("samples/digits/model.onnx")


def test_plan_of_a_decision_costs_what_it_says(digits) -> None:
    space = SearchSpace(digits.analysis, Precisions.parse("0,2,4,8", "4,8"))
    baseline = space.baseline_plan()
    before = space.cost_of_plan(baseline, "size")
    assert before == 8 * 42_256  # the README's 8-bit digits size, in bits
    half = {g: list(range(space.group_size(g) // 2)) for g in space.prunable_groups}
    plan = space.plan(kept=half, layer_bits={n: 4 for n in space.layers}, site_bits=8)
    assert plan.cost_before["size"] == before
    assert plan.cost_after["size"] == space.cost_of_plan(plan, "size") < before / 2
    for g in space.prunable_groups:
        assert plan.groups[g].kept == tuple(half[g])
    for name, layer in plan.layers.items():
        assert set(layer.bits) <= {0, 4} and len(layer.scales) == len(layer.bits)
    assert {a.bits for a in plan.activations.values()} == {8}
    minimal = space.minimal_plan()
    assert space.cost_of_plan(minimal, "size") < plan.cost_after["size"]
    assert all(len(minimal.groups[g].kept) == 1 for g in space.prunable_groups)


def test_decisions_are_validated(digits) -> None:
    space = SearchSpace(digits.analysis, Precisions.parse("0,4,8", "8"))
    group = space.prunable_groups[0]
    with pytest.raises(PlanError, match="at least one channel"):
        space.plan(kept={group: []})
    with pytest.raises(PlanError, match="does not have"):
        space.plan(kept={"nope": [0]})
    with pytest.raises(PlanError, match="not an allowed weight width"):
        space.plan(layer_bits={next(iter(space.layers)): 2})
    with pytest.raises(PlanError, match="not an allowed activation width"):
        space.plan(site_bits=4)
    blocked = [u.group_id for u in space.map.units.values() if u.group_id and u.group_id not in space.prunable_groups]
    assert blocked  # the logits group feeds the graph output
    with pytest.raises(PlanError, match="cannot be pruned"):
        space.plan(kept={blocked[0]: [0]})
    no_prune = SearchSpace(digits.analysis, Precisions.parse("4,8", "8"))
    assert no_prune.prunable_groups == []


def test_weight_scales_match_the_export_formula() -> None:
    w = np.array([[1.0, -3.0], [0.0, 0.0], [0.5, 0.25]], np.float32)
    assert weight_scales(w, [8, 4, 2], axis=0) == pytest.approx((3 / 127, 1.0, 0.5 / 1))
    assert weight_scales(w.T, [8, 0, 2], axis=1) == pytest.approx((3 / 127, 1.0, 0.5))


def test_importance_keeps_the_strongest_channels(digits) -> None:
    space = SearchSpace(digits.analysis)
    scores = channel_importance(space)
    group = space.prunable_groups[0]
    kept = keep_indices(scores[group], 0.25)
    assert len(kept) == round(0.25 * space.group_size(group))
    assert min(scores[group][kept]) >= max(np.delete(scores[group], kept))
    assert keep_indices(np.array([1.0, 1.0, 0.0]), 0.5) == [0, 1] and keep_indices(np.zeros(4), 0.0) == [0]
