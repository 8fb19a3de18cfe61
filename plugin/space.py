"""The search space, torch-free: which precisions are allowed, and decisions -> costed plans.

:class:`Precisions` is the one value that says which weight and activation bit-widths a run may
use. It is validated once, here: the CLI's ``--weight-bits`` / ``--act-bits``, the API's config
and every strategy take it from this class, and the widths it accepts are the ones the export
path can write (``graph_passes.bitwidths``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cost_models import CostInputs, LayerSpec, available_cost_models, get_cost_model
from graph_passes.bitwidths import ACTIVATION_BITS, BASELINE_BITS, PRUNED, WEIGHT_BITS
from graph_passes.errors import ConfigError, CostModelError, PlanError
from plugin.plan import ActivationPlan, CompressionPlan, GroupPlan, LayerPlan, sound_weight_scale

if TYPE_CHECKING:  # onnx and the analysis load only when a space is built (flag checks stay fast)
    from graph_passes.channel_groups import ChannelAnalysis
    from graph_passes.layers import ActivationProduct, EmbeddingTable, WeightLayer

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_PRECISIONS: tuple[int, ...] = (PRUNED, *WEIGHT_BITS)
DEFAULT_ACTIVATION_PRECISIONS: tuple[int, ...] = ACTIVATION_BITS
#: PACT's initial activation clip, used until calibration replaces it
DEFAULT_CLIP = 6.0


def _as_bits(values: Iterable[object] | str, flag: str) -> tuple[int, ...]:
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",")]
        if not values.strip() or any(not p for p in parts):
            raise ConfigError(f"{flag} {values!r}: give comma-separated bit-widths, e.g. {flag} 2,4,8")
        out = []
        for part in parts:
            try:
                out.append(int(part))
            except ValueError:
                raise ConfigError(f"{flag} {values!r}: {part!r} is not a whole number of bits; "
                                  f"e.g. {flag} 2,4,8") from None
        return tuple(out)
    out = []
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ConfigError(f"{flag}: {value!r} is not a whole number of bits")
        out.append(int(value.__index__()))  # type: ignore[attr-defined]
    return tuple(out)


def _check(values: tuple[int, ...], allowed: tuple[int, ...], flag: str, *, prune: bool) -> tuple[int, ...]:
    choices = ", ".join(str(b) for b in ((PRUNED,) if prune else ()) + allowed)
    if not values:
        raise ConfigError(f"{flag}: the set of bit-widths is empty; choose from {choices}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {','.join(map(str, values))}: a bit-width is listed twice")
    bad = [b for b in values if b not in allowed and not (prune and b == PRUNED)]
    if bad:
        extra = " (0 = prune is only a weight option)" if not prune and PRUNED in bad else ""
        raise ConfigError(f"{flag} {','.join(map(str, values))}: {', '.join(map(str, bad))} bit(s) cannot be "
                          f"exported; choose from {choices}{extra}")
    if all(b == PRUNED for b in values):
        raise ConfigError(f"{flag} {','.join(map(str, values))}: needs at least one non-zero width "
                          f"(0 only means 'prune'); e.g. {flag} 0,2,4,8")
    return tuple(sorted(values))


@dataclass(frozen=True)
class Precisions:
    """Allowed weight widths (0 = the channel is pruned) and activation widths, sorted.

    ``Precisions.parse("0,2,4,8", "8")`` validates user text; the constructor validates values.
    Errors are :class:`ConfigError` naming the flag (``--weight-bits`` / ``--act-bits``).
    """

    weights: tuple[int, ...] = DEFAULT_WEIGHT_PRECISIONS
    activations: tuple[int, ...] = DEFAULT_ACTIVATION_PRECISIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights",
                           _check(_as_bits(self.weights, "--weight-bits"), WEIGHT_BITS, "--weight-bits", prune=True))
        object.__setattr__(self, "activations",
                           _check(_as_bits(self.activations, "--act-bits"), ACTIVATION_BITS, "--act-bits",
                                  prune=False))

    @classmethod
    def parse(cls, weights: str | Iterable[int] | None = None,
              activations: str | Iterable[int] | None = None) -> Precisions:
        """From CLI text (``"0,2,4,8"``) or sequences; None keeps the default."""
        return cls(DEFAULT_WEIGHT_PRECISIONS if weights is None else _as_bits(weights, "--weight-bits"),
                   DEFAULT_ACTIVATION_PRECISIONS if activations is None else _as_bits(activations, "--act-bits"))

    @property
    def prunes(self) -> bool:
        """True when 0 bits (removing a channel) is allowed."""
        return PRUNED in self.weights

    @property
    def weight_widths(self) -> tuple[int, ...]:
        """The non-zero weight widths."""
        return tuple(b for b in self.weights if b != PRUNED)

    def describe(self) -> str:
        return f"weights {{{','.join(map(str, self.weights))}}}, activations {{{','.join(map(str, self.activations))}}}"


# ----------------------------------------------------------------------------- channel map


ChannelRef = tuple[str, int]  # (unit key: a group id or "layer:<name>", channel within it)


# ----------------------------------------------------------------------------- channel map


@dataclass
class Unit:
    """A block of alpha columns: one channel group, or the group-less channels of one layer."""

    key: str
    size: int
    group_id: str | None
    prunable: bool
    alpha_index: int = -1
    offset: int = 0


@dataclass
class AlphaSpec:
    precisions: tuple[int, ...]
    n_columns: int


@dataclass
class LayerInfo:
    """A weight layer with its cost spec, alpha columns and input channel references."""

    layer: WeightLayer
    spec: LayerSpec
    alpha_index: int
    columns: list[int]
    input_units: list[ChannelRef | None] | None
    input_index: dict[int, list[int]] | None
    input_fixed: int

    @property
    def name(self) -> str:
        return self.layer.name


@dataclass
class ChannelMap:
    """Which alpha column every output channel, input position and site position uses."""

    units: dict[str, Unit]
    alphas: list[AlphaSpec]
    layers: list[LayerInfo]
    site_units: dict[str, list[ChannelRef | None] | None]


def _atom_refs(analysis: ChannelAnalysis) -> dict[int, ChannelRef]:
    """Atom -> (group id, group channel), from the groups' non-constant members."""
    refs: dict[int, ChannelRef] = {}
    for group in analysis.groups:
        for member in group.members:
            layout = analysis.layouts.get(member.tensor)
            if member.kind == "constant" or layout is None:
                continue
            for pos, channel in zip(member.positions.tolist(), member.channels.tolist()):
                refs[int(layout.atoms[pos])] = (group.id, int(channel))
    return refs


