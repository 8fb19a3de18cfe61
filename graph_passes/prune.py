"""Structural pruning: physically remove channels of channel groups from a model.

``prune_channels`` asks every op's rule to rewrite its constants and attributes (weights, biases,
BN parameters, per-channel scales, split sizes, reshape targets, conv ``group``) for the removed
channels, then drops stale shape annotations and re-runs shape inference and the checker.

``zero_channels`` is the correctness oracle of the tests: it leaves the graph alone and zeroes
the input slices of every consumer for the removed channels. Both must compute the same outputs.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .channel_groups import ChannelAnalysis
from .errors import PruningError
from .graph import ModelGraph, subgraph_references
from .normalise import infer_shapes
from .op_rules import PruneContext, find_rule, weight_rule
from .untie import merge_shared_copies
from .validate import check_model
from .ort_utils import compare_outputs, make_session, random_feeds

logger = logging.getLogger(__name__)

Removal = Mapping[str, Iterable[int]]


def removal_mask(analysis: ChannelAnalysis, removal: Removal) -> np.ndarray:
    """Bool per atom: True where the atom goes. Validates the request first."""
    removed = np.zeros(analysis.atoms.count, dtype=bool)
    for group_id, channels in removal.items():
        try:
            group = analysis.group(group_id)
        except KeyError:
            raise PruningError(
                f"unknown channel group '{group_id}'; run `prunequant inspect` to list the groups"
            ) from None
        idx = sorted({int(c) for c in channels})
        if not idx:
            continue
        if not group.prunable:
            raise PruningError(f"group '{group_id}' is not prunable: {group.reasons[0]}")
        if idx[0] < 0 or idx[-1] >= group.size:
            raise PruningError(
                f"group '{group_id}' has channels 0..{group.size - 1}; got index {idx[0] if idx[0] < 0 else idx[-1]}"
            )
        if len(idx) >= group.size:
            raise PruningError(
                f"cannot remove all {group.size} channels of group '{group_id}'; keep at least one"
            )
        for c in idx:
            removed[group.channel_atoms[c]] = True
    emptied = emptied_tensors(analysis, removed)
    if emptied:
        raise PruningError(
            f"removing these channels would leave tensor '{emptied[0]}' with no channels "
            f"({len(emptied)} tensor(s) in all); keep at least one of its channels "
            "(graph_passes.prune.repair_removal does that)"
        )
    return removed


def emptied_tensors(analysis: ChannelAnalysis, removed: np.ndarray) -> list[str]:
    """Tensors that would lose every channel (e.g. a Slice holding only removed channels)."""
    return [t for t, layout in analysis.layouts.items() if layout.size and removed[layout.atoms].all()]


def repair_removal(
    analysis: ChannelAnalysis, removal: Removal, score: Mapping[str, np.ndarray] | None = None
) -> dict[str, list[int]]:
    """Give back channels until no tensor is emptied and no group loses all its channels.

    For each emptied tensor the channel given back is the one with the highest ``score``
    (per group, indexed by group channel; default: the lowest index).
    """
    result = {g: sorted({int(c) for c in chans}) for g, chans in removal.items()}
    for _ in range(len(analysis.layouts) + 1):
        removed = np.zeros(analysis.atoms.count, dtype=bool)
        for group_id, chans in result.items():
            for c in chans:
                removed[analysis.group(group_id).channel_atoms[c]] = True
        for group_id, chans in result.items():
            if len(chans) >= analysis.group(group_id).size:
                _give_back(result, group_id, chans, score)
                break
        else:
            emptied = emptied_tensors(analysis, removed)
            if not emptied:
                return result
            atoms = analysis.layouts[emptied[0]].atoms
            group_index = int(analysis.atom_group[atoms[0]])
            group = analysis.groups[group_index]
            candidates = [c for c in result.get(group.id, [])
                          if np.isin(group.channel_atoms[c], atoms).any()]
            _give_back(result, group.id, candidates, score)
    raise PruningError("could not repair the pruning request")


def _give_back(result: dict, group_id: str, candidates: list[int], score) -> None:
    values = score.get(group_id) if score is not None else None
    best = max(candidates, key=lambda c: values[c]) if values is not None else min(candidates)
    result[group_id] = [c for c in result[group_id] if c != best]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _finish(model: onnx.ModelProto, new_inits: Mapping[str, onnx.TensorProto]) -> onnx.ModelProto:
    g = model.graph
    kept = [t for t in g.initializer if t.name not in new_inits]
    used = {i for n in g.node for i in n.input} | {r for n in g.node for r in subgraph_references(n)}
    del g.initializer[:]
    g.initializer.extend(t for t in kept if t.name in used)
    g.initializer.extend(t for name, t in new_inits.items() if name in used)
    infer_shapes(model)  # fresh value_info, without serialising the weights
    check_model(model)
    return model


def prune_channels(model: onnx.ModelProto, analysis: ChannelAnalysis, removal: Removal) -> onnx.ModelProto:
    """A new model with the given group channels removed everywhere."""
    removed = removal_mask(analysis, removal)
    work = _copy(model)
    graph = ModelGraph.build(work)
    if list(graph.nodes) != list(analysis.graph.nodes):
        raise PruningError("the model differs from the analysed one; analyse it again")
    ctx = PruneContext(graph=graph, layouts=analysis.layouts, removed=removed)
    for name, node in graph.nodes.items():
        rule = find_rule(node.domain, node.op_type, graph.opset)
        if rule is not None:
            rule.prune(name, node, ctx)
    n_removed = int(removed.sum())
    logger.info("removed %d channel atoms from %d groups", n_removed, len(removal))
    pruned = _finish(work, ctx.initializer_protos())
    merge_shared_copies(pruned, analysis.layers)  # a shared weight is sliced once per user: one tensor again
    return pruned


def zero_channels(model: onnx.ModelProto, analysis: ChannelAnalysis, removal: Removal) -> onnx.ModelProto:
    """The oracle: same graph, consumers' input slices for the removed channels set to zero."""
    removed = removal_mask(analysis, removal)
    work = _copy(model)
    graph = ModelGraph.build(work)
    inits = {t.name: t for t in work.graph.initializer}
    for layer in analysis.layers:
        _zero_feedback(work, graph, analysis, layer, removed)
        layout = analysis.layouts.get(layer.input)
        if layout is None:
            continue
        positions = np.flatnonzero(removed[layout.atoms])
        if positions.size == 0:
            continue
        node = graph.nodes[layer.name]
        rule = weight_rule(node, graph.opset)
        if rule is None:  # pragma: no cover - analysis layers are weight ops
            raise ValueError(f"layer {layer.name!r} ({node.op_type}) has no weight-op rule")
        w = rule.zero_input_channels(numpy_helper.to_array(inits[layer.weight]), node, layer.groups, positions)
        new_name = f"{layer.weight}__zeroed_{layer.name}"
        work.graph.initializer.append(numpy_helper.from_array(w, new_name))
        node.input[1] = new_name
    return work


