"""Give an exported model back the dynamic batch dim its input had before analysis pinned it.

Analysis needs static shapes, so a dynamic leading batch dim is pinned to 1 at load time and
recorded in the model's metadata (``graph_passes.shapes.BATCH_DIMS_KEY``). On export the dim
is made symbolic again, on inputs and on every output whose leading dim follows the batch, and
the result is checked: a batch of 2 must give exactly the two single-sample results. A graph
that baked the batch size into a constant (a Reshape to [1, -1], say) fails that check and
keeps its static batch of 1, with a warning.

Batch layouts (:func:`batch_layout`). Not every model's inputs hold a batch in dim 0: a
recurrent state ``[layers, 1, hidden]`` has its batch in dim 1, ICLabel's ``[4, 1, 32, 32]``
holds four augmented copies of *one* sample in dim 0, and a time-first VAD's ``[T, 576]`` has
time there (its LSTM state ``[1, 1, 128]`` is a batch of 1 that cannot grow). Such a model runs
one sample at a time ("per sample"), batch 1 throughout; its data holds N samples along dim 0 as
always, where a sample of a *whole* input (dim 0 not 1) is the whole input: ``[N, 2, 1, 128]``.
Outputs are joined per sample: concatenated along dim 0 when a sample's output has dim 0 of 1,
stacked otherwise, so no output's dim 0 is ever taken for a batch it is not.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import DataError
from .ort_utils import compare_outputs, make_session, random_feeds
from .shapes import BATCH_DIMS_KEY, batch_dims, graph_inputs, value_dims

logger = logging.getLogger(__name__)


def _without_record(model: onnx.ModelProto) -> onnx.ModelProto:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    kept = [p for p in work.metadata_props if p.key != BATCH_DIMS_KEY]
    del work.metadata_props[:]
    work.metadata_props.extend(kept)
    return work


def _symbolic(model: onnx.ModelProto, dims: dict[str, str], outputs: list[int]) -> onnx.ModelProto:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for value in work.graph.input:
        if value.name in dims:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = dims[value.name]
    name = next(iter(dims.values()))
    for i in outputs:
        dim = work.graph.output[i].type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = name
    del work.graph.value_info[:]
    return work


def restore_dynamic_batch(model: onnx.ModelProto, per_sample: bool = False) -> tuple[onnx.ModelProto, bool]:
    """(model, restored): the model with its recorded batch dims made symbolic again when a
    batch of 2 reproduces two single runs exactly; otherwise the static model. A ``per_sample``
    model (see :func:`batch_layout`) keeps its static shapes."""
    dims = batch_dims(model)
    static = _without_record(model)
    if not dims or per_sample:
        if dims:
            logger.info("the exported model keeps its static input shapes: it runs one sample at a time")
        return static, False
    single = make_session(static)
    feeds = [random_feeds(single, seed=s) for s in (0, 1)]
    singles = [single.run(None, f) for f in feeds]
    pair = {k: np.concatenate([f[k] for f in feeds]) if k in dims else feeds[0][k] for k in feeds[0]}
    try:
        # the outputs that follow the batch are those whose dim 0 grows with it (an LSTM's hn
        # [layers, 1, hidden] has a dim 0 of 1 that is not the batch: never made symbolic)
        free = make_session(_with_free_dim0(static, dims)).run(None, pair)
        outputs = [i for i, (out, one) in enumerate(zip(free, singles[0]))
                   if one.ndim and one.shape[0] == 1 and np.shape(out) == (2, *one.shape[1:])]
        candidate = _symbolic(static, dims, outputs)
        got = make_session(candidate).run(None, pair)
        expected = [np.concatenate([a, b]) if i in outputs else a
                    for i, (a, b) in enumerate(zip(*singles))]
        if compare_outputs(got, expected).max_rel_error <= 1e-5:
            return candidate, True
        reason = "a batch of 2 does not reproduce two single runs"
    except Exception as exc:  # onnxruntime refuses the batch: a constant fixes it
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    logger.warning("the exported model keeps a static batch of 1 (%s); the input model's graph "
                   "fixes the batch size somewhere", reason)
    return static, False


def generalise_batch_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Reshape targets that spell out the batch size (``[1, 576]``, as exporters write a
    flatten) become ``[-1, 576]`` (or ``[0, -1]`` for ``[1, -1]``: "copy the input's dim 0").
    For the current shapes this computes the same thing; it lets the model (and its torch
    bridge) run other batch sizes.

    Only Reshapes with a constant target whose first entry equals the input's (known) dim 0 are
    touched (``0`` only where ``allowzero`` is unset). Returns the model and how many changed.
    """
    from onnx import numpy_helper

    from .graph import ModelGraph

    work = onnx.ModelProto()
    work.CopyFrom(model)
    view = ModelGraph.build(work)
    inits = {t.name: t for t in work.graph.initializer}
    users: dict[str, int] = {}
    for node in work.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    count = 0
    for node in work.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64)
        in_shape = view.shape(node.input[0])
        if target.ndim != 1 or not target.size or not in_shape or target[0] != in_shape[0] or target[0] <= 0:
            continue
        target = target.copy()
        if -1 not in target[1:]:
            target[0] = -1  # inferred from the element count: the batch
        elif not view.attr(node, "allowzero", 0):
            target[0] = 0  # copied from the input's dim 0
        else:
            continue
        name = node.input[1] if users[node.input[1]] == 1 else f"{node.input[1]}__{node.name or count}"
        tensor = numpy_helper.from_array(target, name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            work.graph.initializer.append(tensor)
            inits[name] = tensor
        node.input[1] = name
        count += 1
    return work, count


# ----------------------------------------------------------------------------- batch layouts


@dataclass(frozen=True)
class BatchLayout:
    """How a model's inputs take a batch: ``whole`` inputs hold no batch in dim 0 (a sample is
    the whole input); ``per_sample``: the model runs one sample at a time (``reason`` says why)."""

    whole: frozenset[str] = frozenset()
    per_sample: bool = False
    reason: str = ""


def sample_feed(feeds: Mapping[str, np.ndarray], index: int, whole: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The model's feed for sample ``index`` of ``feeds`` (N samples along dim 0 of each array)."""
    return {k: v[index] if k in whole else v[index:index + 1] for k, v in feeds.items()}


def join_outputs(per_sample: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Per-sample outputs -> one array per output: concatenated along dim 0 when a sample's
    output has dim 0 of 1 (a batch of 1), else stacked (a new sample axis)."""
    if not per_sample:
        return []
    joined = []
    for j in range(len(per_sample[0])):
        parts = [np.asarray(outs[j]) for outs in per_sample]
        if all(p.ndim and p.shape[0] == 1 for p in parts):
            joined.append(np.concatenate(parts))
        else:
            joined.append(np.stack(parts))
    return joined


def run_samples(session, feeds: Mapping[str, np.ndarray], whole: Collection[str] = ()) -> list[np.ndarray]:
    """Run an onnxruntime session one sample at a time; outputs joined by :func:`join_outputs`."""
    n = _count(feeds)
    return join_outputs([session.run(None, sample_feed(feeds, i, whole)) for i in range(n)])


def _count(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else 1


def _static_input_dims(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for value in graph_inputs(model):
        dims = value_dims(value) if value.type.HasField("tensor_type") else None
        out[value.name] = [d for d in dims] if dims is not None and all(isinstance(d, int) for d in dims) else None
    return out


def _is_fixed_batch(model: onnx.ModelProto, size: int) -> bool:
    """Every input has dim 0 == ``size`` > 1: is that a real batch? Rows of dim 0 permuted must
    permute every output whose dim 0 is ``size`` (at least one) and leave the others unchanged."""
    try:
        session = make_session(model)
        feeds = random_feeds(session, seed=0)
        perm = np.arange(size)[::-1].copy()
        base = session.run(None, feeds)
        moved = session.run(None, {k: v[perm] for k, v in feeds.items()})
    except Exception:  # noqa: BLE001 - a model that cannot run random rows has no plain batch
        return False
    batched = False
    for a, b in zip(base, moved):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim and a.shape[0] == size:
            batched = True
            a = a[perm]
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            return False
    return batched


def whole_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{input: why} of the inputs whose dim 0 is not a batch axis: a static dim 0 other than 1
    (a recurrent state [layers, 1, hidden], copies of one sample), unless every input shares that
    dim 0 and the model treats it as a batch (a model fixed to batch B: rows permute outputs)."""
    dims = _static_input_dims(model)
    odd = {name: d for name, d in dims.items() if d is not None and (not d or d[0] != 1)}
    if not odd:
        return {}
    sizes = {tuple(d[:1]) for d in dims.values() if d is not None}
    if len(odd) == len(dims) and len(sizes) == 1 and odd and next(iter(sizes)):
        size = next(iter(sizes))[0]
        if _is_fixed_batch(model, size):
            return {}
    return {name: f"[{'x'.join(map(str, d)) or 'scalar'}]" for name, d in odd.items()}


def _with_free_dim0(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy whose inputs ``names`` take any dim 0 and whose outputs' shapes are left to run time."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for value in work.graph.input:
        if value.name in names and value.type.tensor_type.shape.dim:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = "prunequant_batch"
    for value in work.graph.output:
        value.type.tensor_type.ClearField("shape")
    del work.graph.value_info[:]
    return work


def batch_independent(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> tuple[bool, str]:
    """(ok, why not): do two samples stacked along dim 0 give the two single results (each
    output's dim 0 the batch)? ``samples``: two feeds of batch 1 each."""
    a, b = samples[0], samples[1]
    try:
        session = make_session(model)
        singles = [session.run(None, dict(f)) for f in (a, b)]
    except Exception as exc:  # noqa: BLE001 - reported by the data check, with the data's name
        return False, f"the model does not run a sample ({type(exc).__name__})"
    if any(not np.asarray(o).ndim or np.asarray(o).shape[0] != 1 for o in singles[0]):
        return False, "an output's dim 0 is not a batch of 1"
    try:
        pair = {k: np.concatenate([a[k], b[k]]) for k in a}
        got = make_session(_with_free_dim0(model, list(a))).run(None, pair)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refuses two samples: dim 0 is no batch
        return False, f"two samples along dim 0 fail ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    expected = [np.concatenate([x, y]) for x, y in zip(*singles)]
    if any(np.asarray(g).shape != e.shape for g, e in zip(got, expected)):
        return False, "two samples along dim 0 change the outputs' shapes otherwise than a batch"
    if compare_outputs([np.asarray(g) for g in got], expected).max_rel_error > 1e-4:
        return False, "two samples along dim 0 do not give the two single results (dim 0 is not a batch)"
    return True, ""


def batch_layout(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None,
                 whole: Collection[str] | None = None) -> BatchLayout:
    """The model's :class:`BatchLayout`; ``feeds`` (N samples, the data's layout) give the two
    samples of the batch check (random inputs when None). ``whole``: known whole inputs."""
    whole_found = dict.fromkeys(whole) if whole is not None else whole_inputs(model)
    if whole_found:
        names = ", ".join(f"{k}{'=' + v if v else ''}" for k, v in whole_found.items())
        return BatchLayout(frozenset(whole_found), True, f"input(s) {names} hold no batch in dim 0")
    if feeds is not None and _count(feeds) >= 2:
        samples = [sample_feed(feeds, i) for i in (0, 1)]
    else:
        session = make_session(model)
        samples = [random_feeds(session, seed=s) for s in (0, 1)]
    ok, why = batch_independent(model, samples)
    return BatchLayout(frozenset(), not ok, why)


#: how many samples of the user's data :func:`check_model_on_data` runs the model on (a model
#: that runs one sample at a time: PER_SAMPLE_CHECK_SAMPLES), and in chunks of how many
DATA_CHECK_SAMPLES = 64
PER_SAMPLE_CHECK_SAMPLES = 16
DATA_CHECK_CHUNK = 32


def check_model_on_data(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], source: str,
                        layout: BatchLayout | None = None) -> None:
    """DataError (one line, naming the inputs and the sample) when onnxruntime fails to run the
    model on the data's first samples, or the model's outputs are NaN/Inf there: the data is
    what the model cannot take, not a prunequant bug."""
    layout = layout or BatchLayout()
    n = min(_count(feeds), PER_SAMPLE_CHECK_SAMPLES if layout.per_sample else DATA_CHECK_SAMPLES)
    names = [o.name for o in model.graph.output]
    inputs = ", ".join(f"{k!r} [{'x'.join(map(str, v.shape[1:]))}] per sample" for k, v in feeds.items())
    try:
        single = make_session(model)
        chunked = None if layout.per_sample else make_session(_with_free_dim0(model, list(feeds)))
    except Exception:  # noqa: BLE001 - loading the model is checked (and reported) elsewhere
        return
    step = 1 if chunked is None else DATA_CHECK_CHUNK
    for start in range(0, n, step):
        stop = min(start + step, n)
        try:
            if chunked is not None:
                outs = chunked.run(None, {k: v[start:stop] for k, v in feeds.items()})
            else:
                outs = single.run(None, sample_feed(feeds, start, layout.whole))
        except Exception as exc:  # noqa: BLE001 - any runtime failure on the data is the data's
            if chunked is not None:  # name the sample: run the chunk's samples one by one
                _check_samples(single, feeds, range(start, stop), names, inputs, source)
            text = " ".join(str(exc).split())[:200]
            where = f"sample {start}" if stop == start + 1 else f"samples {start}..{stop - 1}"
            raise DataError(f"the original model fails on {where} of {source} (inputs "
                            f"{inputs}): {text}; give data the model can run (sizes and values it expects)") from exc
        _check_finite(outs, names, start if chunked is None else None, start, inputs, source)


def _check_samples(session, feeds, indices, names, inputs, source) -> None:
    for i in indices:
        try:
            outs = session.run(None, sample_feed(feeds, i))
        except Exception as exc:  # noqa: BLE001 - see check_model_on_data
            text = " ".join(str(exc).split())[:200]
            raise DataError(f"the original model fails on sample {i} of {source} (inputs {inputs}): {text}; "
                            "give data the model can run (sizes and values it expects)") from exc
        _check_finite(outs, names, i, i, inputs, source)


def _check_finite(outs, names, sample: int | None, start: int, inputs: str, source: str) -> None:
    for name, out in zip(names, outs):
        out = np.asarray(out)
        if not np.issubdtype(out.dtype, np.floating) or np.isfinite(out).all():
            continue
        if sample is None:  # batched: the first sample whose rows are not finite
            bad = ~np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1) if out.ndim else np.array([True])
            sample = start + int(np.flatnonzero(bad)[0])
        raise DataError(f"the original model's output {name!r} is NaN/Inf on sample {sample} of {source} "
                        f"(inputs {inputs}): the model cannot take these values - check the data's "
                        "scaling and normalisation, or drop such samples")
