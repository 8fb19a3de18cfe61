"""Issue 10: plans fuzzed against the digits model (hypothesis, 20 examples).

Random valid plans (random kept channels per prunable group, random weight widths per layer or
per channel, activation widths and clips in the sane range) are applied with
:func:`plugin.api.apply_plan`, which passes every exported model through the one gate before it
returns: every accepted plan must give a model that passes it. Random invalid plans (one field of
a valid plan set to a hostile value) must be refused by :meth:`CompressionPlan.from_json` with a
PlanError that names the field.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from graph_passes.errors import PlanError
from plugin.plan import CompressionPlan

from .hostile_helpers import DIGITS

pytestmark = pytest.mark.slow

_STATE: dict = {}


def _space():
    if "space" not in _STATE:
        from graph_passes.digest import model_digest
        from graph_passes.prepare import prepare_model
        from plugin.space import Precisions, SearchSpace

        prepared = prepare_model(str(DIGITS / "model.onnx"))
        _STATE["space"] = SearchSpace(prepared.analysis, Precisions.parse("0,2,4,8", "4,8"),
                                      model_sha256=model_digest(prepared.original))
        with np.load(DIGITS / "test.npz") as z:
            _STATE["data"] = {"input": z["input"][:64]}
    return _STATE["space"]


@st.composite
def valid_plans(draw) -> CompressionPlan:
    space = _space()
    kept = {}
    for group in space.prunable_groups:
        size = space.group_size(group)
        chosen = draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size))
        kept[group] = sorted(chosen)
    layer_bits = {}
    for name, info in space.layers.items():
        if draw(st.booleans()):
            layer_bits[name] = draw(st.sampled_from([2, 4, 8]))
        else:
            layer_bits[name] = draw(st.lists(st.sampled_from([2, 4, 8]), min_size=len(info.columns),
                                             max_size=len(info.columns)))
    site_bits = {t: draw(st.sampled_from([4, 8])) for t in space.sites}
    clips = {t: draw(st.floats(0.5, 20.0)) for t in space.sites}
    return space.plan(kept=kept, layer_bits=layer_bits, site_bits=site_bits, clips=clips)


#: (path into the plan JSON, hostile value, what the message must name)
HOSTILE = [
    (("activations", "*", "clip"), 1e308, "clip"), (("activations", "*", "clip"), 1e-300, "clip"),
    (("activations", "*", "clip"), -2.0, "clip"), (("activations", "*", "bits"), 3, "bits"),
    (("activations", "*", "signed"), 1, "signed"), (("layers", "*", "scales", 0), 1e30, "scales"),
    (("layers", "*", "scales", 0), 1e-300, "scales"), (("layers", "*", "bits", 0), 5, "bits"),
    (("layers", "*", "bits"), [], "bits"), (("groups", "*", "kept"), [10**6], "kept"),
    (("groups", "*", "size"), -1, "size"), (("model_sha256",), "00", "model_sha256"),
    (("costs", "after"), [], "costs"), (("metadata",), 3, "metadata"), (("version",), "1", "version"),
]


@st.composite
def invalid_plans(draw) -> tuple[str, str]:
    plan = json.loads(draw(valid_plans()).to_json())
    path, value, field = draw(st.sampled_from(HOSTILE))
    node = plan
    for key in path[:-1]:
        node = node[sorted(node)[draw(st.integers(0, len(node) - 1))]] if key == "*" else node[key]
    last = path[-1]
    if isinstance(last, int):  # an entry of a per-channel list, anywhere in it
        assert isinstance(node, list) and node, node
        node[draw(st.integers(0, len(node) - 1))] = value
    else:
        node[last] = value
    return json.dumps(plan), field


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=valid_plans())
def test_every_accepted_plan_passes_the_gate(plan: CompressionPlan) -> None:
    from plugin import api

    again = CompressionPlan.from_json(plan.to_json())  # what a plan file gives back
    result = api.apply_plan(str(DIGITS / "model.onnx"), again, data=_STATE["data"], progress=False)
    assert result.report["gate"], "apply_plan returned without the gate's figures"
    pruned = {g: p.size - len(p.kept) for g, p in again.groups.items() if p.size > len(p.kept)}
    assert result.report["groups_pruned"] == pruned


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=invalid_plans())
def test_every_refused_plan_names_the_field(case: tuple[str, str]) -> None:
    text, field = case
    with pytest.raises(PlanError) as info:
        CompressionPlan.from_json(text, source="fuzzed.plan.json")
    message = str(info.value)
    assert field in message, message
    assert "\n" not in message and message.startswith("fuzzed.plan.json: ")
