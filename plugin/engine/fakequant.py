"""FakeQuantModel: the bridged torch module with a fake quantizer on every weight layer and
activation site, keyed by the analysis' groups and sites. It freezes *any* plan and runs
calibration, QAT (``plugin.engine.training``) and evaluation; it has no architecture logits and
no temperature (the DNAS supernet, ``plugin.engine.supernet``, adds those for the gradient search).

Weights: every weight layer's weight gets a quantizer parametrization (one bit-width per output
channel, 0 = pruned: zero), preceded by a fine-grained sparsity mask (:class:`SparsityMask`,
identity while the plan's layer is dense) that zeroes the smallest-|w| weights of each kept
channel by the plan's rule (:class:`plugin.plan.LayerPlan`). Biases are gated by the kept mask, so a pruned channel outputs
exactly zero. Activations: one quantizer per activation site (a tensor read by weight layers, or
an operand of an activation x activation MatMul: Q K^T, attention x V), applied by forward
pre-hooks on the consumer modules (the MatMul's module: on the operand's argument); all consumers
of a site share it. Only those inputs are quantized: the exporter puts the site's Q/DQ on those
edges. Embedding tables (a Gather of a constant table's rows) are fake-quantized per row at
``plugin.space.EMBEDDING_BITS`` (8, not searched), as the export stores them. Once a
plan is frozen, a site also zeroes the positions of pruned channels, which is exactly what
structural pruning computes (the channel-group oracle).

The channel bookkeeping (which output channel, input position and site position belongs to which
group channel) is the search space's (``plugin.space``), shared with every strategy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from graph_passes.channel_groups import ChannelAnalysis, analyse
from graph_passes.errors import PlanError
from plugin.bridge import BridgedModel, check_parity, convert
from plugin.engine.config import SearchConfig
from plugin.engine.quantizers import (
    FrozenActivationQuantizer,
    FrozenWeightQuantizer,
    net_parameters as _net_parameters,
)
from plugin.engine.batches import iterate_batches
from plugin.plan import CompressionPlan, sha256_hex
from plugin.space import LayerInfo, Precisions, SearchSpace

logger = logging.getLogger(__name__)

_CALIB_QUANTILE = 0.999
_CALIB_MAX_ELEMENTS = 1 << 20


class _BiasGate(nn.Module):
    """Bias parametrization: ``b * kept`` once frozen; in a search ``b * (1 - theta_0)``."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self._quantizer = [quantizer]  # a list: not registered twice

    def forward(self, bias: Tensor) -> Tensor:
        q = self._quantizer[0]
        if q.frozen_bits is not None:
            bits = q.frozen_bits
            key = (id(bits), bits._version, bias.dtype, bias.device, bias.shape)
            cached = self.__dict__.get("_kept")  # the 0/1 factor, once per frozen plan (not every step)
            if cached is None or cached[0] != key or cached[1] is not bits:
                cached = (key, bits, (bits != 0).to(bias.dtype).reshape(bias.shape))
                self.__dict__["_kept"] = cached
            return bias * cached[2]
        if 0 not in q.precisions:
            return bias
        batch = q.__dict__.get("_weight_batch")  # plugin.engine.weight_batch: every layer's factor at once
        keep = batch.keep_mass(q) if batch is not None else None
        if keep is None:
            keep = 1 - q.theta()[q.precisions.index(0)]
        return bias * keep.to(bias.dtype).reshape(bias.shape)


class _SharedWeight(nn.Module):
    """Weight parametrization of a layer reading another layer's weight tensor (a reused
    kernel, tied weights): the owner's sparsity mask and quantizer, the same objects (kept in a
    list: not registered twice), so the tensor is quantized once, by one quantizer."""

    def __init__(self, mask: nn.Module | None, quantizer: nn.Module) -> None:
        super().__init__()
        self._steps = [step for step in (mask, quantizer) if step is not None]

    def forward(self, weight: Tensor) -> Tensor:
        for step in self._steps:
            weight = step(weight)
        return weight