def _zero_feedback(work: onnx.ModelProto, graph: ModelGraph, analysis: ChannelAnalysis, layer,
                   removed: np.ndarray) -> None:
    """Oracle edits for output channels a layer reads back itself (a recurrent layer's R)."""
    layout = analysis.layouts.get(layer.output)
    positions = np.flatnonzero(removed[layout.atoms]) if layout is not None else np.zeros(0, np.int64)
    node = graph.nodes[layer.name]
    rule = weight_rule(node, graph.opset)
    if positions.size == 0 or rule is None:
        return
    for index, value in rule.zero_feedback(node, graph.constant, positions).items():
        new_name = f"{node.input[index]}__zeroed_{layer.name}"
        work.graph.initializer.append(numpy_helper.from_array(value, new_name))
        node.input[index] = new_name


def check_pruning(
    model: onnx.ModelProto,
    analysis: ChannelAnalysis,
    removal: Removal,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> float:
    """Relative output error between the zeroed original and the pruned model (the oracle)."""
    pruned = prune_channels(model, analysis, removal)
    zeroed = zero_channels(model, analysis, removal)
    ref_sess = make_session(zeroed)
    feeds = dict(feeds) if feeds is not None else random_feeds(ref_sess)
    ref = ref_sess.run(None, feeds)
    got = make_session(pruned).run(None, feeds)
    return compare_outputs(got, ref).max_rel_error
