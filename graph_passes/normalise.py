"""normalise(): bring a third-party model into the canonical form later passes rely on.

After it, every weight is an initializer (constants folded, no Constant/Identity indirection),
BatchNorm is folded into its producer where possible, dead nodes are gone, every node has a
unique non-empty name, and value_info is fresh (onnx shape inference with data propagation).
The passes run to a fixed point (a few rounds at most). With ``verify``, the result is run
against the original in onnxruntime (graph optimisations off) on random inputs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator

import onnx
import onnxruntime as ort

from .eliminate_dead_nodes import EliminateDeadNodesPass
from .eliminate_identity import EliminateIdentityPass
from .errors import UnsupportedModelError, VerificationError
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import FoldConstantsPass, FoldIfPass, has_foldable_constants
from .fold_utils import DEFAULT_DOMAINS, RewriteResult, subgraphs, unique_name
from .ort_utils import compare_outputs, make_session, random_feeds, run
from .drop_default_inputs import DropDefaultInputsPass
from .passes import Pass, PassResult
from .shapes import reconcile_output_shapes, undeclared_outputs

logger = logging.getLogger(__name__)

MAX_ROUNDS = 8  # an inlined If exposes Shapes that fold only after another inference: nested Ifs need more
# Initializers up to this many elements take part in shape inference with their values.
_SKELETON_MAX_ELEMENTS = 4096
# Domains onnxruntime's CPU build implements; an op elsewhere needs a custom-op library.
_ORT_DOMAINS = DEFAULT_DOMAINS | {"ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"}


@dataclass
class NormaliseStats:
    """Counts over all rounds: constant nodes folded, Identity/Dropout nodes removed or
    rewired, BatchNorms folded, dead nodes plus unused initializers removed, nodes named."""

    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    constants_folded: int = 0
    identities_removed: int = 0
    batchnorms_folded: int = 0
    dead_removed: int = 0
    nodes_named: int = 0
    rounds: int = 0
    seconds: float = 0.0


@dataclass
class NormaliseResult:
    """The normalised model, its verified parity, and what was done."""

    model: onnx.ModelProto
    max_rel_error: float | None  # None when not verified
    passes_applied: list[str]  # passes that changed the model, in first-applied order
    stats: NormaliseStats


class AssignNodeNamesPass(Pass):
    """Name every unnamed node, and every later node reusing a name, ``<op_type>_<index>``.

    The index counts nodes depth-first (main graph, then each subgraph at its node), so names
    are deterministic; subgraph nodes are included because names must be unique model-wide.
    """

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        nodes = list(_all_nodes(model.graph))
        taken = {n.name for n in nodes if n.name}
        seen: set[str] = set()
        renamed = 0
        for index, node in enumerate(nodes):
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            node.name = unique_name(f"{node.op_type}_{index}", taken)
            seen.add(node.name)
            renamed += 1
            logger.debug("named node %s", node.name)
        return RewriteResult(model, bool(renamed), renamed)


def normalisation_passes() -> list[Pass]:
    """One round of normalisation, in order."""
    return [FoldConstantsPass(), FoldIfPass(), EliminateIdentityPass(), FoldBatchNormPass(),
            DropDefaultInputsPass(), EliminateDeadNodesPass()]


def normalise(
    model: onnx.ModelProto, *, verify: bool = True, rtol: float = 1e-4, seed: int = 0
) -> NormaliseResult:
    """Normalise ``model`` (not modified) and, with ``verify``, check parity in onnxruntime.

    Raises UnsupportedModelError when onnxruntime cannot run the original model, and
    VerificationError when the normalised model's outputs differ by more than ``rtol``.
    """
    start = time.perf_counter()
    stats = NormaliseStats(len(model.graph.node), 0, len(model.graph.initializer), 0)
    applied: list[str] = []
    # Names first: onnxruntime rejects duplicate node names, and they change nothing else.
    work, _ = _apply(AssignNodeNamesPass(), model, stats, applied)
    reference = _reference_session(work) if verify else None
    pristine = None
    if verify:  # the passes below rewrite ``work`` in place; the noise floor needs the original
        pristine = onnx.ModelProto()
        pristine.CopyFrom(work)
    work = infer_shapes(_constant_initializer_inputs(work))
    for _ in range(MAX_ROUNDS):
        stats.rounds += 1
        changed = False
        for p in normalisation_passes():
            work, modified = _apply(p, work, stats, applied)
            changed = changed or modified
        if not changed:
            break
        work = infer_shapes(work)
        if not _worth_another_round(work):
            break
    stats.nodes_after = len(work.graph.node)
    stats.initializers_after = len(work.graph.initializer)
    error = _verify(reference, work, rtol, seed, pristine) if reference is not None else None
    stats.seconds = time.perf_counter() - start
    logger.info("normalise: %s", stats)
    return NormaliseResult(work, error, applied, stats)


def _worth_another_round(model: onnx.ModelProto) -> bool:
    """Whether a round that changed the model may have enabled more rewrites.

    Within a round the pass order already feeds each pass the results of the earlier ones;
    what a new round can still find is constants exposed by fresh shape inference (Shape of
    a tensor whose shape just became static), and BatchNorms whose producer's other use
    was dead code removed after the BN pass ran.
    """
    if has_foldable_constants(model):
        return True
    return any(n.op_type == "BatchNormalization" for n in model.graph.node)


_STAT_OF_PASS = {
    "AssignNodeNamesPass": "nodes_named",
    "FoldConstantsPass": "constants_folded",
    "FoldIfPass": "constants_folded",
    "EliminateIdentityPass": "identities_removed",
    "FoldBatchNormPass": "batchnorms_folded",
    "EliminateDeadNodesPass": "dead_removed",
}


def _apply(
    p: Pass, model: onnx.ModelProto, stats: NormaliseStats, applied: list[str]
) -> tuple[onnx.ModelProto, bool]:
    result: PassResult = p(model)
    if result.modified:
        if p.name not in applied:
            applied.append(p.name)
        field_name = _STAT_OF_PASS.get(p.name)
        if field_name is not None and isinstance(result, RewriteResult):
            setattr(stats, field_name, getattr(stats, field_name) + result.rewrites)
    return result.model, result.modified


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the main graph's value_info, in place, by fresh onnx shape inference.

    Inference runs on a skeleton of the model in which initializers larger than
    ``_SKELETON_MAX_ELEMENTS`` are typed graph inputs (their shapes are all inference needs),
    so a large model is never serialised for it. Returns ``model``.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_shape_skeleton(model), data_prop=True)
        fresh = list(inferred.graph.value_info)
        reconcile_output_shapes(model.graph, inferred.graph.output)  # stale output declarations
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        logger.warning("shape inference failed, value_info left empty: %s", exc)
        fresh = []
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in fresh if has_shape(v))
    return model


def has_shape(value: onnx.ValueInfoProto) -> bool:
    """Whether a value_info carries a shape (of any rank). Inference leaves some tensors with an
    element type but no shape (an If's outputs whose branches disagree in rank); the onnx checker
    refuses such an entry ("Field 'shape' of 'type' is required but missing"), and it says
    nothing a consumer needs, so it is dropped."""
    kind = value.type.WhichOneof("value")
    return kind != "tensor_type" or value.type.tensor_type.HasField("shape")


def _shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(undeclared_outputs(source.output))  # inference says what they are
    graph.sparse_initializer.extend(source.sparse_initializer)
    inputs = {i.name for i in source.input}
    for tensor in source.initializer:
        if math.prod(tensor.dims) <= _SKELETON_MAX_ELEMENTS:
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return skeleton


def _constant_initializer_inputs(work: onnx.ModelProto) -> onnx.ModelProto:
    """Change ``work`` in place: no initializer is listed as a graph input (IR >= 4).

    Before IR 4 every initializer had to be listed as an input, yet it is a constant; from
    IR 4 on such an input is an overridable default (torch's keep_initializers_as_inputs).
    onnxruntime asks feeds for neither, and prunequant rewrites weights anyway, so both are
    made plain constant initializers: otherwise no weight behind them could be folded.
    """
    inits = {t.name for t in work.graph.initializer}
    inputs = [i for i in work.graph.input if i.name not in inits]
    if len(inputs) < len(work.graph.input):
        logger.info("%d initializers listed as graph inputs become constants",
                    len(work.graph.input) - len(inputs))
        del work.graph.input[:]
        work.graph.input.extend(inputs)
    work.ir_version = max(work.ir_version, 4)
    return work


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _all_nodes(sub)


def _reference_session(model: onnx.ModelProto) -> ort.InferenceSession:
    try:
        return make_session(model)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise UnsupportedModelError(_unsupported_message(model, exc)) from exc


def _unsupported_message(model: onnx.ModelProto, exc: Exception) -> str:
    local = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in _ORT_DOMAINS and (node.domain, node.op_type) not in local:
            return (
                f"onnxruntime cannot run this model: op {node.op_type!r} of domain "
                f"{node.domain!r} (node {node.name!r}) has no implementation; register its "
                "custom-op library or normalise with verify=False"
            )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"onnxruntime cannot run this model: {first_line}"


#: how far above the original's own float32 noise floor a normalised model may be
NOISE_FACTOR = 10.0


def noise_floor(original: onnx.ModelProto, feeds: dict, expected: list) -> float:
    """The original model's own float32 rounding noise on ``feeds``: its relative output error
    when onnxruntime runs it with all graph optimisations (which fold BatchNorms into convs and
    fuse ops, the rewrites normalisation makes) against the plain run. Two valid executions of
    the same model differ by this much; a normalised model within a small multiple of it differs
    by rounding only. 0.0 when the optimised session cannot be built."""
    try:
        optimised = make_session(original, optimize=True)
        return compare_outputs(optimised.run(None, feeds), expected).max_rel_error
    except Exception:  # noqa: BLE001 - the floor is a refinement: without it rtol alone decides
        logger.debug("noise floor: optimised session failed", exc_info=True)
        return 0.0


def _verify(
    reference: ort.InferenceSession, normalised: onnx.ModelProto, rtol: float, seed: int,
    original: onnx.ModelProto | None = None,
) -> float:
    """Worst relative output error of ``normalised`` against the original's session.

    The bound is ``rtol``, or, when the error exceeds it, ``NOISE_FACTOR`` times the original's
    own rounding noise (:func:`noise_floor`): a relative error is measured against each output's
    largest magnitude, and an output near zero everywhere (a sigmoid of strongly negative
    logits on random inputs) turns absolute rounding of 1e-7 into a relative 1e-3. A wrong
    rewrite is orders of magnitude above that floor."""
    try:
        feeds = random_feeds(reference, seed=seed)
    except ValueError as exc:
        raise UnsupportedModelError(f"cannot verify normalisation: {exc}") from exc
    expected = run(reference, feeds)
    try:
        got = run(normalised, feeds)
    except Exception as exc:  # a pass produced something onnxruntime rejects
        raise VerificationError(
            f"the normalised model does not run in onnxruntime: {str(exc).splitlines()[0]}"
        ) from exc
    comparison = compare_outputs(got, expected)
    if not comparison.ok(rtol):
        floor = noise_floor(original, feeds, expected) if original is not None else 0.0
        bound = max(rtol, NOISE_FACTOR * floor)
        name = reference.get_outputs()[comparison.worst_output].name
        if not comparison.ok(bound):
            raise VerificationError(
                f"the normalised model differs from the original: output {name!r} has relative "
                f"error {comparison.max_rel_error:.3g} > {bound:.3g} (rtol {rtol:g}; the original's own "
                f"float32 noise with onnxruntime optimisations is {floor:.3g})"
            )
        logger.info("normalise: output %r relative error %.3g is float rounding (the original's own noise "
                    "floor is %.3g)", name, comparison.max_rel_error, floor)
    logger.info("normalise verified: max relative error %.3g", comparison.max_rel_error)
    return comparison.max_rel_error
