"""Fail fast (graph_passes.dry_run): the export path is exercised in seconds right after analysis;
an export that cannot work is refused with one line naming the step, the cause and a remedy."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

import graph_passes.dry_run as dry_run_module
from graph_passes.dry_run import dry_run_export
from graph_passes.errors import UnsupportedModelError
from graph_passes.qdq import insert_qdq

try:
    from graph_passes.prepare import prepare_model
except ImportError:  # older layout
    from plugin.inspect_cmd import prepare_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def digits():
    return prepare_model(str(SAMPLES / "digits" / "model.onnx"))


@pytest.fixture(scope="module")
def mnist1d():
    return prepare_model(str(SAMPLES / "mnist1d" / "model.onnx"))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_digits_passes_in_seconds(digits):
    start = time.perf_counter()
    report = dry_run_export(digits.model, digits.analysis)
    assert time.perf_counter() - start < 10
    assert [s.name for s in report.steps] == ["prune", "W8A8", "W4A4", "W2A2", "mixed W8/W2 A2"]
    assert report.pruned_groups > 0 and report.layers == len(digits.analysis.layers)
    assert report.sites == len(digits.analysis.sites) > 0
    json.dumps(dataclasses.asdict(report))


def test_mnist1d_every_pair_and_restricted_widths(mnist1d):
    report = dry_run_export(mnist1d.model, mnist1d.analysis, all_pairs=True)
    assert len([s for s in report.steps if s.name.startswith("W")]) == 9
    # the search's "0" (pruned) is no export width; (4, 8) x (8,): two steps, no 2-bit anywhere
    report = dry_run_export(mnist1d.model, mnist1d.analysis, (0, 4, 8), (8,), prunes=False)
    assert [s.name for s in report.steps] == ["W8A8", "W4A8", "mixed W8/W4 A8"]
    assert report.pruned_groups == 0


def test_single_width_has_no_mixed_step(mnist1d):
    report = dry_run_export(mnist1d.model, mnist1d.analysis, (8,), (8,))
    assert [s.name for s in report.steps] == ["prune", "W8A8"]


def test_bad_width_is_a_programming_error(mnist1d):
    with pytest.raises(ValueError):
        dry_run_export(mnist1d.model, mnist1d.analysis, (3, 8))


def _shapeless_outputs(real):
    """Mimic the real-world failure of issue 9: the written graph output has a type, no shape."""
    def broken(model, weights, activations):
        result = real(model, weights, activations)
        for out in result.model.graph.output:
            out.type.tensor_type.ClearField("shape")
        return result
    return broken


def test_export_that_fails_the_checker_is_refused_fast(digits, monkeypatch):
    monkeypatch.setattr(dry_run_module, "insert_qdq", _shapeless_outputs(insert_qdq))
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as info:
        dry_run_export(digits.model, digits.analysis)
    assert time.perf_counter() - start < 10
    text = _one_line(info.value)
    assert info.value.exit_code == 5
    assert "step 'W8A8'" in text and "before any training" in text
    assert "fails the onnx checker: Field 'shape' of 'type' is required but missing" in text
    assert text.endswith("report it")


def _failing_when(real, predicate, message):
    def maybe_broken(model, weights, activations):
        if predicate(weights, activations):
            raise RuntimeError(f"{message}\nsecond line of a long traceback")
        return real(model, weights, activations)
    return maybe_broken


def test_two_bit_weights_failure_names_the_flag(digits, monkeypatch):
    monkeypatch.setattr(dry_run_module, "insert_qdq", _failing_when(
        insert_qdq, lambda w, a: any(2 in q.bits for q in w.values()), "no INT2 kernel"))
    with pytest.raises(UnsupportedModelError) as info:
        dry_run_export(digits.model, digits.analysis)
    text = _one_line(info.value)
    assert "step 'W2A2'" in text and "writing the QDQ model fails: no INT2 kernel;" in text
    assert "2-bit weights fail on this model: --weight-bits 0,4,8 avoids them" in text
    assert "second line" not in text


def test_two_bit_activations_failure_names_the_flag(digits, monkeypatch):
    monkeypatch.setattr(dry_run_module, "insert_qdq", _failing_when(
        insert_qdq, lambda w, a: any(q.bits == 2 for q in a.values()), "no UINT2 MaxPool"))
    with pytest.raises(UnsupportedModelError) as info:
        dry_run_export(digits.model, digits.analysis, prunes=False)
    text = _one_line(info.value)
    assert "step 'W2A2'" in text
    assert "2-bit activations fail on this model: --act-bits 4,8 avoids them" in text


def test_mixed_layers_failure(digits, monkeypatch):
    monkeypatch.setattr(dry_run_module, "insert_qdq", _failing_when(
        insert_qdq, lambda w, a: any(len(set(q.bits)) > 1 for q in w.values()), "Gather broke"))
    with pytest.raises(UnsupportedModelError) as info:
        dry_run_export(digits.model, digits.analysis)
    text = _one_line(info.value)
    assert "step 'mixed W8/W2 A2'" in text and "Gather broke" in text
    assert "--weight-bits 0,8" in text


def test_pruning_failure(digits, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot slice this Concat")
    monkeypatch.setattr(dry_run_module, "prune_channels", refuse)
    with pytest.raises(UnsupportedModelError) as info:
        dry_run_export(digits.model, digits.analysis)
    text = _one_line(info.value)
    assert "step 'prune'" in text and "cannot slice this Concat" in text
    assert "--weight-bits without 0" in text
    dry_run_export(digits.model, digits.analysis, prunes=False)  # without pruning it passes
