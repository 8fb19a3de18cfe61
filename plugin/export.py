"""Apply a CompressionPlan to the ONNX graph: remove pruned channels, quantize, validate.

The ONNX graph is the source of truth: the output is the input graph (normalised), with the
pruned channels physically removed (``graph_passes.prune``), weights stored as packed
per-channel INT8/INT4/INT2 with DequantizeLinear, embedding tables as INT8 with one scale per
row, and Q/DQ on every activation site that the plan quantizes (``graph_passes.qdq``; the
operands of activation x activation MatMuls are sites too). Nothing is re-exported from torch.

Fine-grained sparsity (:class:`plugin.plan.LayerPlan`): after the channels are removed, in every
remaining output channel of a sparse layer the ``floor(sparsity * n)`` weights of smallest |w|
are set to 0 (stable order: the plan's rule), so the quantized integers there are exact zeros
(``round(0 / scale) = 0``). Weights that come from the fake-quant engine carry those zeros
already (it applies the same rule), so this step changes nothing for them; it makes the export
of raw weights follow the plan too. The zeros are stored densely: the file does not shrink.

Channel order (:func:`width_orders`, ``graph_passes.permute``): in every exact, prunable channel
group whose layers have mixed per-channel widths, the kept channels are reordered by width
(stable, widest first, by the widths most of the group's producing layers share) after pruning
and sparsity, so each such layer's weight is one ``Concat`` of its per-width DequantizeLinears
with no ``Gather`` (``graph_passes.qdq``). The order is recomputed from the plan at every export
(the plan keeps the original channel order; ``export --plan`` is unchanged); a group that reaches
a graph output or an op that cannot reorder its channels keeps its order and its Gathers, and so
does a layer whose widths differ from the ones its group was sorted by. The model computes the
same function (the group never reaches an output), up to float summation order.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graph_passes.channel_groups import ChannelAnalysis
from graph_passes.errors import PlanError
from graph_passes.permute import permute_groups
from graph_passes.prune import prune_channels
from graph_passes.qdq import ActivationQuant, QdqResult, WeightQuant, compact, insert_qdq, weight_axis

from .plan import CompressionPlan

logger = logging.getLogger(__name__)

#: reorder mixed-width groups' channels by width at export (see the module docstring);
#: ``benchmarks/export_size.py --no-permute`` turns it off to measure the Gather layout
PERMUTE_BY_WIDTH = True


@dataclass
class ExportResult:
    model: onnx.ModelProto
    qdq: QdqResult
    removal: dict[str, list[int]]
    layer_channels: dict[str, tuple[int, int]]  # layer -> (channels before, after)
    layer_bits: dict[str, dict[int, int]]  # layer -> {bits: channels}
    #: group -> its kept channels in the exported order (groups reordered by width only)
    channel_orders: dict[str, list[int]] = field(default_factory=dict)


def removal_of(plan: CompressionPlan, analysis: ChannelAnalysis) -> dict[str, list[int]]:
    """Group channels the plan removes, checked against the analysis."""
    removal = {}
    for group_id, gp in plan.groups.items():
        try:
            group = analysis.group(group_id)
        except KeyError:
            raise PlanError(f"plan names channel group {group_id!r}, which this model does not have; "
                            "was the plan made for another model?") from None
        if gp.size != group.size:
            raise PlanError(f"plan group {group_id!r} has {gp.size} channels, the model's has {group.size}")
        kept = set(gp.kept)
        pruned = [c for c in range(group.size) if c not in kept]
        if pruned:
            removal[group_id] = pruned
    return removal


def _activation_scale(bits: int, signed: bool, clip: float) -> float:
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return float(clip) / levels


def quantization_of(plan: CompressionPlan, analysis: ChannelAnalysis, pruned: onnx.ModelProto
                    ) -> tuple[dict[str, WeightQuant], dict[str, ActivationQuant]]:
    """Per-layer bit-widths of the remaining channels, and activation quantizers per site."""
    out_channels = {}
    for node in pruned.graph.node:
        out_channels[node.name] = node
    weights = {}
    for name, lp in plan.layers.items():
        kept_bits = tuple(int(b) for b in lp.bits if b > 0)
        if name not in out_channels:
            raise PlanError(f"plan names layer {name!r}, which is not a node of this model")
        scales = None
        if lp.scales is not None:
            scales = tuple(float(s) for s, b in zip(lp.scales, lp.bits) if b > 0)
        weights[name] = WeightQuant(kept_bits, scales)
    consumers = {site.tensor: tuple(site.consumers) for site in analysis.sites}
    activations = {}
    for tensor, ap in plan.activations.items():
        if tensor not in consumers:
            raise PlanError(f"plan quantizes tensor {tensor!r}, which is not an activation site of this model")
        activations[tensor] = ActivationQuant(int(ap.bits), bool(ap.signed),
                                              _activation_scale(ap.bits, ap.signed, ap.clip),
                                              consumers=consumers[tensor])
    return weights, activations


def embedding_quantization(analysis: ChannelAnalysis, pruned: onnx.ModelProto) -> dict[str, int]:
    """Gather node -> bits for every embedding table of the model (``graph_passes.layers.
    embedding_tables``): all at ``plugin.space.EMBEDDING_BITS``, which the plan does not hold
    (not searched); the fake-quant engine quantizes them the same way."""
    from graph_passes.layers import embedding_tables
    from plugin.space import EMBEDDING_BITS

    names = {n.name for n in pruned.graph.node}
    return {t.name: EMBEDDING_BITS for t in embedding_tables(analysis.graph) if t.name in names}


def sparsify_weight(w: np.ndarray, sparsity: float, axis: int) -> np.ndarray:
    """``w`` with the plan's fine-grained zeros: per output channel on ``axis``, the
    ``floor(sparsity * n)`` smallest |w| (stable: ties to the lower row-major position) set to 0."""
    from cost_models.spec import zeroed_per_channel

    moved = np.moveaxis(np.array(w, copy=True), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    k = zeroed_per_channel(sparsity, flat.shape[1])
    if k > 0:
        order = np.argsort(np.abs(flat.astype(np.float32)), axis=1, kind="stable")[:, :k]
        np.put_along_axis(flat, order, 0, axis=1)
    return np.moveaxis(flat.reshape(moved.shape), 0, axis)


def apply_sparsity(pruned: onnx.ModelProto, original: onnx.ModelProto, analysis: ChannelAnalysis,
                   plan: CompressionPlan) -> dict[str, int]:
    """Zero the plan's fine-grained weights in ``pruned`` (channels already removed), in place.
    Returns per sparse layer the number of zero weights its weight tensor now holds."""
    sparse = {name: lp.sparsity for name, lp in plan.layers.items() if lp.sparsity}
    if not sparse:
        return {}
    layers = {layer.name: layer for layer in analysis.layers}
    before = {n.name: n for n in original.graph.node}
    nodes = {n.name: n for n in pruned.graph.node}
    inits = {t.name: t for t in pruned.graph.initializer}
    uses = Counter(i for n in pruned.graph.node for i in n.input)
    zeros = {}
    for name, sparsity in sparse.items():
        layer, node = layers.get(name), nodes.get(name)
        if layer is None or node is None or name not in before or layer.weight not in before[name].input:
            raise PlanError(f"plan gives sparsity to layer {name!r}, which is not a weight layer of this model")
        index = list(before[name].input).index(layer.weight)
        tensor = inits.get(node.input[index])
        if tensor is None:
            raise PlanError(f"layer {name!r}: its weight is not an initializer, so it cannot be made sparse")
        w = sparsify_weight(numpy_helper.to_array(tensor), sparsity, weight_axis(node))
        if uses[tensor.name] > 1:  # shared with another node: give this one its own copy
            new = numpy_helper.from_array(w, f"{tensor.name}__sparse_{len(zeros)}")
            pruned.graph.initializer.append(new)
            node.input[index] = new.name
        else:
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
        zeros[name] = int(w.size - np.count_nonzero(w))
    return zeros


def joint_scales(model: onnx.ModelProto, plan: CompressionPlan, weights: dict[str, WeightQuant]
                 ) -> dict[str, WeightQuant]:
    """Scales of the layers whose rule quantizes several weights per output channel (a recurrent
    layer's W and R, one scale per hidden unit over both, as the fake-quantized model has it),
    from the unpruned ``model``'s weights: the fake-quantized values re-quantize to themselves,
    raw weights quantize as the engine would."""
    import numpy as np
    from onnx import numpy_helper

    from graph_passes.op_rules import weight_rule

    out = {}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        quant, rule = weights.get(node.name), weight_rule(node)
        if quant is None or rule is None or len(rule.quantized_inputs(node)) < 2:
            continue
        arrays = [numpy_helper.to_array(inits[node.input[i]]) for i in rule.quantized_inputs(node)]
        bits = np.asarray(plan.layers[node.name].bits, dtype=np.int64)
        absmax = rule.channel_absmax(node, arrays)[bits > 0]
        scale = (absmax / (np.left_shift(1, bits[bits > 0] - 1) - 1)).astype(np.float32)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.float32(1.0))
        out[node.name] = WeightQuant(quant.bits, tuple(float(v) for v in scale))
    return out


def width_orders(plan: CompressionPlan, analysis: ChannelAnalysis) -> dict[str, list[int]]:
    """Group -> its kept channels sorted by width (stable, widest first), for every exact,
    prunable group with a producing layer of mixed widths whose channels are not sorted yet.
    The widths are those most of the group's producing layers share (the first such layer's on
    a tie); a layer with other widths keeps its Gather."""
    orders = {}
    for group in analysis.groups:
        if not (group.prunable and group.exact):
            continue
        gp = plan.groups.get(group.id)
        kept = sorted(set(gp.kept)) if gp is not None else list(range(group.size))
        vectors: list[tuple[int, ...]] = []
        for member in group.members_of("producer"):
            lp = plan.layers.get(member.node or "")
            if lp is None:
                continue
            by_channel = dict(zip(member.channels.tolist(), (int(lp.bits[p]) for p in member.positions.tolist())))
            if all(c in by_channel for c in kept):
                vectors.append(tuple(by_channel[c] for c in kept))
        mixed = [v for v in vectors if len(set(v)) > 1]
        if not mixed:
            continue
        counts = Counter(vectors)
        widths = max(mixed, key=lambda v: counts[v])  # first of the most common on a tie
        order = [c for _, c in sorted(zip(widths, kept), key=lambda bc: -bc[0])]  # stable
        if order != kept:
            orders[group.id] = order
    return orders


def export_plan(model: onnx.ModelProto, analysis: ChannelAnalysis, plan: CompressionPlan, *,
                lean: bool = True, permute: bool | None = None) -> ExportResult:
    """``model``: the normalised model (with fine-tuned weights written back) that ``analysis``
    describes. Returns the compressed, not yet validated, model. ``lean``: the exact size
    reductions of ``graph_passes.qdq.compact`` (shared constants, short names, no weight zero
    points), which leave the model's values unchanged. ``permute``: reorder mixed-width groups
    by width (default :data:`PERMUTE_BY_WIDTH`)."""
    removal = removal_of(plan, analysis)
    pruned = prune_channels(model, analysis, removal) if removal else model
    if any(lp.sparsity for lp in plan.layers.values()):
        if pruned is model:
            pruned = onnx.ModelProto()
            pruned.CopyFrom(model)
        apply_sparsity(pruned, model, analysis, plan)
    weights, activations = quantization_of(plan, analysis, pruned)
    weights.update(joint_scales(model, plan, weights))
    channel_orders: dict[str, list[int]] = {}
    orders = width_orders(plan, analysis) if (PERMUTE_BY_WIDTH if permute is None else permute) else {}
    if orders:
        permuted = permute_groups(pruned, analysis, removal, orders)
        pruned, channel_orders = permuted.model, permuted.permuted
        outputs = {layer.name: layer.output for layer in analysis.layers}
        for name, quant in list(weights.items()):
            sigma = permuted.sigmas.get(outputs.get(name, ""))
            if sigma is None:
                continue
            scales = None if quant.scales is None else tuple(quant.scales[i] for i in sigma.tolist())
            weights[name] = WeightQuant(tuple(quant.bits[i] for i in sigma.tolist()), scales)
    layer_channels, layer_bits = {}, {}
    for layer in analysis.layers:
        lp = plan.layers.get(layer.name)
        if lp is None:
            continue
        after = sum(1 for b in lp.bits if b > 0)
        if len(lp.bits) != layer.out_channels:
            raise PlanError(f"plan gives {len(lp.bits)} bit-widths for layer {layer.name!r}, "
                            f"which has {layer.out_channels} output channels")
        layer_channels[layer.name] = (layer.out_channels, after)
        layer_bits[layer.name] = dict(sorted(Counter(b for b in lp.bits if b > 0).items()))
    qdq = insert_qdq(pruned, weights, activations, embedding_quantization(analysis, pruned))
    if lean:
        qdq = compact(qdq)
    logger.info("export: %d groups pruned, %d reordered by width, %d layers quantized, %d activation sites",
                len(removal), len(channel_orders), len(weights), len(activations))
    return ExportResult(qdq.model, qdq, removal, layer_channels, layer_bits, channel_orders)
