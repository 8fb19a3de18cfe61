"""Tests for plugin.plan: JSON round trip, byte stability, atomic save, every validation error."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graph_passes.errors import InputFileError, OutputError, PlanError
from plugin.plan import (
    PLAN_FORMAT,
    PLAN_VERSION,
    ActivationPlan,
    CompressionPlan,
    GroupPlan,
    LayerPlan,
    sha256_hex,
)

MODEL_BYTES = b"not really an onnx model, but bytes all the same"
MODEL_SHA = hashlib.sha256(MODEL_BYTES).hexdigest()


def _plan() -> CompressionPlan:
    return CompressionPlan(
        model_sha256=MODEL_SHA,
        groups={"g_conv1": GroupPlan(size=4, kept=(0, 2, 3)), "g_fc": GroupPlan(size=2, kept=(0, 1))},
        layers={
            "/conv1/Conv": LayerPlan(bits=(8, 0, 4, 2), scales=(0.01, 1.0, 0.125, 0.3)),
            "/fc/Gemm": LayerPlan(bits=(8, 8)),
        },
        activations={
            "input": ActivationPlan(bits=8, signed=True, clip=2.5),
            "/relu/Relu_output_0": ActivationPlan(bits=4, signed=False, clip=6.0),
        },
        cost_before={"size": 1024.0, "mpic": 5e4},
        cost_after={"size": 300.5, "mpic": 2.1e4},
        metadata={"strategy": "gradient", "seed": 0, "lambda": 3e-6, "note": "ünïcode"},
    )


# ----------------------------------------------------------------------------- round trip


def test_json_round_trip_and_byte_stability() -> None:
    plan = _plan()
    text = plan.to_json()
    again = CompressionPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    data = json.loads(text)
    assert list(data)[:2] == ["format", "version"]
    assert data["format"] == PLAN_FORMAT and data["version"] == PLAN_VERSION == 1
    assert data["layers"]["/conv1/Conv"] == {"bits": [8, 0, 4, 2], "scales": [0.01, 1.0, 0.125, 0.3]}
    assert data["costs"] == {"before": {"mpic": 50000.0, "size": 1024.0}, "after": {"mpic": 21000.0, "size": 300.5}}
    assert text.endswith("}\n") and '"bits": [8, 0, 4, 2]' in text  # scalar lists on one line


def test_json_is_independent_of_insertion_order() -> None:
    plan = _plan()
    reordered = CompressionPlan(
        model_sha256=plan.model_sha256.upper(),
        groups=dict(reversed(plan.groups.items())),
        layers=dict(reversed(plan.layers.items())),
        activations=dict(reversed(plan.activations.items())),
        cost_before=dict(reversed(plan.cost_before.items())),
        cost_after=plan.cost_after,
        metadata=dict(reversed(plan.metadata.items())),
    )
    assert reordered.to_json() == plan.to_json()


def test_lists_are_stored_as_tuples_and_numbers_normalised() -> None:
    layer = LayerPlan(bits=[4, 0], scales=[1, 0.5])
    assert layer.bits == (4, 0) and layer.scales == (1.0, 0.5) and layer.kept == (0,)
    assert GroupPlan(size=3, kept=[1]).pruned == (0, 2)
    assert ActivationPlan(bits=2, signed=False, clip=3).clip == 3.0


def test_save_and_load(tmp_path: Path) -> None:
    plan = _plan()
    target = tmp_path / "plan.json"
    target.write_text("old content")
    assert plan.save(target) == target
    assert target.read_text(encoding="utf-8") == plan.to_json()
    assert CompressionPlan.load(target) == plan
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # no temporary file left behind


def test_save_into_missing_folder_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write plan"):
        _plan().save(tmp_path / "missing" / "plan.json")


def test_load_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="cannot read plan"):
        CompressionPlan.load(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- model hash


def test_check_model_hash() -> None:
    plan = _plan()
    plan.check_model_hash(MODEL_BYTES)
    plan.check_model_hash(bytearray(MODEL_BYTES))
    plan.check_model_hash(MODEL_SHA)
    plan.check_model_hash(MODEL_SHA.upper())
    assert sha256_hex(MODEL_BYTES) == MODEL_SHA
    with pytest.raises(PlanError, match="made for the model with sha256"):
        plan.check_model_hash(b"another model")
    with pytest.raises(PlanError, match="made for the model with sha256"):
        plan.check_model_hash("0" * 64)
    with pytest.raises(PlanError, match="sha256 hex digest"):
        plan.check_model_hash("model.onnx")


# ----------------------------------------------------------------------------- validation


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: tuple) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


CONV, RELU = "/conv1/Conv", "/relu/Relu_output_0"

INVALID = [
    (_set(("version",), 2), "unsupported plan version 2"),
    (_set(("version",), "1"), "unsupported plan version '1'"),
    (_set(("version",), True), "unsupported plan version True"),
    (_set(("format",), "something.else"), "not a prunequant plan"),
    (_delete(("format",)), "not a prunequant plan"),
    (_delete(("groups",)), "plan is missing field 'groups'"),
    (_delete(("layers",)), "plan is missing field 'layers'"),
    (_delete(("activations",)), "plan is missing field 'activations'"),
    (_delete(("costs",)), "plan is missing field 'costs'"),
    (_delete(("metadata",)), "plan is missing field 'metadata'"),
    (_delete(("model_sha256",)), "plan is missing field 'model_sha256'"),
    (_set(("extra",), 1), "plan has unknown field 'extra'"),
    (_set(("model_sha256",), "abc"), "model_sha256 must be 64 hexadecimal digits"),
    (_set(("groups",), []), "groups must be a JSON object"),
    (_set(("groups", "g_fc"), [0, 1]), "groups['g_fc'] must be a JSON object"),
    (_delete(("groups", "g_fc", "size")), "groups['g_fc'] is missing field 'size'"),
    (_delete(("groups", "g_fc", "kept")), "groups['g_fc'] is missing field 'kept'"),
    (_set(("groups", "g_fc", "size"), 0), "groups['g_fc'].size must be an integer >= 1"),
    (_set(("groups", "g_fc", "size"), 2.0), "groups['g_fc'].size must be an integer >= 1"),
    (_set(("groups", "g_fc", "kept"), [0, -1]), "groups['g_fc'].kept[1] = -1 is negative"),
    (_set(("groups", "g_fc", "kept"), [0, 2]), "groups['g_fc'].kept[1] = 2 is outside [0, 2)"),
    (_set(("groups", "g_fc", "kept"), [1, 0]), "groups['g_fc'].kept must be strictly increasing"),
    (_set(("groups", "g_fc", "kept"), [1, 1]), "groups['g_fc'].kept must be strictly increasing"),
    (_set(("groups", "g_fc", "kept"), [0.0]), "groups['g_fc'].kept[0] must be an integer"),
    (_set(("groups", "g_fc", "kept"), "01"), "groups['g_fc'].kept must be a list of integers"),
    (_set(("groups", ""), {"size": 1, "kept": [0]}), "groups has an empty or non-string key"),
    (_delete(("layers", CONV, "scales")), f"layers['{CONV}'] is missing field 'scales'"),
    (_set(("layers", CONV, "bias"), [0.0]), f"layers['{CONV}'] has unknown field 'bias'"),
    (_set(("layers", CONV, "bits"), [8, 0, 3, 2]), f"layers['{CONV}'].bits[2] = 3 is not one of [0, 2, 4, 8]"),
    (_set(("layers", CONV, "bits"), [8, 0, 4, True]), f"layers['{CONV}'].bits[3] must be an integer"),
    (_set(("layers", CONV, "bits"), [8, 0, -4, 2]), f"layers['{CONV}'].bits[2] = -4 is not one of"),
    (_set(("layers", CONV, "bits"), []), f"layers['{CONV}'].bits is empty"),
    (_set(("layers", CONV, "bits"), [8, 0, 4]), f"layers['{CONV}'].scales has 4 entries but bits has 3"),
    (_set(("layers", CONV, "scales"), [0.1, 0.0, 0.1, 0.1]), f"layers['{CONV}'].scales[1] must be a finite number > 0"),
    (_set(("layers", CONV, "scales"), [0.1, -1, 0.1, 0.1]), f"layers['{CONV}'].scales[1] must be a finite number > 0"),
    (_set(("layers", CONV, "scales"), [0.1, "1", 0.1, 0.1]), f"layers['{CONV}'].scales[1] must be a finite number > 0"),
    (_set(("layers", CONV, "scales"), 0.1), f"layers['{CONV}'].scales must be a list of numbers or null"),
    (_set(("activations", RELU, "bits"), 0), f"activations['{RELU}'].bits = 0 is not one of [2, 4, 8]"),
    (_set(("activations", RELU, "bits"), 16), f"activations['{RELU}'].bits = 16 is not one of [2, 4, 8]"),
    (_set(("activations", RELU, "signed"), 0), f"activations['{RELU}'].signed must be true or false"),
    (_set(("activations", RELU, "clip"), 0), f"activations['{RELU}'].clip must be a finite number > 0"),
    (_set(("activations", RELU, "clip"), None), f"activations['{RELU}'].clip must be a finite number > 0"),
    (_delete(("activations", RELU, "clip")), f"activations['{RELU}'] is missing field 'clip'"),
    (_delete(("costs", "after")), "costs is missing field 'after'"),
    (_set(("costs", "during"), {}), "costs has unknown field 'during'"),
    (_set(("costs", "before"), [1.0]), "costs.before must be a JSON object"),
    (_set(("costs", "after", "size"), -1.0), "costs.after['size'] must be a finite number >= 0"),
    (_set(("costs", "after", "size"), "12"), "costs.after['size'] must be a finite number >= 0"),
    (_delete(("costs", "after", "mpic")), "cost model 'mpic' appears in only one of costs.before and costs.after"),
    (_set(("metadata",), "gradient"), "metadata must be a JSON object"),
]


@pytest.mark.parametrize(("mutate", "message"), INVALID)
def test_validation_errors(mutate: Callable[[dict], None], message: str) -> None:
    data = copy.deepcopy(_plan().to_dict())
    mutate(data)
    with pytest.raises(PlanError) as info:
        CompressionPlan.from_json(json.dumps(data), source="plan.json")
    text = str(info.value)
    assert text.startswith("plan.json: ")
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "plan must be a JSON object"),
        ('{"format": "prunequant.plan", "version": 1, "version": 1}', "key 'version' appears twice"),
        ('{"format": "prunequant.plan", "version": 1, "x": NaN}', "NaN is not allowed"),
        ('{"format": "prunequant.plan", "version": 1, "x": Infinity}', "Infinity is not allowed"),
    ],
)
def test_malformed_json(text: str | bytes, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        CompressionPlan.from_json(text, source="plan.json")


def test_load_reports_the_file_name(tmp_path: Path) -> None:
    target = tmp_path / "bad.json"
    target.write_text('{"format": "prunequant.plan", "version": 7}')
    with pytest.raises(PlanError, match=r"bad\.json: unsupported plan version 7"):
        CompressionPlan.load(target)


def test_python_construction_is_validated() -> None:
    with pytest.raises(PlanError, match="bits"):
        LayerPlan(bits=(8, 5))
    with pytest.raises(PlanError, match="must be a GroupPlan"):
        CompressionPlan(model_sha256=MODEL_SHA, groups={"g": {"size": 1, "kept": [0]}})
    with pytest.raises(PlanError, match="metadata\\['seed'\\] holds a tuple"):
        CompressionPlan(model_sha256=MODEL_SHA, metadata={"seed": (1, 2)})
    with pytest.raises(PlanError, match="not a finite number"):
        CompressionPlan(model_sha256=MODEL_SHA, metadata={"lambda": float("nan")})


def test_empty_plan_round_trips() -> None:
    plan = CompressionPlan(model_sha256=MODEL_SHA)
    assert CompressionPlan.from_json(plan.to_json()) == plan
