"""Fine-grained (unstructured) sparsity: the plan field, the engine's mask, the export's exact
zeros, apply_plan, and the rl agent choosing it (issue 13)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cost_models.spec import zeroed_per_channel
from graph_passes.digest import model_digest
from graph_passes.errors import PlanError
from graph_passes.prepare import prepare_model
from plugin import api
from plugin.engine.fakequant import FakeQuantModel
from plugin.export import sparsify_weight
from plugin.plan import CompressionPlan, LayerPlan
from plugin.space import Precisions, SearchSpace

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "samples" / "digits" / "model.onnx")
TEST = np.load(REPO / "samples" / "digits" / "test.npz")
DATA = {"input": TEST["input"][:64]}
LABELS = TEST["labels"][:64]


@pytest.fixture(scope="module")
def prepared():
    return prepare_model(DIGITS)


@pytest.fixture(scope="module")
def space(prepared) -> SearchSpace:
    return SearchSpace(prepared.analysis, Precisions(), model_sha256=model_digest(prepared.original))


def _sparse_plan(space: SearchSpace) -> CompressionPlan:
    """A group cut to 8 channels (its consumer loses input channels), mixed widths, every layer
    at a different sparsity (the first dense)."""
    names = list(space.layers)
    group = space.prunable_groups[0]
    sparsity = {name: 0.2 + 0.1 * i for i, name in enumerate(names[1:])}
    return space.plan(kept={group: list(range(0, 16, 2))}, layer_bits={n: (8 if i % 2 else 4) for i, n in enumerate(names)},
                      site_bits=8, sparsity=sparsity)


def _kept_inputs(space: SearchSpace, plan: CompressionPlan, name: str) -> np.ndarray | None:
    units = space.layers[name].input_units
    kept = {g: set(p.kept) for g, p in plan.groups.items()}
    if units is None:
        return None
    return np.array([u is None or u[0] not in kept or u[1] in kept[u[0]] for u in units])


# ----------------------------------------------------------------------------- the plan


def test_plan_round_trip_and_dense_bytes_unchanged(space: SearchSpace) -> None:
    plan = _sparse_plan(space)
    text = plan.to_json()
    again = CompressionPlan.from_json(text)
    assert again.to_json() == text
    data = json.loads(text)
    first, *rest = list(space.layers)
    assert "sparsity" not in data["layers"][first]  # a dense layer's entry is as before
    assert [data["layers"][n]["sparsity"] for n in rest] == pytest.approx([0.2 + 0.1 * i for i in range(len(rest))])
    assert {n: lp.sparsity for n, lp in again.layers.items()} == {n: lp.sparsity for n, lp in plan.layers.items()}
    assert "sparsity" not in space.plan().to_json()


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.5"])
def test_bad_sparsity_is_refused(bad) -> None:
    with pytest.raises(PlanError, match="sparsity"):
        LayerPlan((8, 8), None, bad)


def test_plan_file_with_bad_sparsity_names_the_layer(space: SearchSpace) -> None:
    data = json.loads(_sparse_plan(space).to_json())
    name = list(space.layers)[1]
    data["layers"][name]["sparsity"] = 1.5
    with pytest.raises(PlanError, match=rf"layers\['{name}'\]\.sparsity"):
        CompressionPlan.from_json(json.dumps(data))
    with pytest.raises(PlanError, match="sparsity names layer 'nope'"):
        space.plan(sparsity={"nope": 0.5})


def test_costs_count_the_zeros(space: SearchSpace) -> None:
    names = list(space.layers)
    dense = space.plan(layer_bits={n: 8 for n in names})
    sparse = space.plan(layer_bits={n: 8 for n in names}, sparsity={n: 0.5 for n in names})
    for model in ("bops", "mpic", "mpic_energy", "ne16"):  # no zero skipping
        assert sparse.cost_after[model] == pytest.approx(dense.cost_after[model])
    assert sparse.cost_after["size"] < dense.cost_after["size"]  # the bitmap encoding pays at 8 bits
    assert sparse.cost_after["horowitz_energy"] < 0.6 * dense.cost_after["horowitz_energy"]
    # the size model's sparse encoding, by hand for the whole model: bitmap + nonzero values
    expected = 0.0
    for name in names:
        spec = space.layers[name].spec
        n = spec.fan_in * spec.kernel_area
        nnz = n - math.floor(0.5 * n)
        expected += min(spec.c_out * n * 8, spec.c_out * (n + nnz * 8))
    assert sparse.cost_after["size"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- engine and export


def test_engine_mask_export_and_apply_plan_agree(space: SearchSpace, prepared, tmp_path: Path) -> None:
    plan = _sparse_plan(space)
    engine = FakeQuantModel.build(prepared.model, space=space)
    engine.freeze(plan)
    frozen = engine.frozen_plan()
    assert {n: lp.sparsity for n, lp in frozen.layers.items()} == {n: lp.sparsity for n, lp in plan.layers.items()}
    bridge = engine.materialised_bridge()
    params = dict(bridge.module.named_parameters())
    for name, lp in plan.layers.items():
        if not lp.sparsity:
            continue
        entry = engine._layers[name]
        w = params[f"{entry.owner}.{entry.weight_attr}"].detach().numpy()
        keep_in = _kept_inputs(space, plan, name)
        raw = engine._raw(entry, entry.weight_attr).detach().numpy()
        for c in lp.kept:
            row, raw_row = w[c], raw[c]
            if keep_in is not None:
                row, raw_row = row[keep_in], raw_row[keep_in]
            k = zeroed_per_channel(lp.sparsity, row.size)
            assert k > 0 and int((row == 0).sum()) >= k
            # the zeros are the k smallest |w| of the raw weights at kept inputs (stable order)
            order = np.argsort(np.abs(raw_row).ravel(), kind="stable")[:k]
            assert np.all(row.ravel()[order] == 0)
    # the export of raw weights zeroes the same positions the engine does (8-bit, nothing pruned)
    names = list(space.layers)
    plain = space.plan(layer_bits={n: 8 for n in names}, sparsity={names[2]: 0.5})
    engine.freeze(plain)
    entry = engine._layers[names[2]]
    raw = engine._raw(entry, entry.weight_attr).detach()
    assert np.array_equal(entry.sparsity_mask.mask(raw).numpy() == 0,
                          sparsify_weight(raw.numpy(), 0.5, 0) == 0)

    # apply_plan: exact integer zeros, the gate passes (else it raises), onnxruntime runs it unchanged
    path = tmp_path / "p.plan.json"
    plan.save(path)
    out = tmp_path / "a.onnx"
    result = api.apply_plan(DIGITS, path, output=str(out), data=DATA, labels=LABELS, progress=False)
    expected_zeros = 0
    for name, lp in plan.layers.items():
        keep_in = _kept_inputs(space, plan, name)
        spec = space.layers[name].spec
        n = (int(keep_in.sum()) if keep_in is not None else spec.c_in) * spec.kernel_area
        expected_zeros += len(lp.kept) * zeroed_per_channel(lp.sparsity, n)
    assert result.report["file"]["zero_weight_integers"] >= expected_zeros > 0
    assert CompressionPlan.load(tmp_path / "a.plan.json").layers[names[2]].sparsity == plan.layers[names[2]].sparsity
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": DATA["input"][:1]})[0]
    assert np.isfinite(logits).all()
    # the integer weights of one sparse 8-bit layer: per kept channel, its zeros at least
    model = onnx.load(out)
    ints = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("features.1.0.weight")
            and t.data_type not in (onnx.TensorProto.FLOAT,)]
    w = next(a for a in ints if a.ndim == 4)
    k = zeroed_per_channel(plan.layers[names[1]].sparsity, w.shape[1] * 9)
    assert all(int((w[c] == 0).sum()) >= k for c in range(w.shape[0]))
    # reproducible: applying the saved plan again writes the same model
    again = api.apply_plan(DIGITS, tmp_path / "a.plan.json", data=DATA, labels=LABELS, progress=False)
    assert again.model.SerializeToString() == result.model.SerializeToString()


def test_sparsity_needs_a_known_layout(space: SearchSpace) -> None:
    assert all(space.supports_sparsity(n) for n in space.layers)  # digits: plain convs and a Gemm


def test_rl_fine_grained_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    config = api.CompressConfig(strategy="rl", strategy_options={
        "episodes": 4, "hidden": 16, "granularity": "fine", "max_sparsity": 0.5, "accuracy_loss": 100.0},
        epochs=1, finetune_epochs=0, max_steps_per_epoch=1, progress=False)
    result = api.compress(DIGITS, DATA, labels=LABELS, output=str(out), config=config)
    plan = CompressionPlan.load(tmp_path / "r.plan.json")
    assert all(not p.pruned for p in plan.groups.values())  # fine only: no channel removed
    assert any(lp.sparsity > 0 for lp in plan.layers.values())
    assert all(lp.sparsity <= 0.5 for lp in plan.layers.values())
    episodes = [h for h in result.report["history"] if h["kind"] == "episode"]
    assert all(h["sparsity"] for h in episodes)
    report = result.report
    assert report["cost_after"]["horowitz_energy"] < report["cost_before_8bit"]["horowitz_energy"]
    assert report["file"]["zero_weight_integers"] > 0
