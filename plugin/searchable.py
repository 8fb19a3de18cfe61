"""SearchableModel: the bridged torch module wrapped for the joint pruning + mixed-precision search.

Weights: every weight layer's weight gets a :class:`SearchableWeightQuantizer` parametrization.
Its NAS logits live in a :class:`SharedAlpha` shared by every layer of the channel group, one
column per group channel (several output channels of a grouped conv may share a column). A
layer whose output channels span several groups (a depthwise conv over a Concat) ties those
groups into one alpha; channels in no group get private columns. The 0-bit (pruned) option
exists only where every tied group is prunable.

Biases: gated by the keep probability ``1 - theta_0`` of their channel in the search and by the
kept mask once frozen, so a pruned channel outputs exactly zero. At the start, weights are
rescaled by ``1 / sum_{b != 0} theta_b`` (DESIGN) and biases by the same factor, so the initial
mixture computes the original function up to quantization error.

Activations: one :class:`SearchableActivationQuantizer` per activation site (a tensor read by
weight layers), applied by forward pre-hooks on the consumer modules; all consumers of a site
share it. Only the weight layers' inputs are quantized: the exporter must put the site's Q/DQ on
those edges. Once frozen, a site also zeroes the positions of pruned channels, which is exactly
what structural pruning computes (the channel-group oracle).

Public surface (PLiNIO style): :meth:`cost`, :meth:`cost_of_plan`, :meth:`nas_parameters`,
:meth:`net_parameters`, :meth:`set_temperature`, :meth:`discretise`, :meth:`freeze`,
:meth:`summary`, :meth:`materialised_bridge` (fake-quantized weights for write-back).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cost_models import CostInputs, LayerSpec, available_cost_models, get_cost_model
from graph_passes.channel_groups import ChannelAnalysis, analyse
from graph_passes.layers import WeightLayer
from graph_passes.errors import CostModelError, PlanError
from plugin.bridge import BridgedModel, check_parity, convert
from plugin.plan import ActivationPlan, CompressionPlan, GroupPlan, LayerPlan, sha256_hex
from plugin.quantizers import (
    SearchableActivationQuantizer,
    SearchableWeightQuantizer,
    SharedAlpha,
    nas_parameters as _nas_parameters,
    net_parameters as _net_parameters,
    quantize_weight_per_channel,
    set_temperature as _set_temperature,
)
from plugin.search import SearchConfig, iterate_batches

logger = logging.getLogger(__name__)

BASELINE_BITS = 8
_CALIB_QUANTILE = 0.999
_CALIB_MAX_ELEMENTS = 1 << 20

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


def _flat_pair(dims: Sequence[int]) -> tuple[int, int]:
    dims = [int(d) for d in dims]
    if not dims:
        return (1, 1)
    return tuple(dims) if len(dims) <= 2 else (1, int(np.prod(dims)))  # type: ignore[return-value]


def _layer_spec(analysis: ChannelAnalysis, layer: WeightLayer) -> LayerSpec:
    """Per-sample LayerSpec (WeightLayer.macs counts the static batch)."""
    out_shape = analysis.graph.shape(layer.output) or []
    if layer.op_type in ("Gemm", "MatMul"):
        positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        spec = LayerSpec(layer.name, "linear", layer.in_channels, layer.out_channels, (1, 1), (1, positions))
    else:
        spatial = (analysis.graph.shape(layer.input) or [])[2:] if layer.op_type == "ConvTranspose" else out_shape[2:]
        kind = "depthwise" if layer.is_depthwise else "conv"
        spec = LayerSpec(layer.name, kind, layer.in_channels, layer.out_channels, _flat_pair(layer.kernel),
                         _flat_pair(spatial), layer.groups)
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


class _BiasGate(nn.Module):
    """Bias parametrization: ``b * (1 - theta_0)`` in the search, ``b * kept`` once frozen."""

    def __init__(self, quantizer: SearchableWeightQuantizer) -> None:
        super().__init__()
        self._quantizer = [quantizer]  # a list: not registered twice

    def forward(self, bias: Tensor) -> Tensor:
        q = self._quantizer[0]
        if q.frozen_bits is not None:
            return bias * (q.frozen_bits != 0).to(bias.dtype).reshape(bias.shape)
        if 0 not in q.precisions:
            return bias
        return bias * (1 - q.theta()[q.precisions.index(0)]).to(bias.dtype).reshape(bias.shape)


class SiteQuantizer(nn.Module):
    """The quantizer of one activation site plus, once frozen, the mask of kept channels."""

    def __init__(self, tensor: str, quantizer: SearchableActivationQuantizer, axis: int | None) -> None:
        super().__init__()
        self.tensor = tensor
        self.quantizer = quantizer
        self.axis = axis
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.quantizer(x)
        if self.mask is not None and self.axis is not None:
            shape = [1] * y.ndim
            shape[self.axis % y.ndim] = -1
            y = y * self.mask.to(y.dtype).reshape(shape)
        return y


@dataclass
class _Layer:
    info: LayerInfo
    quantizer: SearchableWeightQuantizer
    owner: str
    weight_attr: str
    bias_attr: str | None
    fold_factor: Tensor | None = None


class SearchableModel(nn.Module):
    """A bridged model wrapped with searchable quantizers keyed by the analysis' groups and sites.

    ``bridged.module`` is modified in place (parametrizations and hooks); a deep copy taken
    before that is kept as the distillation teacher. Build with :meth:`build` from a normalised
    ONNX model, or directly from an analysis and a bridged model.
    """

    def __init__(self, model: onnx.ModelProto, analysis: ChannelAnalysis, bridged: BridgedModel,
                 config: SearchConfig | None = None, *, model_sha256: str | None = None) -> None:
        super().__init__()
        self.config = config or SearchConfig()
        self.model_sha256 = model_sha256 or sha256_hex(model.SerializeToString())
        self.analysis = analysis
        self.bridged = bridged
        self._teacher = [copy.deepcopy(bridged.module).eval()]
        self.net = bridged.module.eval()
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {t.name for t in model.graph.initializer}]
        self.map: ChannelMap = build_channel_map(analysis, self.config.weight_precisions)
        self.alphas = nn.ModuleList(SharedAlpha(a.precisions, a.n_columns) for a in self.map.alphas)
        self._temperature = float(self.config.temperature)
        self._layers = {info.name: self._wrap_layer(info) for info in self.map.layers}
        self.sites = nn.ModuleDict()
        self._site_key: dict[str, str] = {}
        self._hooks: list[tuple[str, SiteQuantizer, Any]] = []
        self._wrap_sites()
        self.calibrated = self.config.init_clip is not None
        self._baseline: CompressionPlan | None = None
        if self.config.prune_init > 0:
            self._init_prune_logits(self.config.prune_init)
        self._rescale_initial()
        self.set_temperature(self._temperature)
        logger.info("searchable model: %d layers, %d alphas, %d activation sites",
                    len(self._layers), len(self.alphas), len(self.sites))

    @classmethod
    def build(cls, model: onnx.ModelProto, config: SearchConfig | None = None, *,
              model_sha256: str | None = None, analysis: ChannelAnalysis | None = None) -> SearchableModel:
        """Analyse (unless given), bridge and parity-check a *normalised* model, then wrap it."""
        analysis = analysis or analyse(model)
        bridged = convert(model)
        check_parity(model, bridged)
        return cls(model, analysis, bridged, config, model_sha256=model_sha256)

    # ------------------------------------------------------------------ wrapping

    def _param_owner(self, initializer: str, layer: str) -> tuple[str, str]:
        qualified = self.bridged.param_map.get(initializer)
        params = dict(self.net.named_parameters())
        if qualified is None or qualified not in params:
            raise PlanError(f"layer {layer!r}: initializer {initializer!r} is not a trainable torch "
                            "parameter after bridging; this layer cannot be searched")
        owner, _, attr = qualified.rpartition(".")
        return owner, attr

    def _wrap_layer(self, info: LayerInfo) -> _Layer:
        layer = info.layer
        owner, attr = self._param_owner(layer.weight, layer.name)
        module = self.net.get_submodule(owner)
        ch_axis = 1 if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d) else 0
        if ch_axis == 1 and layer.groups != 1:
            raise PlanError(f"layer {layer.name!r}: grouped ConvTranspose is not supported by the search")
        alpha = self.alphas[info.alpha_index]
        quantizer = SearchableWeightQuantizer(
            layer.out_channels, alpha.precisions, ch_axis=ch_axis, alpha=alpha,
            channel_to_group_index=torch.as_tensor(info.columns), temperature=self._temperature)
        parametrize.register_parametrization(module, attr, quantizer)
        bias_attr = None
        if layer.bias is not None and layer.bias in self.bridged.param_map:
            bias_owner, bias_attr = self._param_owner(layer.bias, layer.name)
            if bias_owner != owner:
                raise PlanError(f"layer {layer.name!r}: weight and bias live in different modules")
            parametrize.register_parametrization(module, bias_attr, _BiasGate(quantizer))
        return _Layer(info, quantizer, owner, attr, bias_attr)

    def _wrap_sites(self) -> None:
        precisions = self.config.site_precisions
        init_clip = self.config.init_clip or 6.0
        for index, site in enumerate(self.analysis.sites):
            key = f"a{index}"
            quantizer = SearchableActivationQuantizer(precisions, signed=not site.non_negative,
                                                      init_clip=init_clip, temperature=self._temperature)
            layout = self.analysis.layouts.get(site.tensor)
            self.sites[key] = SiteQuantizer(site.tensor, quantizer, None if layout is None else layout.axis)
            self._site_key[site.tensor] = key
            for consumer in site.consumers:
                if consumer in self._layers:
                    self._hook(self._layers[consumer].owner, self.sites[key])

    def _hook(self, owner: str, site: SiteQuantizer) -> None:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (site(args[0]), *args[1:])

        handle = self.net.get_submodule(owner).register_forward_pre_hook(pre_hook)
        self._hooks.append((owner, site, handle))

    @torch.no_grad()
    def _init_prune_logits(self, strength: float) -> None:
        """Break the symmetry between the channels of a group before the search starts.

        With equal initial logits the channels of a group get the same cost gradient and tend
        to cross the pruning threshold together. Here each column's 0-bit logit starts at
        ``strength * (1 - r)`` (clipped to [-strength, strength]), ``r`` being the column's mean
        |W| relative to its layer's mean (averaged over the group's layers; BatchNorm is already
        folded, so this is the network-slimming criterion): weak channels start likelier to be
        pruned, strong ones less. Weights are rescaled afterwards, so the expected effective
        weights still equal the FP32 ones at the start.
        """
        sums = [torch.zeros(a.n_columns) for a in self.map.alphas]
        counts = [torch.zeros(a.n_columns) for a in self.map.alphas]
        for entry in self._layers.values():
            index = entry.info.alpha_index
            if 0 not in self.map.alphas[index].precisions:
                continue
            module = self.net.get_submodule(entry.owner)
            weight = module.parametrizations[entry.weight_attr].original.detach().float().cpu()
            axis = entry.quantizer.ch_axis
            norms = weight.abs().movedim(axis, 0).reshape(weight.shape[axis], -1).mean(dim=1)
            mean = norms.mean()
            if not torch.isfinite(mean) or mean <= 0:
                continue
            columns = torch.as_tensor(entry.info.columns)
            sums[index].index_add_(0, columns, norms / mean)
            counts[index].index_add_(0, columns, torch.ones(len(columns)))
        for index, alpha in enumerate(self.alphas):
            if 0 not in alpha.precisions or not bool((counts[index] > 0).any()):
                continue
            rel = torch.where(counts[index] > 0, sums[index] / counts[index].clamp_min(1), torch.ones(1))
            zero = alpha.precisions.index(0)
            alpha.alpha[zero] += (strength * (1 - rel)).clamp(-strength, strength).to(alpha.alpha.dtype)

    @torch.no_grad()
    def _rescale_initial(self) -> None:
        seen: set[int] = set()
        for entry in self._layers.values():
            module = self.net.get_submodule(entry.owner)
            weight = module.parametrizations[entry.weight_attr].original
            if id(weight) in seen:
                logger.warning("layer %s shares its weight with another layer; rescaled once", entry.info.name)
                continue
            seen.add(id(weight))
            factor = entry.quantizer.rescale_factor()
            entry.quantizer.rescale_weight_(weight)
            if entry.bias_attr is not None:
                bias = module.parametrizations[entry.bias_attr].original
                bias.mul_(factor.to(bias.dtype).reshape(bias.shape))

    @torch.no_grad()
    def calibrate(self, data: Any, batch_size: int = 64, max_batches: int = 4) -> None:
        """Set every activation clip to the 99.9th percentile of |x| under the FP32 teacher
        (``data``: a Dataset or batches, as for :func:`plugin.search.run_search`)."""
        teacher = self._teacher_module()
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        batches = iterate_batches(data, self.input_names, batch_size, 0, device, max_batches)
        found: dict[str, float] = {}
        handles = []
        def observe(key: str, x: Tensor) -> None:
            found[key] = max(found.get(key, 0.0), _quantile(x))

        for owner, site, _ in self._hooks:
            handles.append(teacher.get_submodule(owner).register_forward_pre_hook(
                lambda _m, args, key=site.tensor: observe(key, args[0])))
        try:
            for inputs, _labels in batches:
                teacher(*inputs)
        finally:
            for handle in handles:
                handle.remove()
        for site in self.sites.values():
            if found.get(site.tensor, 0.0) > 0:
                site.quantizer.clip.fill_(found[site.tensor])
        self.calibrated = True
        logger.info("calibrated %d activation clips", len(found))

    # ------------------------------------------------------------------ running

    def _teacher_module(self) -> nn.Module:
        teacher = self._teacher[0]
        device = next((p.device for p in self.net.parameters()), torch.device("cpu"))
        if next((p.device for p in teacher.parameters()), device) != device:
            teacher.to(device)
        return teacher

    def forward(self, *inputs: Tensor) -> Any:
        return self.net(*inputs)

    @torch.no_grad()
    def teacher_outputs(self, *inputs: Tensor) -> Any:
        """Outputs of the original FP32 model (the distillation target)."""
        return self._teacher_module()(*inputs)

    def nas_parameters(self) -> list[nn.Parameter]:
        return _nas_parameters(self)

    def net_parameters(self) -> list[nn.Parameter]:
        return _net_parameters(self)

    def set_temperature(self, temperature: float) -> None:
        self._temperature = float(temperature)
        _set_temperature(self, temperature)

    @property
    def temperature(self) -> float:
        return self._temperature

    def thetas(self) -> list[Tensor]:
        return [alpha.theta(self._temperature) for alpha in self.alphas]

    # ------------------------------------------------------------------ cost

    def prune_probabilities(self) -> list[float]:
        """theta_0 of every prunable column (the candidate prune thresholds of the budget)."""
        out: list[float] = []
        for alpha, theta in zip(self.alphas, self.thetas()):
            if 0 in alpha.precisions:
                out.extend(theta[alpha.precisions.index(0)].detach().cpu().tolist())
        return out

    def _keep_probabilities(self) -> list[Tensor]:
        out = []
        for alpha, theta in zip(self.alphas, self.thetas()):
            zero = alpha.precisions.index(0) if 0 in alpha.precisions else None
            out.append(torch.ones_like(theta[0]) if zero is None else 1 - theta[zero])
        return [k.detach() for k in out]

    def _c_in_eff(self, info: LayerInfo, keep: list[Tensor]) -> Tensor | float:
        if info.input_index is None:
            return float(info.spec.c_in)
        total: Tensor | float = float(info.input_fixed)
        for alpha_index, columns in info.input_index.items():
            total = total + keep[alpha_index][torch.as_tensor(columns)].sum()
        return total

    def cost(self, name: str | None = None) -> Tensor:
        """Expected cost under theta (differentiable; the cost model's unit, not normalised)."""
        model = get_cost_model(name or self.config.cost_model)
        keep = self._keep_probabilities()
        pairs = []
        for entry in self._layers.values():
            site = self.sites[self._site_key[entry.info.layer.input]].quantizer
            inputs = CostInputs(entry.quantizer.precisions, entry.quantizer.theta(), site.precisions,
                                site.theta(), self._c_in_eff(entry.info, keep))
            pairs.append((entry.info.spec, inputs))
        total = model.total(pairs)
        return total if isinstance(total, Tensor) else torch.tensor(float(total))

    def _plan_pairs(self, plan: CompressionPlan) -> list[tuple[Any, CostInputs]]:
        kept = {gid: set(g.kept) for gid, g in plan.groups.items()}
        pairs = []
        for entry in self._layers.values():
            info = entry.info
            layer_plan = plan.layers.get(info.name)
            site_plan = plan.activations.get(info.layer.input)
            if layer_plan is None or site_plan is None:
                raise PlanError(f"plan has no entry for layer {info.name!r} or its input {info.layer.input!r}")
            c_in = float(info.spec.c_in)
            if info.input_units is not None:
                c_in = float(sum(1 for unit in info.input_units
                                 if unit is None or unit[0] not in kept or unit[1] in kept[unit[0]]))
            pairs.append((info.spec, CostInputs.from_bits(layer_plan.bits, site_plan.bits, c_in)))
        return pairs

    def cost_of_plan(self, plan: CompressionPlan, name: str | None = None) -> float:
        """The cost of a discrete plan (a number in the cost model's unit)."""
        return float(get_cost_model(name or self.config.cost_model).total(self._plan_pairs(plan)))

    def _all_costs(self, plan: CompressionPlan, names: Sequence[str] | None) -> dict[str, float]:
        out = {}
        for name in names if names is not None else available_cost_models():
            try:
                out[name] = self.cost_of_plan(plan, name)
            except CostModelError as error:
                logger.warning("cost model %s skipped: %s", name, error)
        return out

    def cost_before(self, name: str | None = None) -> float:
        """Cost of the uncompressed model: all weights and activations at 8 bits, nothing pruned."""
        return self.cost_of_plan(self._baseline_plan(), name)

    # ------------------------------------------------------------------ plans

    def _column_bits_argmax(self, prune_threshold: float = 0.5) -> list[Tensor]:
        """Per alpha, the discrete bit-width per column; a prunable group keeps >= 1 channel.

        ``keep_first`` (default): prune a column when ``theta_0 > 1/2`` (pruning likelier than
        keeping at any width), else take its most likely non-zero width, so the plan keeps about
        ``C_out_eff`` channels. ``argmax``: the plain argmax of the paper, which prunes a column
        whose theta_0 merely beats each width on its own (e.g. 0.3 vs 0.25/0.25/0.2).
        """
        out = []
        for alpha, theta in zip(self.alphas, self.thetas()):
            theta = theta.detach().cpu()
            precisions = torch.tensor(alpha.precisions)
            bits = precisions[theta.argmax(dim=0)]
            if 0 in alpha.precisions and self.config.discretisation == "keep_first":
                zero = alpha.precisions.index(0)
                widths = theta.clone()
                widths[zero] = -1.0
                bits = torch.where(theta[zero] > prune_threshold, 0, precisions[widths.argmax(dim=0)])
            if 0 in alpha.precisions:
                self._keep_one_per_unit(alpha_index=len(out), theta=theta, bits=bits, precisions=precisions)
            out.append(bits)
        return out

    def _keep_one_per_unit(self, alpha_index: int, theta: Tensor, bits: Tensor, precisions: Tensor) -> None:
        """Each group keeps at least round(C_out_eff) of its channels (and at least one).

        Thresholding theta_0 channel by channel can empty a group whose channels all sit just
        above the threshold (measured: a stage feeding a pool and a linear layer, theta_0 = 0.65
        on every channel, pruned to one channel, accuracy 11%), while the search's expected cost
        counted C_out_eff = sum_c (1 - theta_0) channels. Channels are given back in order of
        their keep probability, at their most likely non-zero width.
        """
        zero = int((precisions == 0).nonzero()[0])
        for unit in self.map.units.values():
            if unit.alpha_index != alpha_index:
                continue
            cols = torch.arange(unit.offset, unit.offset + unit.size)
            keep_prob = 1 - theta[zero, cols]
            need = max(1, int(round(float(keep_prob.sum()))))
            kept = int((bits[cols] != 0).sum())
            if kept >= need:
                continue
            pruned = cols[bits[cols] == 0]
            order = pruned[torch.argsort(keep_prob[pruned - unit.offset], descending=True)]
            for col in order[: need - kept].tolist():
                masked = theta[:, col].clone()
                masked[zero] = -1.0
                bits[col] = precisions[int(masked.argmax())]
            logger.debug("group %s: kept %d channels (C_out_eff %.1f) instead of %d", unit.key, need,
                         float(keep_prob.sum()), kept)

    def _plan_from_column_bits(self, column_bits: list[Tensor], site_bits: dict[str, int],
                               metadata: dict[str, Any] | None, with_scales: bool = True) -> CompressionPlan:
        """A plan without costs (see :meth:`_with_costs`)."""
        layers, groups = {}, {}
        for entry in self._layers.values():
            info = entry.info
            bits = column_bits[info.alpha_index][torch.as_tensor(info.columns)]
            scales = None
            if with_scales:
                weight = self._raw(entry, entry.weight_attr).detach()
                q = quantize_weight_per_channel(weight, bits, entry.quantizer.ch_axis)
                scales = tuple(float(s) for s in q.scale.cpu())
            layers[info.name] = LayerPlan(tuple(int(b) for b in bits), scales)
        for unit in self.map.units.values():
            if unit.group_id is None:
                continue
            cols = column_bits[unit.alpha_index][unit.offset:unit.offset + unit.size]
            groups[unit.group_id] = GroupPlan(unit.size, tuple(int(i) for i in (cols != 0).nonzero().flatten()))
        activations = {}
        for site in self.sites.values():
            q = site.quantizer
            clip = max(float(q.clip.detach().abs()), 1e-6)
            activations[site.tensor] = ActivationPlan(int(site_bits[site.tensor]), q.signed, clip)
        return CompressionPlan(self.model_sha256, groups, layers, activations, metadata=dict(metadata or {}))

    def _with_costs(self, plan: CompressionPlan, names: Sequence[str] | None) -> CompressionPlan:
        """``plan`` with costs before (all 8-bit) and after under ``names`` (default: all)."""
        after = self._all_costs(plan, names)
        before = self._all_costs(self._baseline_plan(), list(after))
        after = {k: v for k, v in after.items() if k in before}
        return CompressionPlan(plan.model_sha256, plan.groups, plan.layers, plan.activations,
                               before, after, plan.metadata)

    def _raw(self, entry: _Layer, attr: str) -> Tensor:
        return self.net.get_submodule(entry.owner).parametrizations[attr].original

    def discretise(self, metadata: dict[str, Any] | None = None, cost_models: Sequence[str] | None = None,
                   prune_threshold: float = 0.5, with_scales: bool = True) -> CompressionPlan:
        """The discrete plan (frozen bits where frozen); costs under ``cost_models`` (default all).

        With ``keep_first`` discretisation a column is pruned when ``theta_0 > prune_threshold``.
        ``with_scales=False`` leaves the weight scales out (a cheaper plan for cost checks).
        """
        column_bits = self._column_bits_argmax(prune_threshold)
        for entry in self._layers.values():
            if entry.quantizer.frozen_bits is not None:
                columns = torch.as_tensor(entry.info.columns)
                column_bits[entry.info.alpha_index][columns] = entry.quantizer.frozen_bits.cpu()
        site_bits = {s.tensor: s.quantizer.frozen_bits or s.quantizer.argmax_bits() for s in self.sites.values()}
        plan = self._plan_from_column_bits(column_bits, site_bits, metadata, with_scales)
        return self._with_costs(plan, cost_models)

    def _baseline_plan(self) -> CompressionPlan:
        if self._baseline is None:
            self._baseline = self._uniform(BASELINE_BITS, with_scales=False)
        return self._baseline

    def _uniform(self, bits: int, with_scales: bool) -> CompressionPlan:
        column_bits = [torch.full((a.n_channels,), bits, dtype=torch.long) for a in self.alphas]
        site_bits = {s.tensor: bits for s in self.sites.values()}
        return self._plan_from_column_bits(column_bits, site_bits, {"strategy": f"uniform-{bits}"}, with_scales)

    def uniform_plan(self, bits: int, cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """Every weight and activation at ``bits``, nothing pruned (8 bits: the 'before' baseline)."""
        return self._with_costs(self._uniform(bits, with_scales=True), cost_models)

    def minimal_plan(self, cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """The cheapest plan the search can reach: one channel per prunable group, lowest bits."""
        column_bits = []
        for alpha in self.alphas:
            lowest = min(b for b in alpha.precisions if b != 0)
            zero = 0 in alpha.precisions
            column_bits.append(torch.full((alpha.n_channels,), 0 if zero else lowest, dtype=torch.long))
        for unit in self.map.units.values():
            column_bits[unit.alpha_index][unit.offset] = min(b for b in self.alphas[unit.alpha_index].precisions if b)
        site_bits = {s.tensor: min(s.quantizer.precisions) for s in self.sites.values()}
        plan = self._plan_from_column_bits(column_bits, site_bits, {"strategy": "minimal"}, with_scales=False)
        return self._with_costs(plan, cost_models)

    # ------------------------------------------------------------------ freezing

    def freeze(self, plan: CompressionPlan) -> None:
        """Fix per-channel weight bits (0 = pruned, raw weights zeroed), activation bits and clips."""
        kept = {gid: set(g.kept) for gid, g in plan.groups.items()}
        for entry in self._layers.values():
            layer_plan = plan.layers.get(entry.info.name)
            if layer_plan is None:
                raise PlanError(f"plan has no entry for layer {entry.info.name!r}; it is for another model")
            if entry.quantizer.frozen_bits is None:
                self._fold_keep_mass(entry)
            entry.quantizer.freeze(list(layer_plan.bits))
        for site in self.sites.values():
            self._freeze_site(site, plan, kept)
        logger.info("froze plan: %d layers, %d activation sites", len(self._layers), len(self.sites))

    @torch.no_grad()
    def _fold_keep_mass(self, entry: _Layer, inverse: bool = False) -> None:
        """Scale raw weight and bias per channel by ``sum_{b != 0} theta_b`` (the undo of the
        initial rescale): the mixture computes about ``(1 - theta_0) * W``, so the frozen layer
        then computes what the search computed. ``inverse`` undoes it (unfreeze)."""
        if inverse:
            factor = entry.fold_factor
        else:
            factor = 1.0 / entry.quantizer.rescale_factor()
            entry.fold_factor = factor
        factor = factor if not inverse else 1.0 / factor
        weight = self._raw(entry, entry.weight_attr)
        shape = [1] * weight.ndim
        shape[entry.quantizer.ch_axis] = -1
        weight.mul_(factor.to(weight).reshape(shape))
        if entry.bias_attr is not None:
            bias = self._raw(entry, entry.bias_attr)
            bias.mul_(factor.to(bias).reshape(bias.shape))

    @torch.no_grad()
    def _freeze_site(self, site: SiteQuantizer, plan: CompressionPlan, kept: dict[str, set[int]]) -> None:
        site_plan = plan.activations.get(site.tensor)
        if site_plan is None:
            raise PlanError(f"plan has no entry for activation {site.tensor!r}; it is for another model")
        site.quantizer.freeze(site_plan.bits)
        site.quantizer.clip.fill_(site_plan.clip)
        units = self.map.site_units.get(site.tensor)
        if units is None:
            site.mask = None
            return
        mask = [unit is None or unit[0] not in kept or unit[1] in kept[unit[0]] for unit in units]
        site.mask = None if all(mask) else torch.tensor(mask, device=site.quantizer.clip.device)

    def unfreeze(self) -> None:
        """Back to search mode (the keep-mass fold of :meth:`freeze` is undone)."""
        for entry in self._layers.values():
            if entry.quantizer.frozen_bits is not None and entry.fold_factor is not None:
                self._fold_keep_mass(entry, inverse=True)
            entry.quantizer.unfreeze()
        for site in self.sites.values():
            site.quantizer.unfreeze()
            site.mask = None

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def materialised_bridge(self) -> BridgedModel:
        """A BridgedModel copy whose parameters hold the effective (fake-quantized, gated)
        values, with no parametrizations and no hooks: pass it to ``bridge.write_back``."""
        module = copy.deepcopy(self._teacher[0])
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            owner, _, attr = name.rpartition(".")
            source = getattr(self.net.get_submodule(owner) if owner else self.net, attr)
            tensor.copy_(source.detach().to(tensor.device))
        return BridgedModel(module, dict(self.bridged.param_map), dict(self.bridged.node_map),
                            dict(self.bridged.layouts))

    # ------------------------------------------------------------------ reporting

    def describe_plan(self, plan: CompressionPlan, name: str | None = None) -> str:
        name = name or self.config.cost_model
        before, after = plan.cost_before.get(name), plan.cost_after.get(name)
        pruned = sum(len(g.pruned) for g in plan.groups.values())
        total = sum(g.size for g in plan.groups.values())
        ratio = f"{after / before:.3f} of 8-bit" if before and after is not None else "n/a"
        return f"{name} {ratio}, {pruned}/{total} group channels pruned"

    def summary(self) -> str:
        """One line per alpha (expected kept channels, argmax histogram) and per site."""
        lines = [f"SearchableModel: {len(self._layers)} layers, T={self._temperature:.3f}"]
        for unit, theta in self._unit_thetas():
            precisions = self.alphas[unit.alpha_index].precisions
            argmax = [precisions[i] for i in theta.argmax(dim=0).tolist()]
            hist = {b: argmax.count(b) for b in precisions}
            keep = unit.size - (float(theta[precisions.index(0)].sum()) if 0 in precisions else 0.0)
            lines.append(f"  {unit.key:<24} size {unit.size:4d} kept_eff {keep:7.2f} argmax {hist}")
        for site in self.sites.values():
            q = site.quantizer
            lines.append(f"  act {site.tensor[-40:]:<40} bits {q.frozen_bits or q.argmax_bits()} "
                         f"clip {float(q.clip.detach()):.3f} {'signed' if q.signed else 'unsigned'}")
        return "\n".join(lines)

    def _unit_thetas(self) -> Iterable[tuple[Any, Tensor]]:
        thetas = [t.detach() for t in self.thetas()]
        for unit in self.map.units.values():
            yield unit, thetas[unit.alpha_index][:, unit.offset:unit.offset + unit.size]


def _quantile(x: Tensor) -> float:
    flat = x.detach().abs().flatten().float()
    if flat.numel() > _CALIB_MAX_ELEMENTS:
        flat = flat[:: flat.numel() // _CALIB_MAX_ELEMENTS + 1]
    return float(torch.quantile(flat, _CALIB_QUANTILE)) if flat.numel() else 0.0


__all__ = ["BASELINE_BITS", "SiteQuantizer", "ChannelMap", "SearchableModel", "build_channel_map"]