def _tensor_refs(analysis: ChannelAnalysis, tensor: str, refs: dict[int, ChannelRef]) -> list[ChannelRef | None] | None:
    layout = analysis.layouts.get(tensor)
    return None if layout is None else [refs.get(int(a)) for a in layout.atoms.tolist()]


def _output_refs(analysis: ChannelAnalysis, layer: WeightLayer, refs: dict[int, ChannelRef]) -> list[ChannelRef]:
    found = _tensor_refs(analysis, layer.output, refs) or []
    if len(found) != layer.out_channels:
        raise PlanError(f"layer {layer.name!r}: output layout has {len(found)} channels, expected "
                        f"{layer.out_channels}; the analysis does not match the model")
    return [ref if ref is not None else (f"layer:{layer.name}", c) for c, ref in enumerate(found)]


def _units(analysis: ChannelAnalysis, outputs: dict[str, list[ChannelRef]]) -> dict[str, Unit]:
    groups = {g.id: g for g in analysis.groups}
    units: dict[str, Unit] = {}
    for layer in analysis.layers:
        for key, _ in outputs[layer.name]:
            if key in units:
                continue
            group = groups.get(key)
            units[key] = (Unit(key, group.size, key, group.prunable) if group is not None
                          else Unit(key, layer.out_channels, None, False))
    return units