class SparsityMask(nn.Module):
    """Weight parametrization applied before the quantizer: in every output channel, among its
    weights at kept input positions (``input_keep``, None: all), the ``floor(sparsity * n)`` of
    smallest |w| become exact zeros (stable sort: ties go to the lower row-major position), the
    rule of :class:`plugin.plan.LayerPlan`. The quantizer's per-channel scale is unchanged (the
    largest weight is never zeroed). The mask follows the weights (recomputed every pass, no
    gradient through the choice); gradients reach the kept weights only."""

    def __init__(self, ch_axis: int) -> None:
        super().__init__()
        self.ch_axis = ch_axis
        self.sparsity = 0.0
        self.register_buffer("input_keep", None, persistent=False)

    def set(self, sparsity: float, input_keep: Tensor | None) -> None:
        self.sparsity = float(sparsity)
        self.input_keep = input_keep

    @torch.no_grad()
    def mask(self, w: Tensor) -> Tensor:
        from cost_models.spec import zeroed_per_channel

        moved = w.detach().movedim(self.ch_axis, 0)
        magnitude = moved.abs().float()
        n = moved[0].numel() if moved.shape[0] else 0
        if self.input_keep is not None and moved.ndim >= 2:
            shape = [1] * moved.ndim
            shape[1] = -1
            keep = self.input_keep.to(device=w.device).reshape(shape)
            magnitude = torch.where(keep, magnitude, torch.full_like(magnitude, float("inf")))
            n = int(self.input_keep.sum()) * (n // max(moved.shape[1], 1))
        k = zeroed_per_channel(self.sparsity, n)
        flat = magnitude.reshape(moved.shape[0], -1)
        out = torch.ones_like(flat)
        if k > 0:
            order = torch.sort(flat, dim=1, stable=True).indices[:, :k]
            out.scatter_(1, order, 0.0)
        return out.reshape(moved.shape).movedim(0, self.ch_axis).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        if not self.sparsity:
            return w
        return w * self.mask(w)


class SiteQuantizer(nn.Module):
    """The quantizer of one activation site plus, once frozen, the mask of kept channels."""

    def __init__(self, tensor: str, quantizer: nn.Module, axis: int | None) -> None:
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
class WrappedLayer:
    info: LayerInfo
    quantizer: nn.Module
    owner: str
    weight_attr: str
    bias_attr: str | None
    fold_factor: Tensor | None = None
    sparsity_mask: SparsityMask | None = None


class FakeQuantModel(nn.Module):
    """A bridged model with fake quantizers; freezes any :class:`CompressionPlan`.

    ``bridged.module`` is modified in place (parametrizations and hooks); a deep copy taken
    before that is kept as the distillation teacher. Build with :meth:`build` from a normalised
    ONNX model, or directly from a space and a bridged model. Starts as all-8-bit, nothing pruned.
    """

    def __init__(self, model: onnx.ModelProto, space: SearchSpace, bridged: BridgedModel,
                 config: SearchConfig | None = None) -> None:
        super().__init__()
        self.config = config or SearchConfig()
        self.space = space
        self.model_sha256 = space.model_sha256
        self.analysis: ChannelAnalysis = space.analysis
        self.bridged = bridged
        self._teacher = [copy.deepcopy(bridged.module).eval()]
        self.net = bridged.module.eval()
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {t.name for t in model.graph.initializer}]
        self.map = space.map
        self._before_wrapping()
        self._layers = {info.name: self._wrap_layer(info) for info in self.map.layers}
        self.sites = nn.ModuleDict()
        self._site_key: dict[str, str] = {}
        self._hooks: list[tuple[str, SiteQuantizer, Any, int]] = []  # owner, site, handle, argument
        self._wrap_sites()
        self._embeddings = {name: self._wrap_embedding(name, table.table, table.rows)
                            for name, table in space.embeddings.items()}
        self.calibrated = self.config.init_clip is not None
        self._after_wrapping()
        logger.info("%s: %d layers, %d activation sites", type(self).__name__, len(self._layers), len(self.sites))

    @classmethod
    def build(cls, model: onnx.ModelProto, config: SearchConfig | None = None, *,
              model_sha256: str | None = None, analysis: ChannelAnalysis | None = None,
              space: SearchSpace | None = None) -> FakeQuantModel:
        """Analyse (unless given), bridge and parity-check a *normalised* model, then wrap it."""
        config = config or SearchConfig()
        if space is None:
            analysis = analysis or analyse(model)
            space = SearchSpace(analysis, Precisions(config.weight_precisions, config.site_precisions),
                                model_sha256=model_sha256 or sha256_hex(model.SerializeToString()))
        bridged = convert(model)
        check_parity(model, bridged)
        return cls(model, space, bridged, config)

    # ------------------------------------------------------------------ hooks for subclasses

    def _before_wrapping(self) -> None:
        """Called before the quantizers are made (the supernet creates its logits here)."""

    def _after_wrapping(self) -> None:
        """Called once every quantizer is in place."""

    def _weight_quantizer(self, info: LayerInfo, ch_axis: int) -> nn.Module:
        return FrozenWeightQuantizer(info.layer.out_channels, ch_axis=ch_axis)

    def _site_quantizer(self, signed: bool, init_clip: float) -> nn.Module:
        return FrozenActivationQuantizer(max(self.space.precisions.activations), signed=signed, init_clip=init_clip)

    def _on_freeze(self, entry: WrappedLayer) -> None:
        """Called for a layer that is about to be frozen for the first time."""

    # ------------------------------------------------------------------ wrapping

    def _param_owner(self, initializer: str, layer: str) -> tuple[str, str]:
        qualified = self.bridged.param_map.get(initializer)
        params = dict(self.net.named_parameters())
        if qualified is None or qualified not in params:
            raise PlanError(f"layer {layer!r}: initializer {initializer!r} is not a trainable torch "
                            "parameter after bridging; this layer cannot be searched")
        owner, _, attr = qualified.rpartition(".")
        return owner, attr

    def _wrap_follower(self, info: LayerInfo, first: WrappedLayer) -> WrappedLayer:
        """A layer reading the weight tensor of an already wrapped layer: its own torch module,
        whose parameter is the owner's (the bridge shares it), parametrized by the owner's
        quantizer."""
        layer = info.layer
        owner = self.bridged.node_map.get(layer.name)
        raw = self._raw(first, first.weight_attr)
        module = self.net.get_submodule(owner) if owner is not None else None
        attr = next((a for a, p in module.named_parameters(recurse=False) if p is raw), None) \
            if module is not None else None
        if attr is None:
            raise PlanError(f"layer {layer.name!r}: shares weight {layer.weight!r} with {first.info.name!r}, but the "
                            "bridged module does not share the tensor; this layer cannot be searched")
        parametrize.register_parametrization(module, attr, _SharedWeight(first.sparsity_mask, first.quantizer))
        bias_attr = None
        if layer.bias is not None and layer.bias in self.bridged.param_map:
            bias_owner, bias_attr = self._param_owner(layer.bias, layer.name)
            if bias_owner != owner:
                raise PlanError(f"layer {layer.name!r}: weight and bias live in different modules")
            parametrize.register_parametrization(module, bias_attr, _BiasGate(first.quantizer))
        return WrappedLayer(info, first.quantizer, owner, attr, bias_attr, sparsity_mask=None)

    def _wrap_layer(self, info: LayerInfo) -> WrappedLayer:
        layer = info.layer
        by_weight = self.__dict__.setdefault("_wrapped_by_weight", {})
        if layer.weight_owner is not None and layer.weight in by_weight:
            return self._wrap_follower(info, by_weight[layer.weight])
        entry = self._wrap_own_layer(info)
        by_weight[layer.weight] = entry
        return entry

    def _wrap_own_layer(self, info: LayerInfo) -> WrappedLayer:
        layer = info.layer
        owner, attr = self._param_owner(layer.weight, layer.name)
        module = self.net.get_submodule(owner)
        # the torch parameter's layout, not the ONNX initializer's: the bridge stores Gemm/MatMul
        # weights as nn.Linear [out, in]; only a transposed convolution keeps outputs on axis 1
        ch_axis = 1 if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d) else 0
        if ch_axis != 0 and layer.groups != 1:
            raise PlanError(f"layer {layer.name!r}: grouped ConvTranspose is not supported by the search")
        quantizer = self._weight_quantizer(info, ch_axis)
        sparsity_mask = SparsityMask(ch_axis)
        parametrize.register_parametrization(module, attr, sparsity_mask)  # first: it ranks the raw weights
        parametrize.register_parametrization(module, attr, quantizer)
        bias_attr = None
        if layer.bias is not None and layer.bias in self.bridged.param_map:
            bias_owner, bias_attr = self._param_owner(layer.bias, layer.name)
            if bias_owner != owner:
                raise PlanError(f"layer {layer.name!r}: weight and bias live in different modules")
            parametrize.register_parametrization(module, bias_attr, _BiasGate(quantizer))
        return WrappedLayer(info, quantizer, owner, attr, bias_attr, sparsity_mask=sparsity_mask)

    def _wrap_sites(self) -> None:
        init_clip = self.config.init_clip or 6.0
        for index, site in enumerate(self.analysis.sites):
            key = f"a{index}"
            quantizer = self._site_quantizer(not site.non_negative, init_clip)
            layout = self.analysis.layouts.get(site.tensor)
            self.sites[key] = SiteQuantizer(site.tensor, quantizer, None if layout is None else layout.axis)
            self._site_key[site.tensor] = key
            for consumer in site.consumers:
                if consumer in self._layers:
                    self._hook(self._layers[consumer].owner, self.sites[key])
                elif consumer in self.space.products:  # an activation x activation MatMul operand
                    product = self.space.products[consumer].product
                    owner = self.bridged.node_map.get(consumer)
                    if owner is None:
                        raise PlanError(f"activation MatMul {consumer!r} has no module after bridging")
                    for index, operand in enumerate((product.a, product.b)):
                        if operand == site.tensor:
                            self._hook(owner, self.sites[key], index)

    def _hook(self, owner: str, site: SiteQuantizer, index: int = 0) -> None:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (*args[:index], site(args[index]), *args[index + 1:])

        handle = self.net.get_submodule(owner).register_forward_pre_hook(pre_hook)
        self._hooks.append((owner, site, handle, index))

    def _wrap_embedding(self, name: str, table: str, rows: int) -> FrozenWeightQuantizer:
        """Per-row fake quantization of an embedding table at ``EMBEDDING_BITS`` (not searched),
        the export's numbers (``graph_passes.qdq``): a parametrization of the table's tensor."""
        from plugin.space import EMBEDDING_BITS

        qualified = self.bridged.param_map.get(table)
        if qualified is None:
            raise PlanError(f"embedding {name!r}: table {table!r} has no torch tensor after bridging")
        owner, _, attr = qualified.rpartition(".")
        quantizer = FrozenWeightQuantizer(rows, ch_axis=0, bits=EMBEDDING_BITS)
        parametrize.register_parametrization(self.net.get_submodule(owner), attr, quantizer)
        return quantizer

    def _raw(self, entry: WrappedLayer, attr: str) -> Tensor:
        return self.net.get_submodule(entry.owner).parametrizations[attr].original

    # ------------------------------------------------------------------ calibration

    @torch.no_grad()
    def calibrate(self, data: Any, batch_size: int = 64, max_batches: int = 4) -> dict[str, float]:
        """Set every activation clip to the 99.9th percentile of |x| under the FP32 teacher
        (``data``: a Dataset or batches); the space's clips follow. Returns the clips."""
        teacher = self._teacher_module()
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        batches = iterate_batches(data, self.input_names, batch_size, 0, device, max_batches)
        found: dict[str, float] = {}
        handles = []

        def observe(key: str, x: Tensor) -> None:
            found[key] = max(found.get(key, 0.0), _quantile(x))

        for owner, site, _, index in self._hooks:
            handles.append(teacher.get_submodule(owner).register_forward_pre_hook(
                lambda _m, args, key=site.tensor, i=index: observe(key, args[i])))
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
        self.space.set_clips({k: v for k, v in found.items() if v > 0})
        logger.info("calibrated %d activation clips", len(found))
        return found

    def clips(self) -> dict[str, float]:
        return {site.tensor: max(float(site.quantizer.clip.detach().abs()), 1e-6) for site in self.sites.values()}

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

    def net_parameters(self) -> list[nn.Parameter]:
        return _net_parameters(self)

    # ------------------------------------------------------------------ plans

    def freeze(self, plan: CompressionPlan) -> None:
        """Fix per-channel weight bits (0 = pruned, raw weights zeroed), activation bits and clips."""
        kept = {gid: set(g.kept) for gid, g in plan.groups.items()}
        for entry in self._layers.values():
            layer_plan = plan.layers.get(entry.info.name)
            if layer_plan is None:
                raise PlanError(f"plan has no entry for layer {entry.info.name!r}; it is for another model")
            if entry.info.layer.weight_owner is not None and entry.sparsity_mask is None:
                continue  # reads its owner's weight: frozen once, with the owner's bits
            if entry.quantizer.frozen_bits is None:
                self._on_freeze(entry)
            entry.quantizer.freeze(list(layer_plan.bits))
            self._freeze_sparsity(entry, layer_plan.sparsity, kept)
        for site in self.sites.values():
            self._freeze_site(site, plan, kept)
        logger.info("froze plan: %d layers, %d activation sites", len(self._layers), len(self.sites))

    def _freeze_sparsity(self, entry: WrappedLayer, sparsity: float, kept: dict[str, set[int]]) -> None:
        """Set the layer's fine-grained mask: the kept input positions by the plan's groups."""
        if entry.sparsity_mask is None:
            if sparsity:
                raise PlanError(f"layer {entry.info.name!r}: this engine cannot apply fine-grained sparsity")
            return
        input_keep = None
        units = entry.info.input_units
        if sparsity and entry.info.spec.kind != "depthwise":
            weight = self._raw(entry, entry.weight_attr)
            in_axis = 1 if entry.sparsity_mask.ch_axis == 0 else 0
            if units is None or weight.ndim < 2 or weight.shape[in_axis] != len(units):
                raise PlanError(f"layer {entry.info.name!r}: fine-grained sparsity needs a known input layout "
                                "(a conv of groups 1 or a linear layer); leave the layer dense")
            keep = [unit is None or unit[0] not in kept or unit[1] in kept[unit[0]] for unit in units]
            if not all(keep):
                input_keep = torch.tensor(keep, device=weight.device)
        entry.sparsity_mask.set(sparsity, input_keep)

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

    def frozen_bits(self) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
        """The bits in force: per layer per output channel, per site."""
        layers = {}
        for name, entry in self._layers.items():
            bits = entry.quantizer.frozen_bits
            if bits is None:
                raise PlanError("the model is in search mode: freeze a plan first")
            layers[name] = tuple(int(b) for b in bits.tolist())
        sites = {s.tensor: int(s.quantizer.frozen_bits) for s in self.sites.values()}
        return layers, sites

    @torch.no_grad()
    def weight_scales(self, layer_bits: dict[str, Sequence[int]]) -> dict[str, tuple[float, ...]]:
        """Per-channel weight scales of the current (e.g. fine-tuned) weights at ``layer_bits``."""
        from plugin.engine.quantizers import quantize_weight_per_channel

        out = {}
        for name, bits in layer_bits.items():
            entry = self._layers[name]
            weight = self._raw(entry, entry.weight_attr).detach()
            q = quantize_weight_per_channel(weight, torch.as_tensor(list(bits)), entry.quantizer.ch_axis)
            out[name] = tuple(float(s) for s in q.scale.cpu())
        return out

    def frozen_plan(self, metadata: dict[str, Any] | None = None,
                    cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """The plan in force, with the current weights' scales and the current clips."""
        layers, sites = self.frozen_bits()
        sparsity = {name: entry.sparsity_mask.sparsity for name, entry in self._layers.items()
                    if entry.sparsity_mask is not None and entry.sparsity_mask.sparsity}
        plan = self.space.assemble(layers, sites, scales=self.weight_scales(layers), clips=self.clips(),
                                   metadata=metadata, sparsity=sparsity)
        return self.space.with_costs(plan, cost_models)

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

    # ------------------------------------------------------------------ costs (delegated to the space)

    def cost_of_plan(self, plan: CompressionPlan, name: str | None = None) -> float:
        return self.space.cost_of_plan(plan, name or self.config.cost_model)

    def cost_before(self, name: str | None = None) -> float:
        return self.space.cost_before(name or self.config.cost_model)

    def describe_plan(self, plan: CompressionPlan, name: str | None = None) -> str:
        return self.space.describe_plan(plan, name or self.config.cost_model)


def _quantile(x: Tensor) -> float:
    flat = x.detach().abs().flatten().float()
    if flat.numel() > _CALIB_MAX_ELEMENTS:
        flat = flat[:: flat.numel() // _CALIB_MAX_ELEMENTS + 1]
    return float(torch.quantile(flat, _CALIB_QUANTILE)) if flat.numel() else 0.0


__all__ = ["FakeQuantModel", "SiteQuantizer", "SparsityMask", "WrappedLayer"]
