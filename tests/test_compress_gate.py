"""The one gate at the command level: a multi-output model and a regression model are compressed
and applied with their per-output fidelity reported; a deliberately broken export of each is
refused by `compress` and by `export --plan` (exit 7) with nothing written. Also: the API's
contracts (no process-wide side effects, the caller's config untouched, portable plans whose
scales are recomputed from the weights being exported)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graph_passes.errors import VerificationError
from plugin import api, export as export_module
from plugin.cli import main
from plugin.plan import CompressionPlan
from tests.graph_helpers import build, header
from tests.test_gate import break_output

# two heads on one trunk: class logits [N, 5] and a box regression [N, 3]
MULTI = header(17) + """
multi (float[N, 2, 8, 8] x) => (float[N, 5] logits, float[N, 3] box) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    logits = Gemm <transB = 1> (f, wl, bl)
    box = Gemm <transB = 1> (f, wb, bb)
}
"""
REGRESSION = header(17) + """
regress (float[N, 2, 8, 8] x) => (float[N, 3] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p = GlobalAveragePool (r1)
    f = Flatten (p)
    h = Gemm <transB = 1> (f, wh, bh)
    rh = Relu (h)
    y = Gemm <transB = 1> (rh, wy, by)
}
"""


def _multi() -> onnx.ModelProto:
    return build(MULTI, seed=1, w1=[8, 2, 3, 3], b1=[8], w2=[16, 8, 3, 3], b2=[16], wl=[5, 16], bl=[5],
                 wb=[3, 16], bb=[3])


def _regression() -> onnx.ModelProto:
    return build(REGRESSION, seed=2, w1=[8, 2, 3, 3], b1=[8], wh=[12, 8], bh=[12], wy=[3, 12], by=[3])


# the same with MatMul weights ([in, out] in ONNX, [out, in] in the bridged torch module)
MATMUL = header(17) + """
matmul (float[N, 2, 8, 8] x) => (float[N, 3] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p = GlobalAveragePool (r1)
    f = Flatten (p)
    h = MatMul (f, wh)
    hb = Add (h, bh)
    rh = Relu (hb)
    y = MatMul (rh, wy)
}
"""


def _matmul() -> onnx.ModelProto:
    return build(MATMUL, seed=3, w1=[8, 2, 3, 3], b1=[8], wh=[8, 6], bh=[6], wy=[6, 3])


MODELS = {"multi": (_multi, ["logits", "box"]), "regression": (_regression, ["y"]), "matmul": (_matmul, ["y"])}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-models")
    out = {}
    x = np.random.default_rng(0).standard_normal((48, 2, 8, 8)).astype(np.float32)
    np.save(root / "x.npy", x)
    out["data"] = root / "x.npy"
    for name, (make, _) in MODELS.items():
        path = root / f"{name}.onnx"
        onnx.save(make(), path)
        out[name] = path
    return out


def _config(**extra) -> api.CompressConfig:
    base = dict(lam=1.0, epochs=1, finetune_epochs=1, max_steps_per_epoch=2, batch_size=16, progress=False,
                weight_precisions=(0, 4, 8), act_bits=(8,))
    base.update(extra)
    return api.CompressConfig(**base)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compress_reports_every_output(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.pq.onnx"
    result = api.compress(str(files[name]), str(files["data"]), output=str(out), config=_config())
    outputs = MODELS[name][1]
    fidelity = result.report["quality"]["outputs_vs_original"]
    assert [f["name"] for f in fidelity] == outputs
    for figure in fidelity:
        assert figure["sqnr_db"] is not None and np.isfinite(figure["sqnr_db"]) and figure["sqnr_db"] > 0
        assert figure["rel_rmse"] == pytest.approx(10 ** (-figure["sqnr_db"] / 20), rel=1e-6)
    gate = result.report["gate"]
    assert [f["name"] for f in gate["plain"]] == outputs and gate["samples"] == result.report["quality"][
        "held_out_samples"]
    written = json.loads((tmp_path / f"{name}.pq.report.json").read_text())
    assert [f["name"] for f in written["quality"]["outputs_vs_original"]] == outputs


def _broken(output: str, how: str):
    real = export_module.export_plan

    def broken_export(*args, **kwargs):
        result = real(*args, **kwargs)
        result.model = break_output(result.model, output, how)
        return result

    return broken_export


@pytest.mark.parametrize("name,output,how", [("multi", "box", "scale"), ("multi", "logits", "nan"),
                                             ("regression", "y", "scale"), ("regression", "y", "shape")])
def test_compress_refuses_a_broken_export(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          name: str, output: str, how: str) -> None:
    monkeypatch.setattr(export_module, "export_plan", _broken(output, how))
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError) as refused:
        api.compress(str(files[name]), str(files["data"]), output=str(out), config=_config())
    assert output in str(refused.value) and "nothing was written" in str(refused.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,output", [("multi", "box"), ("regression", "y")])
def test_export_plan_refuses_a_broken_export(files: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, name: str, output: str) -> None:
    good = tmp_path / "good.onnx"
    api.compress(str(files[name]), str(files["data"]), output=str(good), config=_config())
    plan_path = tmp_path / "good.plan.json"
    runner = CliRunner()
    ok = runner.invoke(main, ["export", str(files[name]), "--plan", str(plan_path), "-o", str(tmp_path / "again.onnx"),
                              "--data", str(files["data"]), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "again.plan.json").exists() and (tmp_path / "again.report.json").exists()
    monkeypatch.setattr(export_module, "export_plan", _broken(output, "scale"))
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = runner.invoke(main, ["export", str(files[name]), "--plan", str(plan_path), "-o", str(tmp_path / "bad.onnx"),
                               "--data", str(files["data"]), "--no-progress"])
    assert bad.exit_code == 7, bad.output
    assert output in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_compress_has_no_side_effects(files: dict[str, Path]) -> None:
    import torch

    config = _config(threads=None)
    snapshot = copy.deepcopy(config)
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    rng_state = torch.random.get_rng_state()
    try:
        api.compress(str(files["regression"]), str(files["data"]), config=config)
        assert torch.get_num_threads() == 2  # compress ran on one thread (a small model) and restored it
    finally:
        torch.set_num_threads(1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the search seeds a forked generator
    assert config == snapshot


def test_apply_plan_recomputes_scales_from_the_exported_weights(files: dict[str, Path], tmp_path: Path) -> None:
    """A plan's scales belong to the weights it was fine-tuned with; applied to the original model
    they are recomputed from the original weights (max|W_c| / (2^(b-1) - 1)), on numbers."""
    result = api.compress(str(files["regression"]), str(files["data"]), output=str(tmp_path / "a.onnx"),
                          config=_config(finetune_epochs=2, max_steps_per_epoch=3))
    plan = result.plan
    from graph_passes.prepare import prepare_model

    prepared = prepare_model(str(files["regression"]))
    applied = api.apply_plan(str(files["regression"]), plan, data=str(files["data"]), progress=False)
    moved = 0
    for layer in prepared.analysis.layers:
        w = np.moveaxis(prepared.analysis.graph.constant(layer.weight), layer.weight_out_axis, 0)
        layer_plan = applied.plan.layers[layer.name]
        for c, (b, s) in enumerate(zip(layer_plan.bits, layer_plan.scales)):
            if b == 0:
                continue
            expected = np.abs(w[c]).max() / (2 ** (b - 1) - 1)
            assert s == pytest.approx(expected, rel=1e-6)
            moved += not np.isclose(plan.layers[layer.name].scales[c], expected, rtol=1e-6)
    assert moved > 0, "fine-tuning left every scale unchanged: the test proves nothing"


def test_plan_hash_is_of_the_input_model_not_its_serialisation(files: dict[str, Path], tmp_path: Path) -> None:
    """The plan of a model applies to the same model re-saved with inferred shapes and other
    producer metadata, and is refused for a model with one weight changed."""
    result = api.compress(str(files["regression"]), str(files["data"]), config=_config())
    model = onnx.load(files["regression"])
    inferred = onnx.shape_inference.infer_shapes(model)
    inferred.producer_name, inferred.doc_string = "someone-else", "re-saved"
    onnx.save(inferred, tmp_path / "resaved.onnx")
    api.apply_plan(str(tmp_path / "resaved.onnx"), result.plan, progress=False)
    changed = onnx.load(files["regression"])
    w = onnx.numpy_helper.to_array(changed.graph.initializer[0]).copy()
    w.flat[0] += 1.0
    changed.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, changed.graph.initializer[0].name))
    onnx.save(changed, tmp_path / "changed.onnx")
    from graph_passes.errors import PlanError

    with pytest.raises(PlanError, match="made for"):
        api.apply_plan(str(tmp_path / "changed.onnx"), result.plan, progress=False)
    meta = result.plan.metadata["versions"]
    assert set(meta) >= {"prunequant", "onnx"} and meta["onnx"] == onnx.__version__
    assert CompressionPlan.from_json(result.plan.to_json()).model_sha256 == result.plan.model_sha256


def test_export_refuses_a_clip_far_off_the_data(files: dict[str, Path], tmp_path: Path) -> None:
    """A clip inside the plan format's bounds but 1e5x the activations' range quantizes them all
    to zero: with data, export --plan refuses it naming the tensor; nothing is written."""
    result = api.compress(str(files["regression"]), str(files["data"]), config=_config())
    doc = json.loads(result.plan.to_json())
    tensor = next(iter(doc["activations"]))
    doc["activations"][tensor]["clip"] = 1e5
    bad_plan = tmp_path / "bad.plan.json"
    bad_plan.write_text(json.dumps(doc))
    from graph_passes.errors import PlanError

    with pytest.raises(PlanError, match="off the range the data shows"):
        api.apply_plan(str(files["regression"]), str(bad_plan), output=str(tmp_path / "o.onnx"),
                       data=str(files["data"]), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.plan.json"]