def _components(units: dict[str, Unit], outputs: dict[str, list[ChannelRef]]) -> list[list[str]]:
    """Units tied by a layer whose outputs span them share one alpha (first-seen order)."""
    parent = {key: key for key in units}

    def find(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for refs in outputs.values():
        keys = list(dict.fromkeys(k for k, _ in refs))
        for other in keys[1:]:
            parent[find(other)] = find(keys[0])
    components: dict[str, list[str]] = {}
    for key in units:
        components.setdefault(find(key), []).append(key)
    return list(components.values())


def _layer_spec(analysis: ChannelAnalysis, layer: WeightLayer) -> LayerSpec:
    """Per-sample LayerSpec from the op rule's facts (WeightLayer.macs counts the static batch)."""
    spec = LayerSpec(layer.name, layer.cost_kind, layer.in_channels, layer.out_channels, tuple(layer.cost_kernel),
                     tuple(layer.cost_spatial), layer.groups if layer.cost_kind != "linear" else 1,
                     weights_of=layer.weight_owner)
    out_shape = analysis.graph.shape(layer.output) or []
    batch = out_shape[0] if out_shape else 1
    if batch and spec.macs * batch != layer.macs:
        logger.debug("layer %s: spec MACs %d x batch %d != analysis MACs %d", layer.name, spec.macs, batch, layer.macs)
    return spec


def _layer_info(analysis: ChannelAnalysis, layer: WeightLayer, outputs: list[ChannelRef],
                units: dict[str, Unit], refs: dict[int, ChannelRef]) -> LayerInfo:
    spec = _layer_spec(analysis, layer)
    columns = [units[key].offset + c for key, c in outputs]
    input_units = _tensor_refs(analysis, layer.input, refs)
    if input_units is not None and len(input_units) != spec.c_in:
        logger.debug("layer %s: input layout %d != c_in %d; C_in_eff fixed", layer.name, len(input_units), spec.c_in)
        input_units = None
    index: dict[int, list[int]] | None = None
    fixed = 0
    if input_units is not None:
        index = {}
        for ref in input_units:
            unit = units.get(ref[0]) if ref is not None else None
            if unit is None:
                fixed += 1
            else:
                index.setdefault(unit.alpha_index, []).append(unit.offset + ref[1])
    return LayerInfo(layer, spec, units[outputs[0][0]].alpha_index, columns, input_units, index, fixed)


def _share_owner_bits(layers: Mapping[str, LayerInfo], layer_bits: dict[str, Sequence[int]]) -> None:
    """A layer reading another's weight tensor (``WeightLayer.weight_owner``) takes the owner's
    per-channel bits: one quantized tensor serves both (their channels are tied, so the kept
    ones agree). In place."""
    for name, info in layers.items():
        owner = info.layer.weight_owner
        if owner is not None and owner in layer_bits and name in layer_bits:
            if tuple(layer_bits[name]) != tuple(layer_bits[owner]):
                logger.debug("layer %s shares %s's weight: takes its bits", name, owner)
            layer_bits[name] = tuple(layer_bits[owner])


def build_channel_map(analysis: ChannelAnalysis, weight_precisions: Sequence[int]) -> ChannelMap:
    """Units, shared alphas (0 bits only where every tied group is prunable) and layer infos."""
    refs = _atom_refs(analysis)
    outputs = {layer.name: _output_refs(analysis, layer, refs) for layer in analysis.layers}
    units = _units(analysis, outputs)
    alphas = []
    for component in _components(units, outputs):
        prunable = all(units[k].prunable for k in component)
        precisions = tuple(weight_precisions) if prunable else tuple(b for b in weight_precisions if b != 0)
        offset = 0
        for key in component:
            units[key].alpha_index, units[key].offset = len(alphas), offset
            offset += units[key].size
        alphas.append(AlphaSpec(precisions, offset))
    layers = [_layer_info(analysis, layer, outputs[layer.name], units, refs) for layer in analysis.layers]
    site_units = {site.tensor: _tensor_refs(analysis, site.tensor, refs) for site in analysis.sites}
    return ChannelMap(units, alphas, layers, site_units)


# ----------------------------------------------------------------------------- products, embeddings

#: the bit-width of every embedding table (one scale per row): the plan has no slot for them, so
#: the search does not choose it; the export and the engine use it, the ``size`` model counts it
EMBEDDING_BITS = BASELINE_BITS


@dataclass
class ProductInfo:
    """An activation x activation MatMul costed as an ``act_matmul`` LayerSpec: ``heads`` the
    channel references of its output's head axis (None: no head layout, one 'head'), each head
    owning ``spec.c_out // spec.groups`` output columns."""

    product: ActivationProduct
    spec: LayerSpec
    heads: list[ChannelRef | None] | None

    @property
    def name(self) -> str:
        return self.product.name


def _product_info(analysis: ChannelAnalysis, product: ActivationProduct,
                  refs: dict[int, ChannelRef]) -> ProductInfo:
    layout = analysis.layouts.get(product.output)
    rank = len(product.batch) + 3
    heads = None
    h = 1
    if layout is not None and 1 <= layout.axis < rank - 2 and product.batch[layout.axis - 1] == layout.size:
        h = layout.size
        heads = _tensor_refs(analysis, product.output, refs)
    other = int(np.prod(product.batch)) // h
    spec = LayerSpec(product.name, "act_matmul", h * product.k, h * product.n, (1, 1), (1, product.m * other), h)
    return ProductInfo(product, spec, heads)


def _embedding_spec(table: EmbeddingTable) -> LayerSpec:
    return LayerSpec(table.name, "embedding", table.dim, table.rows)


def _head_kept(ref: ChannelRef | None, kept: Mapping[str, set[int]]) -> bool:
    return ref is None or ref[0] not in kept or ref[1] in kept[ref[0]]


# ----------------------------------------------------------------------------- weight scales


def weight_scales(weight: np.ndarray, bits: Sequence[int], axis: int) -> tuple[float, ...]:
    """Per output channel ``max|W_c| / (2^(b-1) - 1)`` (symmetric, narrow range); 1.0 for a
    pruned channel or an all-zero one. The same formula as the engine's weight quantizer and the
    export (``graph_passes.qdq.quantize_weight``)."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0).reshape(np.shape(weight)[axis], -1)
    absmax = np.abs(w).max(axis=1) if w.size else np.zeros(len(w), np.float32)
    out = []
    for value, b in zip(absmax.tolist(), bits):
        scale = value / (2 ** (int(b) - 1) - 1) if b else 1.0
        out.append(float(scale) if b and np.isfinite(scale) and scale > 0 else 1.0)
    return tuple(out)


# ----------------------------------------------------------------------------- the space


class SearchSpace:
    """What a strategy may decide, and what any decision costs, without torch.

    Built from the analysis and one :class:`Precisions`. A *decision* is: per channel group the
    kept channels (only prunable groups may drop any, and every group keeps at least one); per
    weight layer one bit-width or one per output channel; per activation site a bit-width. The
    space turns it into a :class:`~plugin.plan.CompressionPlan` with the cost of the plan under
    every registered cost model (:meth:`plan`), and costs any plan (:meth:`cost_of_plan`).

    ``clips`` (activation clip per site tensor) start at 6.0, PACT's initial value; the engine's
    calibration replaces them (:meth:`set_clips`) so plans built afterwards carry calibrated clips.
    """

    def __init__(self, analysis: ChannelAnalysis, precisions: Precisions | None = None, *,
                 model_sha256: str = "0" * 64) -> None:
        self.analysis = analysis
        self.precisions = precisions or Precisions()
        self.model_sha256 = model_sha256
        self.map: ChannelMap = build_channel_map(analysis, self.precisions.weights)
        self.layers: dict[str, LayerInfo] = {info.name: info for info in self.map.layers}
        self.sites = {site.tensor: site for site in analysis.sites}
        self.clips: dict[str, float] = {tensor: DEFAULT_CLIP for tensor in self.sites}
        self._groups = {g.id: g for g in analysis.groups}
        self._baseline: CompressionPlan | None = None
        self._init_products()

    def _init_products(self) -> None:
        """Activation x activation MatMuls (their operands are sites) and embedding tables."""
        from graph_passes.layers import activation_products, embedding_tables

        refs = _atom_refs(self.analysis)
        self.products: dict[str, ProductInfo] = {
            p.name: _product_info(self.analysis, p, refs) for p in activation_products(self.analysis.graph)
            if p.a in self.sites and p.b in self.sites}
        self.embeddings: dict[str, EmbeddingTable] = {e.name: e for e in embedding_tables(self.analysis.graph)}

    # ------------------------------------------------------------------ facts

    @property
    def prunable_groups(self) -> list[str]:
        """Ids of the channel groups whose channels may be removed (0 bits allowed)."""
        if not self.precisions.prunes:
            return []
        return [u.group_id for u in self.map.units.values()
                if u.group_id is not None and self.map.alphas[u.alpha_index].precisions[0] == PRUNED]

    def group_size(self, group_id: str) -> int:
        return self.map.units[group_id].size

    def set_clips(self, clips: Mapping[str, float]) -> None:
        for tensor, value in clips.items():
            if tensor in self.clips and np.isfinite(value) and value > 0:
                self.clips[tensor] = float(value)
        self._baseline = None

    # ------------------------------------------------------------------ decisions -> plans

    def _keep_columns(self, kept: Mapping[str, Iterable[int]]) -> list[np.ndarray]:
        keep = [np.ones(a.n_columns, dtype=bool) for a in self.map.alphas]
        prunable = set(self.prunable_groups)
        for group_id, channels in kept.items():
            unit = self.map.units.get(group_id)
            if unit is None or unit.group_id is None:
                raise PlanError(f"decision names channel group {group_id!r}, which this model does not have")
            chosen = sorted({int(c) for c in channels})
            if any(not 0 <= c < unit.size for c in chosen):
                raise PlanError(f"group {group_id!r}: kept channels must be in [0, {unit.size}), got {chosen}")
            if not chosen:
                raise PlanError(f"group {group_id!r}: a group keeps at least one channel")
            if len(chosen) < unit.size and group_id not in prunable:
                raise PlanError(f"group {group_id!r} cannot be pruned ({self._reason(group_id)})")
            mask = np.zeros(unit.size, dtype=bool)
            mask[chosen] = True
            keep[unit.alpha_index][unit.offset:unit.offset + unit.size] = mask
        return keep

    def _reason(self, group_id: str) -> str:
        group = self._groups.get(group_id)
        if not self.precisions.prunes:
            return "the weight precisions do not include 0"
        return "; ".join(group.reasons) if group is not None and group.reasons else "blocked by the analysis"

    def assemble(self, layer_bits: Mapping[str, Sequence[int]], site_bits: Mapping[str, int], *,
                 scales: Mapping[str, Sequence[float] | None] | None = None,
                 clips: Mapping[str, float] | None = None,
                 metadata: Mapping[str, Any] | None = None,
                 sparsity: Mapping[str, float] | None = None) -> CompressionPlan:
        """A plan (without costs) from per-layer per-channel bits (0 = pruned) and site bits
        (``sparsity``: per layer its fine-grained sparsity, default 0).

        The groups' kept channels are read off the layers' bits; every layer of a group must
        agree on which channels are pruned."""
        clips = {**self.clips, **(clips or {})}
        column_kept: list[dict[int, bool]] = [{} for _ in self.map.alphas]
        layers = {}
        layer_bits = dict(layer_bits)
        _share_owner_bits(self.layers, layer_bits)
        if scales is not None:
            scales = {**scales, **{n: scales[i.layer.weight_owner] for n, i in self.layers.items()
                                   if i.layer.weight_owner and i.layer.weight_owner in scales}}
        for name, info in self.layers.items():
            bits = tuple(int(b) for b in layer_bits[name])
            if len(bits) != len(info.columns):
                raise PlanError(f"layer {name!r}: {len(bits)} bit-widths for {len(info.columns)} output channels")
            for column, b in zip(info.columns, bits):
                previous = column_kept[info.alpha_index].setdefault(column, b != PRUNED)
                if previous != (b != PRUNED):
                    raise PlanError(f"layer {name!r} keeps a channel another layer of its group prunes")
            layer_scales = None if scales is None else scales.get(name)
            layers[name] = LayerPlan(bits, None if layer_scales is None else tuple(sound_weight_scale(s) for s in layer_scales),
                                     float((sparsity or {}).get(name, 0.0)))
        groups = {}
        for unit in self.map.units.values():
            if unit.group_id is None:
                continue
            seen = column_kept[unit.alpha_index]
            kept = tuple(c for c in range(unit.size) if seen.get(unit.offset + c, True))
            groups[unit.group_id] = GroupPlan(unit.size, kept)
        activations = {}
        for tensor, site in self.sites.items():
            activations[tensor] = ActivationPlan(int(site_bits[tensor]), not site.non_negative,
                                                 max(float(clips[tensor]), 1e-6))
        return CompressionPlan(self.model_sha256, groups, layers, activations, metadata=dict(metadata or {}))

    def plan(self, *, kept: Mapping[str, Iterable[int]] | None = None,
             layer_bits: Mapping[str, int | Sequence[int]] | None = None,
             site_bits: int | Mapping[str, int] | None = None,
             weights: Mapping[str, np.ndarray] | None = None,
             clips: Mapping[str, float] | None = None,
             metadata: Mapping[str, Any] | None = None,
             cost_models: Sequence[str] | None = None,
             sparsity: Mapping[str, float] | None = None) -> CompressionPlan:
        """The plan of a decision, with costs. Unset parts take the widest allowed width and
        keep every channel. ``weights`` (initializer name -> array; default: the model's own)
        give the per-channel weight scales. ``sparsity``: per layer a fine-grained (unstructured)
        sparsity in ``[0, 0.99]`` (:class:`~plugin.plan.LayerPlan` states which weights are zero);
        only layers for which :meth:`supports_sparsity` holds may have one."""
        keep = self._keep_columns(kept or {})
        widest_w, widest_a = max(self.precisions.weight_widths), max(self.precisions.activations)
        per_layer: dict[str, tuple[int, ...]] = {}
        for name, info in self.layers.items():
            given = (layer_bits or {}).get(name, widest_w)
            bits = [int(given)] * len(info.columns) if isinstance(given, (int, np.integer)) else [int(b) for b in given]
            if len(bits) != len(info.columns):
                raise PlanError(f"layer {name!r}: {len(bits)} bit-widths for {len(info.columns)} output channels")
            for b in bits:
                if b != PRUNED and b not in self.precisions.weight_widths:
                    raise PlanError(f"layer {name!r}: {b} bits is not an allowed weight width "
                                    f"({self.precisions.describe()})")
            column_keep = keep[info.alpha_index]
            per_layer[name] = tuple(b if column_keep[col] else PRUNED for b, col in zip(bits, info.columns))
        _share_owner_bits(self.layers, per_layer)
        if isinstance(site_bits, Mapping):
            sites = {t: int(site_bits.get(t, widest_a)) for t in self.sites}
        else:
            sites = {t: int(widest_a if site_bits is None else site_bits) for t in self.sites}
        for tensor, b in sites.items():
            if b not in self.precisions.activations:
                raise PlanError(f"activation {tensor!r}: {b} bits is not an allowed activation width "
                                f"({self.precisions.describe()})")
        for name, fraction in (sparsity or {}).items():
            if name not in self.layers:
                raise PlanError(f"sparsity names layer {name!r}, which this model does not have")
            if fraction and not self.supports_sparsity(name):
                raise PlanError(f"layer {name!r}: fine-grained sparsity needs a plain (groups 1) or depthwise conv or "
                                "a linear layer whose input channel layout is known; leave it dense")
        scales = self.scales(per_layer, weights)
        plan = self.assemble(per_layer, sites, scales=scales, clips=clips, metadata=metadata, sparsity=sparsity)
        return self.with_costs(plan, cost_models)

    def supports_sparsity(self, name: str) -> bool:
        """Whether layer ``name`` may take fine-grained sparsity: a depthwise conv, or a conv of
        groups 1 or a linear layer (not a recurrent one) whose input positions are known (so the engine, the export and
        the cost models count the same kept inputs)."""
        info = self.layers[name]
        if any(i.layer.weight == info.layer.weight for n, i in self.layers.items() if n != name):
            return False  # a shared weight: one sparsity mask would serve every user
        if info.spec.kind == "depthwise":
            return True
        return info.spec.kind in ("conv", "linear") and info.spec.groups == 1 and info.input_units is not None

    def scales(self, layer_bits: Mapping[str, Sequence[int]],
               weights: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[float, ...]]:
        """Per-channel weight scales of ``layer_bits`` for ``weights`` (default: the model's)."""
        out = {}
        for name, bits in layer_bits.items():
            layer = self.layers[name].layer
            w = weights.get(layer.weight) if weights is not None else None
            if w is None:
                w = self.analysis.graph.constant(layer.weight)
            if w is None:
                continue
            out[name] = weight_scales(w, bits, layer.weight_out_axis)
        return out

    def uniform_plan(self, bits: int, act_bits: int | None = None, *, weights: Mapping[str, np.ndarray] | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """Every weight at ``bits`` and every activation at ``act_bits`` (default ``bits``, or the
        widest allowed), nothing pruned."""
        if act_bits is None:
            act_bits = bits if bits in self.precisions.activations else max(self.precisions.activations)
        return self.plan(layer_bits={n: bits for n in self.layers}, site_bits=act_bits, weights=weights,
                         metadata={"strategy": f"uniform-w{bits}a{act_bits}", **(metadata or {})},
                         cost_models=cost_models)

    def baseline_plan(self) -> CompressionPlan:
        """All weights and activations at 8 bits, nothing pruned: the 'before' of every relative
        cost (built regardless of the allowed precisions)."""
        if self._baseline is None:
            layers = {n: (BASELINE_BITS,) * len(info.columns) for n, info in self.layers.items()}
            sites = {t: BASELINE_BITS for t in self.sites}
            self._baseline = self.assemble(layers, sites, metadata={"strategy": "baseline-8bit"})
        return self._baseline

    def minimal_plan(self, cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """The cheapest plan the space holds: one channel per prunable group, lowest widths."""
        lowest_w, lowest_a = min(self.precisions.weight_widths), min(self.precisions.activations)
        kept = {g: [0] for g in self.prunable_groups}
        return self.plan(kept=kept, layer_bits={n: lowest_w for n in self.layers}, site_bits=lowest_a,
                         metadata={"strategy": "minimal"}, cost_models=cost_models)

    # ------------------------------------------------------------------ costs

    def plan_pairs(self, plan: CompressionPlan) -> list[tuple[LayerSpec, CostInputs]]:
        """(layer spec, discrete cost inputs) per weight layer of ``plan``."""
        kept = {gid: set(g.kept) for gid, g in plan.groups.items()}
        pairs = []
        for name, info in self.layers.items():
            layer_plan = plan.layers.get(name)
            site_plan = plan.activations.get(info.layer.input)
            if layer_plan is None or site_plan is None:
                raise PlanError(f"plan has no entry for layer {name!r} or its input {info.layer.input!r}; "
                                "was it made for another model?")
            c_in = float(info.spec.c_in)
            if info.input_units is not None:
                c_in = float(sum(1 for unit in info.input_units
                                 if unit is None or unit[0] not in kept or unit[1] in kept[unit[0]]))
            pairs.append((info.spec, CostInputs.from_bits(layer_plan.bits, site_plan.bits, c_in,
                                                          sparsity=layer_plan.sparsity)))
        return pairs

    def extra_pairs(self, plan: CompressionPlan) -> list[tuple[LayerSpec, CostInputs]]:
        """(spec, discrete cost inputs) of what is not a weight layer: each activation x
        activation MatMul (``act_matmul``: operand B's bits per column, 0 for a pruned head's
        columns, operand A's as the activation) and each embedding table (``embedding``, every
        row at :data:`EMBEDDING_BITS`)."""
        kept = {gid: set(g.kept) for gid, g in plan.groups.items()}
        pairs = []
        for info in self.products.values():
            a_plan, b_plan = plan.activations.get(info.product.a), plan.activations.get(info.product.b)
            if a_plan is None or b_plan is None:
                raise PlanError(f"plan has no entry for the operands of {info.name!r}; was it made for another model?")
            per_head = info.spec.c_out // info.spec.groups
            heads = info.heads or [None] * info.spec.groups
            bits = [b_plan.bits if _head_kept(ref, kept) else PRUNED for ref in heads for _ in range(per_head)]
            pairs.append((info.spec, CostInputs.from_bits(bits, a_plan.bits, float(info.spec.c_in),
                                                          w_precisions=(PRUNED, *ACTIVATION_BITS),
                                                          a_precisions=ACTIVATION_BITS)))
        for table in self.embeddings.values():
            pairs.append((_embedding_spec(table), CostInputs.from_bits(
                [EMBEDDING_BITS] * table.rows, BASELINE_BITS, float(table.dim),
                w_precisions=(EMBEDDING_BITS,), a_precisions=(BASELINE_BITS,))))
        return pairs

    def embedding_cost(self, name: str = "size") -> float:
        """The (fixed) cost of the embedding tables under cost model ``name``."""
        model = get_cost_model(name)
        return float(sum(float(model(_embedding_spec(t), CostInputs.from_bits(
            [EMBEDDING_BITS] * t.rows, BASELINE_BITS, float(t.dim), w_precisions=(EMBEDDING_BITS,),
            a_precisions=(BASELINE_BITS,)))) for t in self.embeddings.values()))

    def cost_of_plan(self, plan: CompressionPlan, name: str = "size") -> float:
        """The cost of a discrete plan (a number in the cost model's unit): the weight layers'
        (:meth:`plan_pairs`) plus the activation products' and embeddings' (:meth:`extra_pairs`)."""
        return float(get_cost_model(name).total(self.plan_pairs(plan) + self.extra_pairs(plan)))

    def costs(self, plan: CompressionPlan, names: Sequence[str] | None = None) -> dict[str, float]:
        """``plan``'s cost under ``names`` (default: every registered model; one that cannot
        cost this model is skipped with a warning)."""
        out = {}
        for name in names if names is not None else available_cost_models():
            try:
                out[name] = self.cost_of_plan(plan, name)
            except CostModelError as error:
                logger.warning("cost model %s skipped: %s", name, error)
        return out

    def cost_before(self, name: str = "size") -> float:
        """Cost of the uncompressed model (all 8-bit, nothing pruned)."""
        return self.cost_of_plan(self.baseline_plan(), name)

    def with_costs(self, plan: CompressionPlan, names: Sequence[str] | None = None) -> CompressionPlan:
        """``plan`` with its costs before (all 8-bit) and after under ``names`` (default: all)."""
        after = self.costs(plan, names)
        before = self.costs(self.baseline_plan(), list(after))
        after = {k: v for k, v in after.items() if k in before}
        return CompressionPlan(plan.model_sha256, plan.groups, plan.layers, plan.activations,
                               before, after, plan.metadata)  # layers keep their sparsity

    def describe_plan(self, plan: CompressionPlan, name: str = "size") -> str:
        before, after = plan.cost_before.get(name), plan.cost_after.get(name)
        pruned = sum(len(g.pruned) for g in plan.groups.values())
        total = sum(g.size for g in plan.groups.values())
        ratio = f"{after / before:.3f} of 8-bit" if before and after is not None else "n/a"
        return f"{name} {ratio}, {pruned}/{total} group channels pruned"


__all__ = ["DEFAULT_ACTIVATION_PRECISIONS", "DEFAULT_WEIGHT_PRECISIONS", "EMBEDDING_BITS", "ChannelMap", "LayerInfo",
           "Precisions", "ProductInfo", "SearchSpace", "Unit", "build_channel_map", "weight_scales"]
