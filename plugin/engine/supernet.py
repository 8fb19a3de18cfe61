"""The DNAS supernet of the gradient search (Motetti et al., arXiv 2407.01054) and its runner.

:class:`Supernet` is a :class:`~plugin.engine.fakequant.FakeQuantModel` whose weight and
activation quantizers mix precisions under architecture logits: per output channel a logit
vector over the weight precisions, held in a :class:`SharedAlpha` shared by every layer of the
channel group (one column per group channel); a layer whose output channels span several groups
(a depthwise conv over a Concat) ties those groups into one alpha; channels in no group get
private columns. The 0-bit (pruned) option exists only where every tied group is prunable. Biases
are gated by the keep probability ``1 - theta_0``. At the start weights and biases are rescaled by
``1 / sum_{b != 0} theta_b`` (DESIGN), so the initial mixture computes the original function up
to quantization error. Used by the gradient and sequential strategies.

:class:`SearchRunner` trains it: loss = task loss + lambda * cost, the cost divided by the
all-8-bit cost (``normalise_cost``) so lambda is unit-free. Weights (and clips, without decay)
train with Adam, the logits with SGD + momentum (``logit_steps``: optionally each column's step
divided by the cost it stands for, or Adam); the temperature decays once per epoch. The module
is kept in eval mode throughout: the ONNX graph has inference semantics (BatchNorm with stored
statistics, no dropout); gradients flow all the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cost_models import CostInputs, get_cost_model
from cost_models import size as _size_model
from plugin.engine.config import SearchConfig
from plugin.engine.fakequant import FakeQuantModel, WrappedLayer
from plugin.engine.quantizers import (
    SearchableActivationQuantizer,
    SearchableWeightQuantizer,
    SharedAlpha,
    nas_parameters as _nas_parameters,
    set_temperature as _set_temperature,
    theta_cache,
)
from plugin.engine.batches import Batch, TeacherCache, count_batches, indexed_batches, iterate_batches, task_loss
from plugin.engine.optimisers import adam, sgd
from plugin.engine.weight_batch import WeightMixtureBatch
from plugin.plan import CompressionPlan
from plugin.space import LayerInfo

logger = logging.getLogger(__name__)


def _fixed_pruned(alpha: SharedAlpha) -> Tensor | None:
    """Columns forced to 0 bits (:meth:`Supernet.fix_pruned`), or None."""
    mask = getattr(alpha, "logit_mask", None)
    if mask is None or 0 not in alpha.precisions:
        return None
    widths = [j for j, b in enumerate(alpha.precisions) if b != 0]
    return torch.isinf(mask[widths]).all(dim=0)


_VECTORISED_SIZE_COST = True  # False: the size cost layer by layer too (tests and benchmarks compare the two)


@dataclass(frozen=True)
class _SizeLayout:
    """Index tensors of the batched ``size`` cost (:meth:`Supernet._size_cost`), on one device.

    Columns are numbered over all alphas (alpha ``a``'s column ``c`` is ``offset_a + c``). Per
    layer ``L``: ``C_in_eff = c_in_fixed[L] + sum keep[in_columns]`` over the entries with
    ``in_layer == L``, and ``n_L = (fan_in_slope * C_in_eff + fan_in_offset) * area``
    (``fan_in_eff`` is affine in ``C_in_eff`` for every layer kind; ``area`` is 0 for a layer that
    stores no weights of its own). Per output channel: its layer ``out_layer`` and column
    ``out_columns``. ``alphas`` are the alphas some layer's output uses, ``bits`` their precisions
    as floats, ``used_columns`` their columns in that order."""

    n_columns: int
    zero_rows: list[int | None]
    c_in_fixed: Tensor
    in_columns: Tensor
    in_layer: Tensor
    fan_in_slope: Tensor
    fan_in_offset: Tensor
    area: Tensor
    out_layer: Tensor
    out_columns: Tensor
    alphas: list[int]
    bits: list[Tensor]
    used_columns: Tensor

    @classmethod
    def build(cls, alphas: Sequence[SharedAlpha], layers: Sequence[LayerInfo], device: torch.device,
              dtype: torch.dtype = torch.float32) -> _SizeLayout:
        offsets = np.cumsum([0] + [a.n_channels for a in alphas]).tolist()
        c_in_fixed, in_columns, in_layer, slope, offset, area, out_layer, out_columns = [], [], [], [], [], [], [], []
        for k, info in enumerate(layers):
            spec = info.spec
            if info.input_index is None:
                c_in_fixed.append(float(spec.c_in))
            else:
                c_in_fixed.append(float(info.input_fixed))
                for alpha_index, columns in info.input_index.items():
                    in_columns.extend(offsets[alpha_index] + int(c) for c in columns)
                    in_layer.extend([k] * len(columns))
            at_zero, at_one = float(spec.fan_in_eff(0.0)), float(spec.fan_in_eff(1.0))
            slope.append(at_one - at_zero)
            offset.append(at_zero)
            area.append(float(spec.kernel_area) if spec.stores_weights and spec.kind != "act_matmul" else 0.0)
            out_columns.extend(offsets[info.alpha_index] + int(c) for c in info.columns)
            out_layer.extend([k] * len(info.columns))
        used = sorted({info.alpha_index for info in layers})

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        def longs(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            n_columns=int(offsets[-1]),
            zero_rows=[a.precisions.index(0) if 0 in a.precisions else None for a in alphas],
            c_in_fixed=floats(c_in_fixed), in_columns=longs(in_columns), in_layer=longs(in_layer),
            fan_in_slope=floats(slope), fan_in_offset=floats(offset), area=floats(area),
            out_layer=longs(out_layer), out_columns=longs(out_columns), alphas=used,
            bits=[floats([float(b) for b in alphas[a].precisions]) for a in used],
            used_columns=longs([c for a in used for c in range(offsets[a], offsets[a + 1])]))


class Supernet(FakeQuantModel):
    """The searchable model: see the module docstring. Public surface (PLiNIO style):
    :meth:`cost`, :meth:`nas_parameters`, :meth:`net_parameters`, :meth:`set_temperature`,
    :meth:`discretise`, :meth:`freeze`, :meth:`summary`, :meth:`materialised_bridge`."""

    def _before_wrapping(self) -> None:
        self.alphas = nn.ModuleList(SharedAlpha(a.precisions, a.n_columns) for a in self.map.alphas)
        self._temperature = float(self.config.temperature)

    def _weight_quantizer(self, info: LayerInfo, ch_axis: int) -> nn.Module:
        alpha = self.alphas[info.alpha_index]
        return SearchableWeightQuantizer(
            info.layer.out_channels, alpha.precisions, ch_axis=ch_axis, alpha=alpha,
            channel_to_group_index=torch.as_tensor(info.columns), temperature=self._temperature)

    def _site_quantizer(self, signed: bool, init_clip: float) -> nn.Module:
        return SearchableActivationQuantizer(self.config.site_precisions, signed=signed, init_clip=init_clip,
                                             temperature=self._temperature)

    def _after_wrapping(self) -> None:
        WeightMixtureBatch([(entry.quantizer, self.net.get_submodule(entry.owner), entry.weight_attr,
                             entry.sparsity_mask) for entry in self._layers.values()
                            if entry.sparsity_mask is not None]).attach()
        self._importance: list[Tensor] | None = None  # per alpha, per column (Taylor), once computed
        if self.config.prune_init > 0 and self.config.prune_init_score == "weight":
            self._init_prune_logits(self.config.prune_init)
        self._rescale_initial()
        self.set_temperature(self._temperature)

    def _on_freeze(self, entry: WrappedLayer) -> None:
        self._fold_keep_mass(entry)

    @torch.no_grad()
    def fix_pruned(self, kept: dict[str, Sequence[int]]) -> None:
        """Fix group channels: those not in ``kept[group]`` pruned (0 bits) for good, the kept
        ones never pruned (the second stage of the sequential strategy searches widths only)."""
        self._rescale_initial(inverse=True)  # the start must be the function under the new logits
        for unit in self.map.units.values():
            if unit.group_id is None or unit.group_id not in kept:
                continue
            alpha = self.alphas[unit.alpha_index]
            if 0 not in alpha.precisions:
                if len(set(kept[unit.group_id])) < unit.size:
                    raise ValueError(f"group {unit.group_id}: cannot fix pruned channels without a 0-bit option")
                continue
            keep = set(int(c) for c in kept[unit.group_id])
            pruned = [unit.offset + c for c in range(unit.size) if c not in keep]
            kept_cols = [unit.offset + c for c in range(unit.size) if c in keep]
            if pruned:
                alpha.fix_columns(pruned, 0)
            if kept_cols:
                alpha.forbid(kept_cols, 0)
        self._rescale_initial()

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
        sums, counts = self._weight_norm_sums()
        for index, alpha in enumerate(self.alphas):
            if 0 not in alpha.precisions or not bool((counts[index] > 0).any()):
                continue
            rel = torch.where(counts[index] > 0, sums[index] / counts[index].clamp_min(1), torch.ones(1))
            zero = alpha.precisions.index(0)
            alpha.alpha[zero] += (strength * (1 - rel)).clamp(-strength, strength).to(alpha.alpha.dtype)

    @torch.no_grad()
    def _weight_norm_sums(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per alpha and column, the sum over the column's layers of its mean |W| relative to
        its layer's mean, and how many layers contributed (a layer whose mean is not finite and
        positive contributes nothing)."""
        sums = [torch.zeros(a.n_columns) for a in self.map.alphas]
        counts = [torch.zeros(a.n_columns) for a in self.map.alphas]
        for entry in self._layers.values():
            module = self.net.get_submodule(entry.owner)
            weight = module.parametrizations[entry.weight_attr].original.detach().float().cpu()
            axis = entry.quantizer.ch_axis
            norms = weight.abs().movedim(axis, 0).reshape(weight.shape[axis], -1).mean(dim=1)
            mean = norms.mean()
            if not torch.isfinite(mean) or mean <= 0:
                continue
            columns = torch.as_tensor(entry.info.columns)
            index = entry.info.alpha_index
            sums[index].index_add_(0, columns, norms / mean)
            counts[index].index_add_(0, columns, torch.ones(len(columns)))
        return sums, counts

    @torch.no_grad()
    def weight_scores(self) -> list[Tensor]:
        """Per alpha, each column's mean |W| relative to its layer's mean, averaged over the
        layers of the column (0 where no layer holds it): the network-slimming importance."""
        sums, counts = self._weight_norm_sums()
        return [s / c.clamp_min(1) for s, c in zip(sums, counts)]

    def taylor_scores(self, data: Any, batch_size: int, seed: int, max_batches: int = 4) -> list[Tensor]:
        """Per alpha, each column's first-order Taylor importance over ``max_batches`` batches:
        ``sum_batches |sum_{w in channel} w * dL/dw|`` (weights and bias of every layer of the
        column), L the cross-entropy of the current model against the FP32 model's own argmax
        (label-free; at the start the distillation loss has no gradient to speak of). An output
        that is not ``[N, C>1, ...]`` gives the weight scores instead."""
        entries = list(self._layers.values())
        params: list[tuple[int, int, nn.Parameter]] = []  # (entry index, ch_axis, raw tensor)
        for k, entry in enumerate(entries):
            module = self.net.get_submodule(entry.owner)
            params.append((k, entry.quantizer.ch_axis, module.parametrizations[entry.weight_attr].original))
            if entry.bias_attr is not None:
                params.append((k, 0, module.parametrizations[entry.bias_attr].original))
        scores = [torch.zeros(a.n_columns) for a in self.map.alphas]
        device = next(self.parameters()).device
        used = 0
        for inputs, _labels in iterate_batches(data, self.input_names, batch_size, seed, device, max_batches):
            teacher = self.teacher_outputs(*inputs)
            student = self(*inputs)
            s0 = student[0] if isinstance(student, (tuple, list)) else student
            t0 = teacher[0] if isinstance(teacher, (tuple, list)) else teacher
            if not (isinstance(s0, Tensor) and s0.is_floating_point() and s0.ndim >= 2 and s0.shape[1] > 1):
                logger.info("taylor scores: the output is not [N, C, ...]; weight scores instead")
                return self.weight_scores()
            loss = nn.functional.cross_entropy(s0, t0.detach().argmax(dim=1))
            grads = torch.autograd.grad(loss, [p for _, _, p in params], allow_unused=True)
            per_layer: dict[int, Tensor] = {}
            for (k, axis, p), g in zip(params, grads):
                if g is None:
                    continue
                prod = (p.detach() * g.detach()).movedim(axis % p.ndim, 0).reshape(p.shape[axis % p.ndim], -1)
                per_layer[k] = per_layer.get(k, 0) + prod.sum(dim=1).float().cpu()
            for k, value in per_layer.items():
                info = entries[k].info
                scores[info.alpha_index].index_add_(0, torch.as_tensor(info.columns), value.abs())
            used += 1
        if used == 0:
            return self.weight_scores()
        return scores

    @torch.no_grad()
    def init_prune_logits_from_scores(self, scores: list[Tensor], strength: float) -> None:
        """Start each prunable column's 0-bit logit at ``strength * (1 - 2 p)``, ``p`` the column's
        importance percentile in its group (0 the least important: likeliest pruned). The
        initial rescale is redone, so the expected effective weights still equal the FP32 ones."""
        self._rescale_initial(inverse=True)
        for unit in self.map.units.values():
            alpha = self.alphas[unit.alpha_index]
            if 0 not in alpha.precisions or unit.size < 2:
                continue
            values = scores[unit.alpha_index][unit.offset:unit.offset + unit.size]
            ranks = torch.empty(unit.size)
            ranks[torch.argsort(values, stable=True)] = torch.arange(unit.size, dtype=torch.float32)
            pct = ranks / (unit.size - 1)
            zero = alpha.precisions.index(0)
            cols = slice(unit.offset, unit.offset + unit.size)
            alpha.alpha[zero, cols] += (strength * (1 - 2 * pct)).to(alpha.alpha.dtype).to(alpha.alpha.device)
        self._rescale_initial()

    def set_ordered_cost(self, strength: float) -> None:
        """``ordered_cost``: each prunable column's cost in the search's loss times
        ``1 + strength * (1 - 2 p)``, ``p`` its importance percentile in its group (the Taylor
        score when computed, else the weight norm, at this moment): the same mean pressure, but
        the least important channels pushed hardest, so a group prunes channel by channel instead
        of all at once. Only the gradient's split changes; plans are costed exactly."""
        if strength <= 0:
            self._cost_weights = None
            return
        importance = self._importance if self._importance is not None else self.weight_scores()
        weights: list[Tensor | None] = [None] * len(self.alphas)
        for unit in self.map.units.values():
            alpha = self.alphas[unit.alpha_index]
            if 0 not in alpha.precisions or unit.size < 2:
                continue
            if weights[unit.alpha_index] is None:
                weights[unit.alpha_index] = torch.ones(alpha.n_channels, device=alpha.alpha.device)
            values = importance[unit.alpha_index][unit.offset:unit.offset + unit.size]
            ranks = torch.empty(unit.size)
            ranks[torch.argsort(values, stable=True)] = torch.arange(unit.size, dtype=torch.float32)
            factor = 1 + strength * (1 - 2 * ranks / (unit.size - 1))
            weights[unit.alpha_index][unit.offset:unit.offset + unit.size] = factor.to(alpha.alpha.device)
        self._cost_weights = weights

    def init_importance(self, data: Any, config: SearchConfig) -> None:
        """The data-driven start (``prune_init_score="taylor"``): Taylor scores, kept as the
        discretisation's tie-breaker, and the 0-bit logits started from them (once)."""
        if self._importance is not None:
            return
        self._importance = self.taylor_scores(data, config.batch_size, config.seed, config.importance_batches)
        if config.prune_init > 0:
            self.init_prune_logits_from_scores(self._importance, config.prune_init)
        logger.info("taylor importance over %d batches; 0-bit logits started from it (strength %g)",
                    config.importance_batches, config.prune_init)

    @torch.no_grad()
    def _rescale_initial(self, inverse: bool = False) -> None:
        """Scale raw weights and biases by ``1 / sum_{b != 0} theta_b`` per channel (``inverse``:
        undo the last such scaling)."""
        seen: set[int] = set()
        if not inverse:
            self._initial_factors: dict[str, Tensor] = {}
        for entry in self._layers.values():
            module = self.net.get_submodule(entry.owner)
            weight = module.parametrizations[entry.weight_attr].original
            if id(weight) in seen:
                if not inverse:
                    logger.warning("layer %s shares its weight with another layer; rescaled once", entry.info.name)
                continue
            seen.add(id(weight))
            if inverse:
                factor = 1.0 / self._initial_factors[entry.info.name]
            else:
                factor = entry.quantizer.rescale_factor()
                self._initial_factors[entry.info.name] = factor
            shape = [1] * weight.ndim
            shape[entry.quantizer.ch_axis % weight.ndim] = -1
            weight.mul_(factor.to(weight.dtype).reshape(shape))
            if entry.bias_attr is not None:
                bias = module.parametrizations[entry.bias_attr].original
                bias.mul_(factor.to(bias.dtype).reshape(bias.shape))

    def nas_parameters(self) -> list[nn.Parameter]:
        return _nas_parameters(self)

    def reset_logit_momentum(self) -> None:
        """Forget the logits' optimiser state (momentum), e.g. when lambda's regime changes."""
        self.alpha_opt.state.clear()

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
                values = theta[alpha.precisions.index(0)].detach().cpu()
                fixed = _fixed_pruned(alpha)
                out.extend((values if fixed is None else values[~fixed.cpu()]).tolist())
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
        """Expected cost under theta (differentiable; the cost model's unit, not normalised).

        The built-in ``size`` model is computed in one batched pass (:meth:`_size_cost`: the
        same value and gradients up to float32 summation order); every other model layer by
        layer through its ``cost(spec, inputs)``."""
        model = get_cost_model(name or self.config.cost_model)
        if model.cost is _size_model.cost and _VECTORISED_SIZE_COST:
            fast = self._size_cost()
            if fast is not None:
                return fast + self._embedding_cost(model.name)
        keep = self._keep_probabilities()
        pairs = []
        weights = getattr(self, "_cost_weights", None)
        for entry in self._layers.values():
            site = self.sites[self._site_key[entry.info.layer.input]].quantizer
            w_theta = entry.quantizer.theta()
            if weights is not None and weights[entry.info.alpha_index] is not None:
                w_theta = w_theta * weights[entry.info.alpha_index][torch.as_tensor(entry.info.columns)].to(w_theta)
            inputs = CostInputs(entry.quantizer.precisions, w_theta, site.precisions,
                                site.theta(), self._c_in_eff(entry.info, keep))
            pairs.append((entry.info.spec, inputs))
        pairs.extend(self._product_pairs(keep))
        total = model.total(pairs) + self._embedding_cost(model.name)
        return total if isinstance(total, Tensor) else torch.tensor(float(total))

    def _embedding_cost(self, name: str) -> float:
        """The embedding tables' cost under ``name`` (fixed: the tables are not searched), once."""
        cache = self.__dict__.setdefault("_embedding_costs", {})
        if name not in cache:
            cache[name] = self.space.embedding_cost(name)
        return cache[name]

    def _size_layout(self, device: torch.device, dtype: torch.dtype = torch.float32) -> _SizeLayout:
        """The static index tensors of :meth:`_size_cost` on ``device``, its float tensors in
        ``dtype`` (built once per device and dtype)."""
        cached = self.__dict__.get("_size_layout_cache")
        if cached is not None and cached[0] == (device, dtype):
            return cached[1]
        layout = _SizeLayout.build(list(self.alphas), [entry.info for entry in self._layers.values()], device, dtype)
        self.__dict__["_size_layout_cache"] = ((device, dtype), layout)
        return layout

    def _size_cost(self) -> Tensor | None:
        """The ``size`` model's expected bits under theta in one batched computation, or None
        when the layers' quantizers run at another temperature than the supernet's.

        Per layer the size model is ``n_L * sum_c sum_j theta[j, c_L(c)] * b_j`` with
        ``n_L = fan_in_eff(C_in_eff) * kh*kw`` (0 for a layer reading another's weights), the
        keep probabilities behind ``C_in_eff`` detached. Summed over layers that is, per alpha,
        ``sum_col E_theta[b](col) * W(col)`` with ``W(col) = sum_L n_L * (channels of L on col)``
        (times the ordered cost's column weights): ``W`` is computed without a graph from
        precomputed index tensors, and the differentiable part is one ``b @ theta`` per alpha and
        one dot product. Activation x activation products store nothing (0 bits), so they are
        left out. The value and the logits' gradients are the per-layer ones up to float32
        summation order (tests/test_step_speed_equivalence.py)."""
        if not self._layers or any(entry.quantizer.temperature != self._temperature for entry in self._layers.values()):
            return None
        thetas = self.thetas()
        device = thetas[0].device
        layout = self._size_layout(device, thetas[0].dtype)
        with torch.no_grad():
            keep = torch.cat([torch.ones_like(theta[0]) if zero is None else 1 - theta[zero]
                              for theta, zero in zip(thetas, layout.zero_rows)])
            c_in = layout.c_in_fixed.index_add(0, layout.in_layer, keep[layout.in_columns])
            per_weight = (layout.fan_in_slope * c_in + layout.fan_in_offset) * layout.area  # n_L, 0 where shared
            per_channel = per_weight[layout.out_layer]
            weights = getattr(self, "_cost_weights", None)
            if weights is not None:
                per_channel = per_channel * torch.cat(
                    [torch.ones(alpha.n_channels, dtype=per_channel.dtype, device=device) if w is None
                     else w.to(device=device, dtype=per_channel.dtype) for alpha, w in zip(self.alphas, weights)]
                )[layout.out_columns]
            column_weight = torch.zeros(layout.n_columns, dtype=per_channel.dtype, device=device)
            column_weight.index_add_(0, layout.out_columns, per_channel)
        expected = torch.cat([bits @ thetas[a] for a, bits in zip(layout.alphas, layout.bits)])
        return expected @ column_weight[layout.used_columns].to(expected.dtype)

    def column_costs(self, name: str | None = None) -> list[Tensor]:
        """Per alpha, the cost each column stands for, shape ``[n_channels]``: ``d cost / d theta``
        of the column's widest width at the current keep probabilities (``C_in_eff``) and site
        mixtures, in the cost model's unit. The cost is linear in a column's own theta, so this
        is what keeping the column at its widest width costs, given the rest.

        For the size model that is the bits of every weight the column's output channels hold,
        summed over the layers of its group (a head: its Q, K and V rows), the inputs counted at
        their expected kept number. Input-side savings (a consumer's columns) are not counted:
        the search's ``C_in_eff`` is detached, so the column's cost gradient does not see them
        either. At the start of a search these are the initial cost gradients (up to the
        softmax's factor, the same for columns of the same precision set).
        """
        model = get_cost_model(name or self.config.cost_model)
        keep = self._keep_probabilities()
        probes = []
        for alpha in self.alphas:
            probe = torch.zeros(len(alpha.precisions), alpha.n_channels)
            probe[alpha.precisions.index(max(alpha.precisions))] = 1.0
            probes.append(probe.requires_grad_(True))
        pairs = []
        for entry in self._layers.values():
            info = entry.info
            site = self.sites[self._site_key[info.layer.input]].quantizer
            w_theta = probes[info.alpha_index].to(keep[0].device)[:, torch.as_tensor(info.columns)]
            c_in = self._c_in_eff(info, keep)
            pairs.append((info.spec, CostInputs(entry.quantizer.precisions, w_theta, site.precisions,
                                                site.theta().detach(), c_in)))
        total = model.total(pairs)
        if not isinstance(total, Tensor) or not total.requires_grad:
            return [torch.zeros(a.n_channels) for a in self.alphas]
        grads = torch.autograd.grad(total, probes, allow_unused=True)
        out = []
        for alpha, grad in zip(self.alphas, grads):
            widest = alpha.precisions.index(max(alpha.precisions))
            out.append(torch.zeros(alpha.n_channels) if grad is None else grad[widest].detach().abs().cpu())
        return out

    def logit_step_scales(self, name: str | None = None) -> dict[int, Tensor]:
        """``id(alpha parameter) -> [1, n_columns]`` multipliers of the logit gradients for
        ``logit_steps="sgd_per_cost"``: ``ref / C_c`` per column (:meth:`column_costs`); a column
        of no cost keeps 1. Activation sites' logits are not scaled.

        ``ref = sum C_c^2 / sum C_c`` (the cost-weighted mean): a step on the cost alone then
        lowers the expected cost at about the same first-order rate as plain SGD (``sum_c s_c C_c^2 =
        sum_c C_c^2``), so a lambda means what it meant; only the split between columns changes
        (each moves by its task gradient per unit cost, plus lambda)."""
        costs = self.column_costs(name)
        flat = torch.cat(costs) if costs else torch.zeros(0)
        valid = flat[torch.isfinite(flat) & (flat > 0)].double()
        if valid.numel() == 0:
            return {}
        ref = (valid.square().sum() / valid.sum()).float()
        out = {}
        for alpha, cost in zip(self.alphas, costs):
            ok = torch.isfinite(cost) & (cost > 0)
            scale = torch.where(ok, ref / torch.where(ok, cost, torch.ones_like(cost)), torch.ones_like(cost))
            out[id(alpha.alpha)] = scale[None, :].to(alpha.alpha.dtype)
        return out

    def _product_pairs(self, keep: list[Tensor]) -> list[tuple[Any, CostInputs]]:
        """Activation x activation MatMuls under theta: operand B's site mixture per output column,
        scaled by its head's keep probability (0 bits: ``1 - keep``), operand A's as the activation."""
        pairs = []
        for name, info in self.space.products.items():
            a = self.sites[self._site_key[info.product.a]].quantizer
            b = self.sites[self._site_key[info.product.b]].quantizer
            theta_b = b.theta()
            per_head = info.spec.c_out // info.spec.groups
            head_keep = []
            for ref in info.heads or [None] * info.spec.groups:
                unit = self.map.units.get(ref[0]) if ref is not None else None
                head_keep.append(keep[unit.alpha_index][unit.offset + ref[1]] if unit is not None
                                 else torch.ones((), device=theta_b.device))
            columns = torch.stack(head_keep).to(theta_b.dtype).repeat_interleave(per_head)
            w_theta = torch.cat([(1 - columns)[None], columns[None] * theta_b[:, None]], dim=0)
            pairs.append((info.spec, CostInputs((0, *b.precisions), w_theta, a.precisions, a.theta(),
                                                float(info.spec.c_in))))
        return pairs

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
            if 0 in alpha.precisions and self.config.discretisation == "expected":
                bits = self._expected_bits(len(out), theta, precisions, prune_threshold)
            elif 0 in alpha.precisions and self.config.discretisation == "keep_first":
                zero = alpha.precisions.index(0)
                widths = theta.clone()
                widths[zero] = -1.0
                bits = torch.where(theta[zero] > prune_threshold, 0, precisions[widths.argmax(dim=0)])
            if 0 in alpha.precisions:
                fixed = _fixed_pruned(alpha)
                if fixed is not None:
                    bits[fixed] = 0
                self._keep_one_per_unit(alpha_index=len(out), theta=theta, bits=bits, precisions=precisions)
            out.append(bits)
        return out

    def _expected_bits(self, alpha_index: int, theta: Tensor, precisions: Tensor,
                       prune_threshold: float = 0.5) -> Tensor:
        """``discretisation="expected"``: per group, ``round(sum_c theta_0)`` channels pruned (at
        least one kept), those with the largest theta_0 (a ``prune_threshold`` t above 1/2 prunes
        ``round(2 (1 - t) sum_c theta_0)``: the budget's give-back when a plan undershoots it,
        ``budget._loosest_threshold``); the kept ones get widths in the expected
        counts ``sum_c theta_b`` (largest remainder over the kept number), in the order of their
        expected width ``E[b | kept]``: the narrowest quota to the lowest. Ties (within 1e-3) go by
        importance: the least important pruned first, the most important widest."""
        bits = precisions[theta.argmax(dim=0)].clone()
        zero = int((precisions == 0).nonzero()[0])
        widths = [j for j in range(len(precisions)) if j != zero]
        widths.sort(key=lambda j: int(precisions[j]))
        importance = self._importance if self._importance is not None else self.weight_scores()
        for unit in self.map.units.values():
            if unit.alpha_index != alpha_index:
                continue
            n = unit.size
            t = theta[:, unit.offset:unit.offset + n].double()
            imp = importance[alpha_index][unit.offset:unit.offset + n].double()
            t0 = t[zero]
            share = min(1.0, 2 * (1 - prune_threshold)) if prune_threshold > 0.5 else 1.0
            n_prune = min(int(round(share * float(t0.sum()))), n - 1, int((t0 > 0).sum()))
            # ascending importance, then stable descending rounded theta_0: ties by importance
            order = torch.argsort(imp, stable=True)
            order = order[torch.argsort(-(t0[order] * 1000).round(), stable=True)]
            pruned = order[:n_prune]
            kept = order[n_prune:]
            bits[unit.offset + pruned] = 0
            if len(kept) == 0:
                continue
            tw = t[widths][:, kept]
            tw = tw / tw.sum(dim=0, keepdim=True).clamp_min(1e-12)
            expected = tw.sum(dim=1)
            quota = expected.floor().long()
            short = len(kept) - int(quota.sum())
            if short > 0:
                quota[torch.argsort(expected - quota, descending=True, stable=True)[:short]] += 1
            mean_bits = (tw * precisions[widths].double()[:, None]).sum(dim=0)
            rank = torch.argsort(imp[kept], stable=True)
            rank = rank[torch.argsort((mean_bits[rank] * 1000).round(), stable=True)]
            start = 0
            for j, count in zip(widths, quota.tolist()):
                for k in rank[start:start + count].tolist():
                    col = int(kept[k])
                    if float(t[j, col]) > 0:
                        bits[unit.offset + col] = precisions[j]
                    else:  # a width this column may not take: its likeliest allowed one
                        masked = t[:, col].clone()
                        masked[zero] = -1.0
                        bits[unit.offset + col] = precisions[int(masked.argmax())]
                start += count
        return bits

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
        """A plan without costs: per-layer bits read off the columns, assembled by the space."""
        layers = {}
        for entry in self._layers.values():
            info = entry.info
            layers[info.name] = tuple(int(b) for b in column_bits[info.alpha_index][torch.as_tensor(info.columns)])
        scales = self.weight_scales(layers) if with_scales else None
        return self.space.assemble(layers, site_bits, scales=scales, clips=self.clips(), metadata=metadata)

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
        return self.space.with_costs(plan, cost_models)

    def uniform_plan(self, bits: int, cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """Every weight and activation at ``bits``, nothing pruned, scales of the current weights."""
        layers = {name: (int(bits),) * len(entry.info.columns) for name, entry in self._layers.items()}
        sites = {s.tensor: int(bits) for s in self.sites.values()}
        plan = self.space.assemble(layers, sites, scales=self.weight_scales(layers), clips=self.clips(),
                                   metadata={"strategy": f"uniform-{bits}"})
        return self.space.with_costs(plan, cost_models)

    def minimal_plan(self, cost_models: Sequence[str] | None = None) -> CompressionPlan:
        """The cheapest plan the search can reach: one channel per prunable group, lowest bits."""
        return self.space.minimal_plan(cost_models)

    @torch.no_grad()
    def _fold_keep_mass(self, entry: WrappedLayer, inverse: bool = False) -> None:
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

    def unfreeze(self) -> None:
        """Back to search mode (the keep-mass fold of :meth:`freeze` is undone)."""
        for entry in self._layers.values():
            if entry.quantizer.frozen_bits is not None and entry.fold_factor is not None:
                self._fold_keep_mass(entry, inverse=True)
            entry.quantizer.unfreeze()
        for site in self.sites.values():
            site.quantizer.unfreeze()
            site.mask = None

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




# ----------------------------------------------------------------------------- runner


@dataclass
class EpochStats:
    epoch: int
    task_loss: float
    cost: float
    lam: float
    temperature: float


@dataclass
class SearchRunner:
    """Optimisers and schedule state of one search; :meth:`run_epoch` is one pass over the data.

    ``budget.search_to_budget`` drives it with a changing lambda (warm start across rounds).
    """

    searchable: Supernet
    data: Any
    config: SearchConfig
    history: list[EpochStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        from plugin.engine.quantizers import net_param_groups

        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.searchable.to(self.device)
        if cfg.init_clip is None and not self.searchable.calibrated:
            self.searchable.calibrate(self.data, cfg.batch_size, max_batches=4)
        if cfg.prune_init_score == "taylor":
            self.searchable.init_importance(self.data, cfg)
        if cfg.ordered_cost > 0 and getattr(self.searchable, "_cost_weights", None) is None:
            self.searchable.set_ordered_cost(cfg.ordered_cost)
        self.weight_opt = adam(net_param_groups(self.searchable, cfg.weight_decay), lr=cfg.lr)
        self.alpha_opt = self._logit_optimizer()
        self.temperature = cfg.temperature
        self.searchable.set_temperature(self.temperature)
        before = self.searchable.cost_before(cfg.cost_model)
        self.cost_scale = 1.0 / before if cfg.normalise_cost and before > 0 else 1.0

    def _logit_optimizer(self) -> torch.optim.Optimizer:
        """The logits' optimiser (``config.logit_steps``); ``sgd_per_cost`` scales each weight
        logit column's gradient before every step (a step pre-hook, so any loop calling
        ``alpha_opt.step()`` gets it)."""
        cfg, params = self.config, self.searchable.nas_parameters()
        if cfg.logit_steps == "adam":
            opt: torch.optim.Optimizer = adam(params, lr=cfg.alpha_lr)
        else:
            opt = sgd(params, lr=cfg.alpha_lr, momentum=cfg.alpha_momentum)
        if cfg.zero_logit_lr != 1.0:
            self._scale_zero_logits(opt, cfg.zero_logit_lr)
        if cfg.logit_steps == "adam":
            return opt
        if cfg.logit_steps == "sgd_per_cost":
            scales = {key: value.to(self.device)
                      for key, value in self.searchable.logit_step_scales(cfg.cost_model).items()}
            self.logit_scales = scales

            def scale_gradients(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        scale = scales.get(id(p))
                        if scale is not None and p.grad is not None:
                            p.grad.mul_(scale)

            opt.register_step_pre_hook(scale_gradients)
            costs = torch.cat(self.searchable.column_costs(cfg.cost_model))
            logger.info("logit steps per cost: column costs %.3g..%.3g (%s)", float(costs.min()),
                        float(costs.max()), cfg.cost_model)
        return opt

    def _scale_zero_logits(self, opt: torch.optim.Optimizer, factor: float) -> None:
        """``zero_logit_lr``: the 0-bit rows' gradients times ``factor`` before every step (with
        SGD that is a learning rate of ``factor * alpha_lr`` for pruning)."""
        rows = {id(a.alpha): a.precisions.index(0) for a in self.searchable.alphas if 0 in a.precisions}

        def scale_zero_rows(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    row = rows.get(id(p))
                    if row is not None and p.grad is not None:
                        p.grad[row].mul_(factor)

        opt.register_step_pre_hook(scale_zero_rows)

    def _batches(self, epoch: int, max_steps: int | None = None) -> Iterator[Batch]:
        cfg = self.config
        steps = cfg.max_steps_per_epoch if max_steps is None else max_steps
        return iterate_batches(self.data, self.searchable.input_names, cfg.batch_size,
                               cfg.seed + epoch, self.device, steps)

    def teacher_targets(self, inputs: Sequence[Tensor], indices: np.ndarray | None = None) -> Any:
        """The distillation targets of a batch: the FP32 teacher's outputs, read from the
        runner's :class:`~plugin.engine.batches.TeacherCache` when ``indices`` (the batch's
        sample indices into ``data``) were seen before (the teacher and the data are fixed)."""
        cache = getattr(self, "_teacher_cache", None)
        if cache is None:
            cache = self._teacher_cache = TeacherCache.for_data(self.searchable.teacher_outputs, self.data)
        return cache(indices, inputs)

    def train_step(self, inputs: Sequence[Tensor], labels: Tensor | None, lam: float,
                   indices: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """One search step (forward, task loss + ``lam`` * normalised cost, backward, Adam on the
        weights, the logits' step); returns the detached task loss and normalised cost. Each
        group's theta is computed once in the step (:func:`~plugin.engine.quantizers.theta_cache`)."""
        cfg, model = self.config, self.searchable
        with theta_cache():
            teacher = self.teacher_targets(inputs, indices) if cfg.task_loss != "cross_entropy" else None
            loss_task = task_loss(cfg.task_loss, model(*inputs), teacher, labels)
            cost = model.cost(cfg.cost_model) * self.cost_scale
            loss = loss_task + lam * cost
            self.weight_opt.zero_grad(set_to_none=True)
            self.alpha_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.weight_opt.step()
            self.alpha_opt.step()
        return loss_task.detach(), cost.detach()

    def run_epoch(self, lam: float | Callable[[], float], should_stop: Callable[[], bool] | None = None,
                  check_every: int = 1) -> EpochStats:
        """One epoch at ``lam``, then the temperature decays.

        ``lam`` may be a callable, asked before every step (the budget controller's settling
        phase steers lambda within an epoch). ``should_stop`` is asked every ``check_every``
        steps; True ends the epoch early (the budget controller checks the discretised plan this
        way).
        """
        cfg, model = self.config, self.searchable
        epoch = len(self.history)
        total = count_batches(self.data, cfg.batch_size, cfg.max_steps_per_epoch)
        steps = indexed_batches(self.data, model.input_names, cfg.batch_size, cfg.seed + epoch, self.device,
                                cfg.max_steps_per_epoch)
        bar = tqdm(steps, total=total, desc=f"search {epoch + 1}", leave=False, disable=not cfg.progress)
        losses, cost_value = [], float("nan")
        current = lam() if callable(lam) else lam
        for indices, (inputs, labels) in bar:
            current = lam() if callable(lam) else lam
            loss_task, cost = self.train_step(inputs, labels, current, indices)
            losses.append(float(loss_task))
            cost_value = float(cost)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", cost=f"{cost_value:.4f}")
            if should_stop is not None and len(losses) % check_every == 0 and should_stop():
                bar.close()
                break
        stats = EpochStats(epoch + 1, float(np.mean(losses)) if losses else float("nan"), cost_value,
                           float(current), self.temperature)
        self.history.append(stats)
        self.temperature *= math.exp(-cfg.temperature_decay)
        model.set_temperature(self.temperature)
        logger.info("search epoch %d: task loss %.4f, cost %.4f, lambda %.3g, T %.3f",
                    stats.epoch, stats.task_loss, stats.cost, lam, stats.temperature)
        return stats

    def reset_logit_momentum(self) -> None:
        """Forget the logits' optimiser state (momentum), e.g. when lambda's regime changes."""
        self.alpha_opt.state.clear()

    def set_logit_lr(self, lr: float) -> None:
        """The logits' learning rate from the next step on (the budget controller raises Adam's
        past --epochs: Adam's steps do not grow with lambda as SGD's do)."""
        for group in self.alpha_opt.param_groups:
            group["lr"] = float(lr)

    def set_temperature(self, temperature: float) -> None:
        """Set the temperature the next epoch runs at (a schedule other than ``temperature_decay``)."""
        self.temperature = float(temperature)
        self.searchable.set_temperature(self.temperature)

    def lam_at(self, epoch: int) -> float:
        """lambda for ``epoch`` (0-based): ramped from lam/100 over the first half if asked."""
        cfg = self.config
        half = cfg.epochs / 2
        if not cfg.lambda_ramp or half <= 0 or epoch >= half:
            return cfg.lam
        return cfg.lam / 100 * 100 ** (epoch / half)

    def metadata(self, **extra: Any) -> dict[str, Any]:
        cfg = self.config
        return {
            "strategy": "gradient", "cost_model": cfg.cost_model, "normalise_cost": cfg.normalise_cost,
            "seed": int(cfg.seed), "epochs": len(self.history), "task_loss": cfg.task_loss,
            "history": [{k: float(v) if isinstance(v, float) else v for k, v in asdict(s).items()}
                        for s in self.history],
            **extra,
        }


def run_search(searchable: Supernet, data: Any, config: SearchConfig | None = None) -> CompressionPlan:
    """Search for ``config.epochs`` epochs at ``config.lam``; returns the discretised plan."""
    config = config or searchable.config
    runner = SearchRunner(searchable, data, config)
    for epoch in range(config.epochs):
        runner.run_epoch(runner.lam_at(epoch))
    plan = searchable.discretise(metadata=runner.metadata(**{"lambda": float(config.lam),
                                                             "lambda_ramp": config.lambda_ramp}))
    logger.info("search done: %s", searchable.describe_plan(plan, config.cost_model))
    return plan
