"""Shared initializers: which stay one tensor, which are copied per weight layer.

Exporters share initializers between layers: torch's legacy exporter deduplicates identical
tensors (all-zero biases of squeeze-excitation convs, say), tf2onnx reuses one constant kernel
for every octave of a constant-Q transform, and tied weights are shared on purpose.

* A **weight** (input 1 of a Conv/ConvTranspose/Gemm/MatMul) read by several weight layers
  stays *one* tensor: the layers are coupled (``graph_passes.channel_groups`` ties their output
  channels, and their input channels, like a channel group, or blocks them with a reason), one
  plan quantizes it once, and the export stores it once. The first user in graph order is its
  *owner*; the others are *followers* (:attr:`WeightLayer.weight_owner`): they cost MACs but no
  bytes and their parameter count leaves the weight out.
* A **bias** (and everything a recurrent layer reads) is still copied per layer: biases are
  small and often shared only by accident (identical zeros), so each layer keeps its own.

What the model computes does not change.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .op_rules import weight_rule

if TYPE_CHECKING:  # pragma: no cover
    from .layers import WeightLayer

logger = logging.getLogger(__name__)

# layers whose weight stays shared: one weight tensor, one output-channel axis (not recurrent)
_SHAREABLE_KINDS = frozenset({"conv", "depthwise", "linear"})


def _shareable(node: onnx.NodeProto) -> bool:
    """A weight op quantizing only its input 1, one row per output channel (asked of its rule:
    Conv, ConvTranspose, Gemm, MatMul; not a recurrent layer)."""
    rule = weight_rule(node)
    return rule is not None and tuple(rule.quantized_inputs(node)) == (1,) and rule.channel_rows(node, [0]) == [0]


def untie_weight_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(model, copies made). Biases (and recurrent layers' inputs) shared by several weight
    layers get one copy per layer; a Conv/Gemm/MatMul weight shared by several layers stays
    shared (see the module doc). The input model is not modified."""
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(i for node in model.graph.node for i in node.input if i in inits)
    shared = {name for name, n in uses.items() if n > 1}
    if not shared:
        return model, 0
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    taken = set(inits) | {o for node in work.graph.node for o in node.output}
    copies = 0
    seen: set[str] = set()
    kept_shared: set[str] = set()
    layouts: dict[str, set[str]] = defaultdict(set)
    for node in work.graph.node:
        if len(node.input) > 1 and node.input[1] in shared and _shareable(node):
            layouts[node.input[1]].add(_weight_layout(node))
    for index, node in enumerate(work.graph.node):
        if weight_rule(node) is None:
            continue
        for slot in (1, 2):
            if len(node.input) <= slot or node.input[slot] not in shared:
                continue
            name = node.input[slot]
            if slot == 1 and _shareable(node) and len(layouts.get(name, ())) == 1:
                kept_shared.add(name)  # one tensor, coupled users (channel_groups)
                continue
            if name not in seen:  # the first weight layer keeps the original
                seen.add(name)
                continue
            new = f"{name}__{node.name or index}"
            while new in taken:
                new += "_"
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = new
            work.graph.initializer.append(tensor)
            taken.add(new)
            node.input[slot] = new
            copies += 1
    if copies:
        logger.info("gave %d weight layer(s) their own copy of a shared bias", copies)
    if kept_shared:
        logger.info("%d weight initializer(s) shared by several layers stay one tensor", len(kept_shared))
    return work, copies


def _weight_layout(node: onnx.NodeProto) -> tuple[str, tuple[int, int]]:
    """How a layer reads its weight (its rule, and the rule's output/input axes): users that
    read it alike can share one tensor (the bridge binds one torch parameter per initializer and
    layout). A weight read transposed by some users (a Gemm with transB=1 next to a MatMul) is
    copied per layer instead."""
    rule = weight_rule(node)
    return type(rule).__name__, tuple(rule.weight_axes(node))


def weight_users(layers: Sequence[WeightLayer]) -> dict[str, list[WeightLayer]]:
    """Weight initializer -> the conv and linear layers (Conv, ConvTranspose, Gemm, MatMul)
    reading it as their weight, for weights read by two or more. Other readers (an embedding's Gather, a recurrent
    layer) are not users: ``channel_groups`` blocks the users' channels for them."""
    users: dict[str, list[WeightLayer]] = defaultdict(list)
    for layer in layers:
        if layer.cost_kind in _SHAREABLE_KINDS:
            users[layer.weight].append(layer)
    return {w: found for w, found in users.items() if len(found) > 1}


def mark_owners(layers: Sequence[WeightLayer], weight_size: dict[str, int]) -> int:
    """Set ``weight_owner`` on every follower (the first user owns the weight) and take the
    shared weight out of the followers' ``params``. Returns the number of followers."""
    followers = 0
    for weight, found in weight_users(layers).items():
        owner = found[0]
        for layer in found[1:]:
            layer.weight_owner = owner.name
            layer.params -= int(weight_size.get(weight, 0))
            followers += 1
    return followers


def merge_shared_copies(model: onnx.ModelProto, layers: Sequence[WeightLayer]) -> int:
    """After pruning (which slices a shared weight copy-on-write, once per user): point every
    user whose slice is bit-identical to the owner's at the owner's tensor.
    In place; returns the copies removed. Users whose slices differ keep their own (correct,
    larger); the analysis couples users so that this does not happen."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    inits = {t.name: t for t in model.graph.initializer}
    merged = 0
    dropped: set[str] = set()
    for weight, found in weight_users(layers).items():
        reading = [(layer, nodes.get(layer.name)) for layer in found]
        reading = [(layer, node) for layer, node in reading if node is not None and len(node.input) > 1]
        if len(reading) < 2:
            continue
        first_name = reading[0][1].input[1]
        first = inits.get(first_name)
        if first is None:
            continue
        first_value = onnx.numpy_helper.to_array(first)
        for _layer, node in reading[1:]:
            name = node.input[1]
            if name == first_name or name not in inits:
                continue
            value = onnx.numpy_helper.to_array(inits[name])
            if value.shape == first_value.shape and value.dtype == first_value.dtype and \
                    np.array_equal(value, first_value, equal_nan=True):
                node.input[1] = first_name
                dropped.add(name)
                merged += 1
    if dropped:
        still_used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name not in dropped or t.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        logger.info("pruning: %d slice(s) of shared weights merged back into one tensor each", merged)
    return merged


__all__ = ["merge_shared_copies", "mark_owners", "untie_weight_initializers", "weight_users"]
