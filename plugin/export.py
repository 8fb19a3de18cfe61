"""Apply a CompressionPlan to the ONNX graph: remove pruned channels, quantize, validate.

The ONNX graph is the source of truth: the output is the input graph (normalised), with the
pruned channels physically removed (``graph_passes.prune``), weights stored as packed
per-channel INT8/INT4/INT2 with DequantizeLinear, and Q/DQ on every activation site that the
plan quantizes (``graph_passes.qdq``). Nothing is re-exported from torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx

from graph_passes.channel_groups import ChannelAnalysis
from graph_passes.errors import PlanError
from graph_passes.prune import prune_channels
from graph_passes.qdq import ActivationQuant, QdqResult, WeightQuant, insert_qdq

from .plan import CompressionPlan

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    model: onnx.ModelProto
    qdq: QdqResult
    removal: dict[str, list[int]]
    layer_channels: dict[str, tuple[int, int]]  # layer -> (channels before, after)
    layer_bits: dict[str, dict[int, int]]  # layer -> {bits: channels}


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


def export_plan(model: onnx.ModelProto, analysis: ChannelAnalysis, plan: CompressionPlan) -> ExportResult:
    """``model``: the normalised model (with fine-tuned weights written back) that ``analysis``
    describes. Returns the compressed, not yet validated, model."""
    removal = removal_of(plan, analysis)
    pruned = prune_channels(model, analysis, removal) if removal else model
    weights, activations = quantization_of(plan, analysis, pruned)
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
    qdq = insert_qdq(pruned, weights, activations)
    logger.info("export: %d groups pruned, %d layers quantized, %d activation sites",
                len(removal), len(weights), len(activations))
    return ExportResult(qdq.model, qdq, removal, layer_channels, layer_bits)
