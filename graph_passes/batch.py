"""Give an exported model back the dynamic batch dim its input had before analysis pinned it.

Analysis needs static shapes, so a dynamic leading batch dim is pinned to 1 at load time and
recorded in the model's metadata (``graph_passes.shapes.BATCH_DIMS_KEY``). On export the dim
is made symbolic again, on inputs and on every output whose leading dim follows the batch, and
the result is checked: a batch of 2 must give exactly the two single-sample results. A graph
that baked the batch size into a constant (a Reshape to [1, -1], say) fails that check and
keeps its static batch of 1, with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .ort_utils import compare_outputs, make_session, random_feeds
from .shapes import BATCH_DIMS_KEY, batch_dims

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


def restore_dynamic_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(model, restored): the model with its recorded batch dims made symbolic again when a
    batch of 2 reproduces two single runs exactly; otherwise the static model."""
    dims = batch_dims(model)
    static = _without_record(model)
    if not dims:
        return static, False
    single = make_session(static)
    feeds = [random_feeds(single, seed=s) for s in (0, 1)]
    singles = [single.run(None, f) for f in feeds]
    outputs = [i for i, out in enumerate(singles[0]) if out.ndim and out.shape[0] == 1]
    candidate = _symbolic(static, dims, outputs)
    try:
        pair = {k: np.concatenate([f[k] for f in feeds]) if k in dims else feeds[0][k] for k in feeds[0]}
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
