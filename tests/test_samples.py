"""The shipped sample models in samples/ are valid, runnable and match their meta.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"

# name -> per-sample input shape (without the batch axis)
SAMPLES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist1d": (1, 40),
}
NUM_CLASSES = 10
MAX_DATA_FILE_BYTES = 2 * 1024 * 1024


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _meta(name: str) -> dict:
    return json.loads((SAMPLES_DIR / name / "meta.json").read_text())


@pytest.fixture(params=sorted(SAMPLES), scope="module")
def sample(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_files_present_and_small(sample: str) -> None:
    d = SAMPLES_DIR / sample
    for fname in ("train_and_export.py", "model.onnx", "calib.npz", "train.npz", "test.npz", "meta.json"):
        assert (d / fname).is_file(), f"missing {d / fname}"
    for fname in ("calib.npz", "train.npz", "test.npz"):
        assert (d / fname).stat().st_size < MAX_DATA_FILE_BYTES, fname


def test_model_checks_and_interface(sample: str) -> None:
    path = SAMPLES_DIR / sample / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17

    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch"
    assert tuple(d.dim_value for d in in_dims[1:]) == SAMPLES[sample]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == NUM_CLASSES

    ops = {n.op_type for n in model.graph.node}
    # FP32, un-normalised graph: BatchNorm is left for prunequant to fold.
    assert "BatchNormalization" in ops
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


def test_runs_on_calib(sample: str) -> None:
    d = SAMPLES_DIR / sample
    with np.load(d / "calib.npz") as z:
        assert list(z.keys()) == ["input"]
        x = z["input"]
    assert x.dtype == np.float32
    assert x.shape[1:] == SAMPLES[sample]
    assert 100 <= x.shape[0] <= 2000
    sess = _session(d / "model.onnx")
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # dynamic batch: a single sample gives the same logits as inside the batch
    (one,) = sess.run(["logits"], {"input": x[:1]})
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)


def test_train_split_files(sample: str) -> None:
    d = SAMPLES_DIR / sample
    with np.load(d / "train.npz") as z:
        assert set(z.keys()) == {"input", "labels"}
        x, y = z["input"], z["labels"]
    assert x.dtype == np.float32 and x.shape[1:] == SAMPLES[sample]
    assert y.shape == (x.shape[0],) and np.issubdtype(y.dtype, np.integer)
    assert set(np.unique(y).tolist()) == set(range(NUM_CLASSES))


def test_test_accuracy_matches_meta(sample: str) -> None:
    d = SAMPLES_DIR / sample
    meta = _meta(sample)
    with np.load(d / "test.npz") as z:
        assert set(z.keys()) == {"input", "labels"}
        x, y = z["input"], z["labels"]
    assert x.dtype == np.float32 and x.shape[1:] == SAMPLES[sample]
    assert y.shape == (x.shape[0],) and x.shape[0] == meta["n_test"]
    (logits,) = _session(d / "model.onnx").run(["logits"], {"input": x})
    acc = float((logits.argmax(axis=1) == y).mean())
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert acc >= 0.9


def test_meta_consistent(sample: str) -> None:
    d = SAMPLES_DIR / sample
    meta = _meta(sample)
    assert meta["model_size_bytes"] == (d / "model.onnx").stat().st_size
    sha = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()
    assert meta["model_sha256"] == sha, "model.onnx changed without regenerating meta.json"
    model = onnx.load(str(d / "model.onnx"))
    n_init = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    # initializers = trainable parameters + BatchNorm running mean/var
    n_bn_stats = sum(
        2 * int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.name.endswith("running_mean")
    )
    assert n_init == meta["n_params"] + n_bn_stats
    for key in ("seed", "versions", "opset"):
        assert key in meta


# --------------------------------------------------------------------------- transformer sample

TRANSFORMER = SAMPLES_DIR / "transformer"


def _transformer_heads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("transformer_heads", TRANSFORMER / "heads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.head_counts


def test_transformer_sample_loads_and_matches_meta() -> None:
    meta = _meta("transformer")
    for fname in ("model.onnx", "train.npz", "test.npz"):
        assert (TRANSFORMER / fname).stat().st_size < 300 * 1024, fname
    model = onnx.load(str(TRANSFORMER / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {"LayerNormalization", "Softmax", "Erf"} <= {n.op_type for n in model.graph.node}
    assert meta["model_sha256"] == hashlib.sha256((TRANSFORMER / "model.onnx").read_bytes()).hexdigest()
    with np.load(TRANSFORMER / "test.npz") as z:
        x, y = z["input"], z["labels"]
    assert x.shape[1:] == (8, 8) and x.shape[0] == meta["n_test"]
    sess = _session(TRANSFORMER / "model.onnx")
    (logits,) = sess.run(["logits"], {"input": x})
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(meta["test_accuracy"], abs=1e-6)
    (one,) = sess.run(["logits"], {"input": x[:1]})  # the batch axis is dynamic
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)
    assert [b["heads"] for b in _transformer_heads()(model)] == [4, 4]


def test_transformer_sample_heads_prunable() -> None:
    from graph_passes.prepare import prepare_model

    analysis = prepare_model(str(TRANSFORMER / "model.onnx")).analysis
    heads = [g for g in analysis.groups if g.prunable and g.size == 4]
    mlp = [g for g in analysis.groups if g.prunable and g.size == 64]
    assert len(heads) == 2 and len(mlp) == 2, [(g.id, g.size, g.prunable) for g in analysis.groups]
    for group in heads:  # one head = the Q, K and V rows of a block
        assert sorted(p.split("/")[-2] for p in group.producers) == ["k", "q", "v"], group.producers


@pytest.mark.slow
def test_transformer_sample_compress_prunes_heads(tmp_path: Path) -> None:
    """A short joint search to a size budget passes the gate and removes at least one head."""
    from plugin.api import CompressConfig, compress

    config = CompressConfig(target="size=30%", act_bits=(4, 8), epochs=6, finetune_epochs=2, seed=0,
                            progress=False)
    result = compress(str(TRANSFORMER / "model.onnx"), str(TRANSFORMER / "train.npz"),
                      output=str(tmp_path / "t.onnx"), config=config)
    assert (tmp_path / "t.onnx").is_file()  # written only after the gate passed
    blocks = _transformer_heads()(result.model)
    assert len(blocks) == 2 and all(b["heads"] is not None for b in blocks), blocks
    assert sum(4 - b["heads"] for b in blocks) >= 1, blocks
    with np.load(TRANSFORMER / "test.npz") as z:
        x, y = z["input"], z["labels"]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert float((sess.run(None, {"input": x})[0].argmax(1) == y).mean()) >= 0.85
