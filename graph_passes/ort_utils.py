"""onnxruntime helpers: sessions from in-memory models, random feeds, output comparison."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

logger = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more; above this we go through external data.
_PROTO_LIMIT = 2**31 - 2**20

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def make_session(
    model: onnx.ModelProto, optimize: bool = False, intra_threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session for an in-memory model (graph optimisations off by default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if intra_threads:
        opts.intra_op_num_threads = intra_threads
    if fits_in_protobuf(model):
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    with tempfile.TemporaryDirectory(prefix="prunequant-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        work = onnx.ModelProto()  # save_model moves tensor data out: never do that to the caller's
        work.CopyFrom(model)
        onnx.save_model(
            work, path, save_as_external_data=True, location="model.data", size_threshold=1024
        )
        del work
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """False when the model is too large to serialise as one protobuf message (> 2 GiB)."""
    try:
        return model.ByteSize() < _PROTO_LIMIT
    except EncodeError:  # protobuf refuses to even measure messages over 2 GiB
        return False


def random_feeds(
    session: ort.InferenceSession, seed: int = 0, batch: int | None = None
) -> dict[str, np.ndarray]:
    """Random inputs matching the session's (fully static) input shapes and dtypes."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    ranges = _integer_ranges(session)
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        if batch is not None and shape:
            shape[0] = batch
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has unsupported type {inp.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:  # the range the graph allows (an embedding's rows: graph_passes.feeds), else 0..9
            low, high = ranges.get(inp.name, (0, 10))
            feeds[inp.name] = rng.integers(low, min(high, 10) if high > low else low + 1, shape).astype(dtype)
    return feeds


# Where graph_passes.feeds records the integer ranges a graph allows (model metadata).
RANGE_KEY = "prunequant.input_range"


def ranges_from_metadata(metadata: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    text = metadata.get(RANGE_KEY)
    if not text:
        return {}
    try:
        return {k: (int(v[0]), int(v[1])) for k, v in json.loads(text).items()}
    except (ValueError, TypeError, KeyError, IndexError):
        return {}


def _integer_ranges(session: ort.InferenceSession) -> dict[str, tuple[int, int]]:
    try:
        return ranges_from_metadata(session.get_modelmeta().custom_metadata_map)
    except Exception:  # noqa: BLE001 - metadata is a hint; a session without it draws 0..9
        return {}


def run(
    model_or_session: onnx.ModelProto | ort.InferenceSession, feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    sess = (
        model_or_session
        if isinstance(model_or_session, ort.InferenceSession)
        else make_session(model_or_session)
    )
    return sess.run(None, dict(feeds))


@dataclass
class Comparison:
    """Worst relative error over outputs: max|a-b| / max(max|b|, tiny), per output."""

    max_rel_error: float
    worst_output: int

    def ok(self, rtol: float) -> bool:
        return self.max_rel_error <= rtol


def compare_outputs(got: list[np.ndarray], ref: list[np.ndarray]) -> Comparison:
    """Compare output lists; the error of each output is scaled by that output's magnitude."""
    if len(got) != len(ref):
        raise ValueError(f"output count differs: {len(got)} vs {len(ref)}")
    worst, worst_i = 0.0, 0
    for i, (a, b) in enumerate(zip(got, ref)):
        a = np.asarray(a)
        b = np.asarray(b)
        if a.shape != b.shape:
            return Comparison(float("inf"), i)
        if a.size == 0:
            continue
        if not np.issubdtype(b.dtype, np.floating):
            err = 0.0 if np.array_equal(a, b) else float("inf")
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            scale = max(float(np.max(np.abs(b64))), 1e-12)
            err = float(np.max(np.abs(a64 - b64))) / scale
            if not np.isfinite(err):
                same_nan = np.array_equal(np.isnan(a64), np.isnan(b64))
                err = 0.0 if same_nan and np.allclose(a64, b64, equal_nan=True) else float("inf")
        if err > worst:
            worst, worst_i = err, i
    return Comparison(worst, worst_i)


def static_batch(session: ort.InferenceSession, samples: int) -> int | None:
    """The chunk size to run ``samples`` samples in: the inputs' common static leading dim when
    it is not ``samples`` (a model fixed to batch 1 runs sample by sample), else None (at once)."""
    dims = set()
    for inp in session.get_inputs():
        if not inp.shape:
            return None
        dims.add(inp.shape[0])
    if len(dims) != 1:
        return None
    (dim,) = dims
    return dim if isinstance(dim, int) and dim > 0 and dim != samples else None


def run_batched(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], batch: int | None = None
) -> list[np.ndarray]:
    """Run ``feeds`` (N samples along axis 0) in chunks of ``batch`` (None: all at once) and
    concatenate every output along axis 0."""
    n = len(next(iter(feeds.values()))) if batch is not None else 0
    if batch is None or batch >= n:
        return [np.asarray(o) for o in session.run(None, dict(feeds))]
    chunks = [session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})
              for i in range(0, n, batch)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def run_model(
    model: onnx.ModelProto | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    optimize: bool = False,
    batch: int | None = None,
) -> list[np.ndarray]:
    """All outputs of ``model`` over ``feeds`` (N samples along axis 0), in chunks of ``batch``;
    ``batch=None``: the inputs' static leading dim when it is not N (see :func:`static_batch`),
    else all at once. Graph optimisations off unless ``optimize``."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model, optimize)
    first = next(iter(feeds.values()), None)
    n = int(first.shape[0]) if first is not None and np.ndim(first) else 1
    return run_batched(session, feeds, batch if batch is not None else static_batch(session, n))
