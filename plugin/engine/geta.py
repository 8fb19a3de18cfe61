"""GETA's learned-step weight quantizers and the QASSO optimiser schedule (torch side of
``--strategy geta``; Qu et al., CVPR 2025, arXiv 2502.16638). Written from the paper's formulas.

Quantizer (one per weight layer: d, q_m and t are per layer, as in GETA)
    ``y = sign(w) * d * round(min(|w|, q_m)^t / d)``: step ``d``, range ``q_m``, exponent ``t``.
    The bit-width is implicit, ``b = log2(q_m^t / d + 1) + 1``, so ``d(b) = q_m^t / (2^(b-1) - 1)``
    (at ``t = 1``, ``q_m = max|W|`` this is the export's narrow signed grid). Gradients (DJPQ /
    GETA): straight-through for ``w`` inside the range (zero where ``|w| > q_m``);
    ``dy/dd = sign(w) (round(p/d) - p/d)``; ``dy/dq_m = sign(w) t q_m^(t-1)`` where ``|w| >= q_m``;
    ``dy/dt = sign(w) p log|w|`` (``p = min(|w|, q_m)^t``). Starts at ``q_m = max|W|``, ``t = 1``,
    ``d = d(b_u)``. Pruned output channels (a channel group's mask, shared by every layer of the
    group: quantizers never break a group) are zero; the bias gate of
    :class:`~plugin.engine.fakequant.FakeQuantModel` reads the same mask.

    Once a plan is frozen (``freeze``, the cool-down and the shared QAT) the quantizer is the
    export's: :class:`~plugin.engine.quantizers.FrozenWeightQuantizer` (per-channel ``max|W_c|``
    scales at the plan's widths), so what is fine-tuned is what is written.

QASSO (:func:`run_qasso`), over ``T`` steps split into stages (:class:`QassoSchedule`):
    1. warm-up: weights, clips, d, q_m and t by Adam;
    2. projection: after every step d is projected into ``[d(b_hi_now), d(b_lo)]``, so every
       layer's bit-width stays in ``[b_lo, b_hi_now]``; ``b_hi_now`` starts at the user's upper
       bound and drops by ``bit_reduction`` at each of ``projection_periods`` periods (not below
       ``b_lo``);
    3. joint pruning + quantization, ``pruning_periods`` periods: at a period's start every
       prunable group channel still alive is scored (saliency mix, :func:`saliency_scores`) and
       exactly ``K_period`` of the lowest are chosen globally (:func:`select_redundant`; a group
       always keeps one channel); during the period their parameters decay,
       ``x <- (1 - gamma) x`` after each Adam step, with GETA's forget rate (:func:`forget_rate`:
       ``1 / (P - t)`` when ``cos(x, grad) >= 0``, so they reach exactly zero on the period's last
       step); at the period's end they are committed as pruned (zero, masked, no gradient).
       The projection stays in force.
    4. cool-down: bit-widths rounded and frozen (the caller freezes the plan and fine-tunes with
       the export's quantizer; :func:`snap_bits` says how a learned b becomes an exportable width).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from plugin.engine.batches import count_batches, iterate_batches, task_loss
from plugin.engine.fakequant import FakeQuantModel
from plugin.engine.quantizers import FrozenWeightQuantizer, clip_parameters
from plugin.space import LayerInfo

logger = logging.getLogger(__name__)

#: the saliency mix of GETA's default: 0.2 each
DEFAULT_SALIENCY_WEIGHTS: dict[str, float] = {
    "magnitude": 0.2, "avg_magnitude": 0.2, "cosine": 0.2, "taylor_first": 0.2, "taylor_second": 0.2,
}
_T_RANGE = (0.5, 2.0)
_MIN_QM = 1e-8
_EPS = 1e-12

# ----------------------------------------------------------------------------- bit-width algebra


def step_for_bits(bits: float | Tensor, q_m: float | Tensor, t: float | Tensor) -> Tensor:
    """``d(b) = q_m^t / (2^(b-1) - 1)``."""
    q_m, t, bits = (torch.as_tensor(v, dtype=torch.float64) for v in (q_m, t, bits))
    return q_m.abs().clamp_min(_MIN_QM) ** t / (2.0 ** (bits - 1) - 1)


def bits_of(d: float | Tensor, q_m: float | Tensor, t: float | Tensor) -> Tensor:
    """The implicit bit-width ``b = log2(q_m^t / d + 1) + 1`` (a float)."""
    d, q_m, t = (torch.as_tensor(v, dtype=torch.float64) for v in (d, q_m, t))
    return torch.log2(q_m.abs().clamp_min(_MIN_QM) ** t / d.abs().clamp_min(_EPS) + 1) + 1


def project_step(d: Tensor, q_m: Tensor, t: Tensor, lo: float, hi: float) -> Tensor:
    """``d`` clamped into ``[d(hi), d(lo)]``: the bit-width lands in ``[lo, hi]``."""
    d_min = step_for_bits(hi, q_m, t).to(d.dtype)
    d_max = step_for_bits(lo, q_m, t).to(d.dtype)
    return torch.minimum(torch.maximum(d, d_min), d_max)


def upper_bound(hi: int, lo: int, reduction: int, period: int) -> int:
    """The upper bit bound in projection period ``period`` (0-based): ``hi - reduction * period``,
    never below ``lo``."""
    return max(int(lo), int(hi) - int(reduction) * max(0, int(period)))


def snap_bits(bits: float, widths: Sequence[int]) -> int:
    """A learned bit-width -> an exportable one: round to the nearest integer (GETA rounds b), then
    take the smallest allowed width at or above it (3 -> 4, 5..7 -> 8), the widest if none is."""
    allowed = sorted(int(w) for w in widths)
    target = int(round(float(bits)))
    return next((w for w in allowed if w >= target), allowed[-1])


# ----------------------------------------------------------------------------- pruning algebra


def split_counts(total: int, periods: int) -> list[int]:
    """``total`` removals over ``periods`` periods: ``total // periods`` each, the rest on the last
    (GETA's split); the counts sum to ``total`` exactly."""
    periods = max(1, int(periods))
    base = int(total) // periods
    return [base] * (periods - 1) + [int(total) - base * (periods - 1)]


def forget_rate(t: int, period: int, cosine: float, *, lr: float = 0.0, grad_norm: float = 0.0,
                x_norm: float = 1.0, eta: float = 0.999) -> float:
    """GETA's closed-form forget rate at step ``t`` (0-based) of a ``period``-step pruning period.

    ``cos(x, grad) >= 0`` (the gradient step already shrinks the group): ``1 / (period - t)``,
    so ``prod_{s<t} (1 - gamma_s) = (period - t) / period`` and the last step reaches zero.
    ``cos < 0``: ``-(1 - eta) lr |grad| / (cos |x|)``, a small rate that does not fight the
    gradient. A zero (or non-finite) group: 0. Always in [0, 1]."""
    if not math.isfinite(cosine) or x_norm <= _EPS:
        return 0.0
    if cosine >= 0.0:
        return 1.0 / max(1, int(period) - int(t))
    value = -(1.0 - eta) * lr * grad_norm / (cosine * x_norm)
    return float(min(1.0, max(0.0, value)))


def saliency_scores(sq_x: Tensor, dot: Tensor, sq_g: Tensor, numel: Tensor,
                    weights: Mapping[str, float] | None = None) -> Tensor:
    """The saliency mix per group channel from its parameters ``x`` and gradient ``g`` (sums over
    every layer of the group): magnitude ``|x|``, average magnitude ``|x| / n``, cosine
    ``(1 - cos(x, g)) / 2`` (a channel the descent direction already shrinks, ``cos > 0``, is
    cheap to remove), first-order Taylor ``|<x, g>|`` and second-order ``<x, g>^2 / 2``; each
    criterion divided by its largest value, then mixed with ``weights`` (GETA: 0.2 each).
    Low = redundant."""
    weights = dict(DEFAULT_SALIENCY_WEIGHTS if weights is None else weights)
    norm_x = sq_x.clamp_min(0).sqrt()
    cosine = dot / (norm_x * sq_g.clamp_min(0).sqrt()).clamp_min(_EPS)
    parts = {
        "magnitude": norm_x,
        "avg_magnitude": norm_x / numel.clamp_min(1),
        "cosine": (1 - cosine.clamp(-1, 1)) / 2,
        "taylor_first": dot.abs(),
        "taylor_second": 0.5 * dot ** 2,
    }
    total = torch.zeros_like(norm_x)
    for name, weight in weights.items():
        value = parts[name]
        top = value.max() if value.numel() else value.new_zeros(())
        total = total + float(weight) * (value / top if float(top) > 0 else value * 0)
    return total


def select_redundant(scores: Tensor, k: int, group_of: Tensor, room: Tensor) -> list[int]:
    """Exactly ``k`` indices of the lowest ``scores`` (global, over every candidate), taking at
    most ``room[g]`` from group ``g`` (so a group keeps a channel). ``scores`` holds ``inf`` for
    non-candidates. ValueError if fewer than ``k`` can be taken."""
    order = torch.argsort(scores, stable=True).tolist()
    left = room.clone().tolist()
    chosen: list[int] = []
    for index in order:
        if len(chosen) >= k:
            break
        if not math.isfinite(float(scores[index])):
            break
        group = int(group_of[index])
        if left[group] > 0:
            left[group] -= 1
            chosen.append(index)
    if len(chosen) < k:
        raise ValueError(f"only {len(chosen)} of {k} redundant channels can be chosen")
    return chosen


# ----------------------------------------------------------------------------- the quantizer


class _GetaQuantize(torch.autograd.Function):
    """``sign(w) d round(min(|w|, q_m)^t / d)`` with GETA's gradients (module docstring)."""

    @staticmethod
    def forward(ctx, w: Tensor, d: Tensor, q_m: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        a = w.abs()
        q = q_m.abs().clamp_min(_MIN_QM)
        r = torch.minimum(a, q)
        p = torch.where(r > 0, r.clamp_min(_EPS) ** t, torch.zeros_like(r))
        ratio = p / d
        n = torch.round(ratio)
        ctx.save_for_backward(w, d, q, t, r, p, n, ratio)
        return torch.sign(w) * d * n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        w, d, q, t, r, p, n, ratio = ctx.saved_tensors
        sign = torch.sign(w)
        outside = w.abs() >= q
        grad_w = grad * (~outside)
        grad_d = (grad * sign * (n - ratio)).sum()
        grad_q = (grad * sign * outside * (t * q ** (t - 1))).sum()
        log_r = torch.where(r > 0, torch.log(r.clamp_min(_EPS)), torch.zeros_like(r))
        grad_t = (grad * sign * p * log_r).sum()
        return grad_w, grad_d.reshape(d.shape), grad_q.reshape(q.shape), grad_t.reshape(t.shape)


def geta_quantize(w: Tensor, d: Tensor, q_m: Tensor, t: Tensor) -> Tensor:
    return _GetaQuantize.apply(w, d, q_m, t)


class GetaWeightQuantizer(FrozenWeightQuantizer):
    """Learned (d, q_m, t) per layer while ``learned``; the export's per-channel quantizer once a
    plan is frozen. ``frozen_bits`` doubles as the channel mask (0 = pruned) in learned mode."""

    def __init__(self, c_out: int, *, ch_axis: int = 0, q_m: float = 1.0, bits: int = 8) -> None:
        super().__init__(c_out, ch_axis=ch_axis, bits=8)
        q_m = max(float(q_m), 1e-6)
        self.q_m = nn.Parameter(torch.tensor(q_m))
        self.t = nn.Parameter(torch.tensor(1.0))
        self.d = nn.Parameter(step_for_bits(bits, q_m, 1.0).float().reshape(()))
        self.learned = True

    def freeze(self, bits_per_channel: Sequence[int] | Tensor) -> None:
        super().freeze(bits_per_channel)
        self.learned = False

    @torch.no_grad()
    def set_pruned(self, channels: Sequence[int]) -> None:
        """Mask ``channels`` (zero output, zero bias through the bias gate) without leaving learned mode."""
        if len(channels):
            self.frozen_bits[torch.as_tensor(list(channels), dtype=torch.long, device=self.frozen_bits.device)] = 0

    def bits(self) -> float:
        return float(bits_of(self.d.detach(), self.q_m.detach(), self.t.detach()))

    @torch.no_grad()
    def project(self, lo: float, hi: float) -> None:
        self.t.clamp_(*_T_RANGE)
        self.q_m.data = self.q_m.abs().clamp_min(1e-6)
        self.d.copy_(project_step(self.d, self.q_m, self.t, lo, hi))

    def forward(self, w: Tensor) -> Tensor:
        if not self.learned:
            return super().forward(w)
        y = geta_quantize(w, self.d, self.q_m, self.t)
        shape = [1] * w.ndim
        shape[self.ch_axis] = -1
        return y * (self.frozen_bits != 0).to(y.dtype).reshape(shape)


class GetaModel(FakeQuantModel):
    """A :class:`FakeQuantModel` whose weight quantizers are :class:`GetaWeightQuantizer`s, plus
    the map from every weight layer's output channels to the prunable group channels."""

    def _weight_quantizer(self, info: LayerInfo, ch_axis: int) -> nn.Module:
        w = self.analysis.graph.constant(info.layer.weight)
        q_m = float(np.abs(w).max()) if w is not None and np.size(w) else 1.0
        return GetaWeightQuantizer(info.layer.out_channels, ch_axis=ch_axis, q_m=q_m,
                                   bits=max(self.space.precisions.weight_widths))

    def _after_wrapping(self) -> None:
        # prunable group channels, numbered 0..N-1 in the order of space.prunable_groups
        self.group_ids: list[str] = list(self.space.prunable_groups)
        spans: dict[int, list[tuple[int, int, int]]] = {}
        self.channel_group: list[int] = []
        self.channel_ref: list[tuple[str, int]] = []
        for gi, gid in enumerate(self.group_ids):
            unit = self.space.map.units[gid]
            spans.setdefault(unit.alpha_index, []).append((unit.offset, unit.size, len(self.channel_ref)))
            self.channel_group.extend([gi] * unit.size)
            self.channel_ref.extend((gid, k) for k in range(unit.size))
        self.channel_index: dict[str, Tensor] = {}
        for name, entry in self._layers.items():
            info = entry.info
            index = []
            for col in info.columns:
                found = -1
                for offset, size, base in spans.get(info.alpha_index, []):
                    if offset <= col < offset + size:
                        found = base + col - offset
                        break
                index.append(found)
            self.channel_index[name] = torch.tensor(index, dtype=torch.long)

    def geta_quantizers(self) -> dict[str, GetaWeightQuantizer]:
        return {name: entry.quantizer for name, entry in self._layers.items()}

    def raw_params(self, name: str) -> tuple[nn.Parameter, nn.Parameter | None]:
        """The trainable weight and bias (before quantization and gating) of layer ``name``."""
        entry = self._layers[name]
        weight = self._raw(entry, entry.weight_attr)
        bias = self._raw(entry, entry.bias_attr) if entry.bias_attr else None
        return weight, bias

    def set_learned(self, learned: bool) -> None:
        for q in self.geta_quantizers().values():
            q.learned = learned


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class QassoSchedule:
    """Step counts of QASSO's stages (warm-up, projection, joint) and their periods. The
    cool-down is trained by the caller with the plan frozen."""

    warmup: int
    projection: int
    joint: int
    projection_periods: int
    pruning_periods: int

    @classmethod
    def split(cls, steps: int, *, projection_periods: int = 3, pruning_periods: int = 4,
              fractions: tuple[float, float, float] = (1 / 7, 2 / 7, 4 / 7)) -> QassoSchedule:
        """``steps`` split by ``fractions`` (warm-up : projection : joint = 1 : 2 : 4 by default);
        the joint stage gets at least one step per pruning period when it can."""
        steps = max(0, int(steps))
        warm = int(steps * fractions[0])
        proj = int(steps * fractions[1])
        joint = steps - warm - proj
        pruning_periods = max(1, min(int(pruning_periods), max(joint, 1)))
        projection_periods = max(1, min(int(projection_periods), max(proj, 1)))
        return cls(warm, proj, joint, projection_periods, pruning_periods)

    @property
    def total(self) -> int:
        return self.warmup + self.projection + self.joint

    def stage(self, step: int) -> str:
        if step < self.warmup:
            return "warmup"
        if step < self.warmup + self.projection:
            return "projection"
        return "joint"

    def projection_period(self, step: int) -> int:
        """Which projection period ``step`` is in (the joint stage stays in the last one)."""
        if step < self.warmup:
            return 0
        length = max(1, math.ceil(self.projection / self.projection_periods)) if self.projection else 1
        return min(self.projection_periods - 1, (step - self.warmup) // length)

    def pruning_period(self, step: int) -> tuple[int, int, int]:
        """(period, step within it, the period's length) for a joint-stage step."""
        offset = step - self.warmup - self.projection
        base = self.joint // self.pruning_periods
        starts = [i * base for i in range(self.pruning_periods)] + [self.joint]
        period = max(i for i in range(self.pruning_periods) if starts[i] <= offset)
        return period, offset - starts[period], starts[period + 1] - starts[period]


# ----------------------------------------------------------------------------- the optimiser


@dataclass
class QassoConfig:
    lo: int
    hi: int
    n_remove: int
    epochs: int
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    lr: float = 1e-3
    lr_quant: float = 1e-3
    weight_decay: float = 1e-4
    bit_reduction: int = 2
    projection_periods: int = 3
    pruning_periods: int = 4
    saliency: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SALIENCY_WEIGHTS))
    task_loss: str = "distill_kl"
    eta: float = 0.999
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class QassoResult:
    pruned: dict[str, list[int]]
    bits: dict[str, float]
    upper_bound: int
    history: list[dict[str, Any]]
    schedule: QassoSchedule
    seconds: float


class _Channels:
    """Per-channel sums over every layer of each prunable group channel, vectorised."""

    def __init__(self, model: GetaModel) -> None:
        self.model = model
        self.n = len(model.channel_ref)
        self.group_of = torch.tensor(model.channel_group, dtype=torch.long)
        self.layers = [(name, model.channel_index[name]) for name in model.geta_quantizers()
                       if bool((model.channel_index[name] >= 0).any())]

    def _rows(self, name: str, use_grad: Mapping[int, Tensor] | None) -> list[tuple[Tensor, Tensor | None]]:
        weight, bias = self.model.raw_params(name)
        axis = self.model.geta_quantizers()[name].ch_axis
        out = []
        for p, ax in ((weight, axis), (bias, 0)):
            if p is None:
                continue
            g = (use_grad or {}).get(id(p), p.grad)
            x = p.detach().movedim(ax, 0).reshape(p.shape[ax], -1)
            out.append((x, None if g is None else g.detach().movedim(ax, 0).reshape(p.shape[ax], -1)))
        return out

    def sums(self, grads: Mapping[int, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(|x|^2, <x, g>, |g|^2, element count) per group channel."""
        sq_x, dot, sq_g, numel = (torch.zeros(self.n, dtype=torch.float64) for _ in range(4))
        for name, index in self.layers:
            valid = index >= 0
            for x, g in self._rows(name, grads):
                x = x.double().cpu()[valid]
                idx = index[valid]
                sq_x.index_add_(0, idx, (x * x).sum(1))
                numel.index_add_(0, idx, torch.full((len(idx),), float(x.shape[1]), dtype=torch.float64))
                if g is not None:
                    g = g.double().cpu()[valid]
                    dot.index_add_(0, idx, (x * g).sum(1))
                    sq_g.index_add_(0, idx, (g * g).sum(1))
        return sq_x, dot, sq_g, numel

    @torch.no_grad()
    def scale(self, factor: Tensor) -> None:
        """Multiply every parameter of group channel i by ``factor[i]`` (1 = untouched)."""
        for name, index in self.layers:
            weight, bias = self.model.raw_params(name)
            axis = self.model.geta_quantizers()[name].ch_axis
            per = torch.where(index >= 0, factor[index.clamp_min(0)], torch.ones(len(index), dtype=factor.dtype))
            for p, ax in ((weight, axis), (bias, 0)):
                if p is None:
                    continue
                shape = [1] * p.ndim
                shape[ax] = -1
                p.mul_(per.to(p.device, p.dtype).reshape(shape))

    @torch.no_grad()
    def commit(self, channels: Sequence[int]) -> None:
        """Zero and mask ``channels`` for good."""
        chosen = set(int(c) for c in channels)
        factor = torch.ones(self.n, dtype=torch.float64)
        if chosen:
            factor[list(chosen)] = 0.0
        self.scale(factor)
        for name, index in self.layers:
            local = [c for c, i in enumerate(index.tolist()) if i in chosen]
            self.model.geta_quantizers()[name].set_pruned(local)


def _param_groups(model: GetaModel, weight_decay: float, lr: float, lr_quant: float) -> list[dict[str, Any]]:
    quant = {id(p) for q in model.geta_quantizers().values() for p in (q.d, q.q_m, q.t)}
    clips = {id(p) for p in clip_parameters(model)}
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {"net": [], "clips": [], "quant": []}
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        groups["quant" if id(p) in quant else "clips" if id(p) in clips else "net"].append(p)
    return [{"params": groups["net"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["clips"], "weight_decay": 0.0, "lr": lr},
            {"params": groups["quant"], "weight_decay": 0.0, "lr": lr_quant}]


def run_qasso(model: GetaModel, data: Any, config: QassoConfig) -> QassoResult:
    """Warm-up, projection and joint stages (module docstring) on ``model``; returns the pruned
    group channels (exactly ``config.n_remove`` of them) and every layer's learned bit-width."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    steps_per_epoch = count_batches(data, config.batch_size, config.max_steps_per_epoch) or 1
    schedule = QassoSchedule.split(steps_per_epoch * config.epochs, projection_periods=config.projection_periods,
                                   pruning_periods=config.pruning_periods)
    counts = split_counts(config.n_remove, schedule.pruning_periods)
    channels = _Channels(model)
    quantizers = model.geta_quantizers()
    model.set_learned(True)
    optimiser = torch.optim.Adam(_param_groups(model, config.weight_decay, config.lr, config.lr_quant))
    room = torch.tensor([model.space.group_size(g) - 1 for g in model.group_ids], dtype=torch.long)
    pruned: list[int] = []
    redundant: list[int] = []
    grad_acc: dict[int, Tensor] = {}
    acc_steps = 0
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    step = 0
    hi_now = config.hi
    for epoch in range(config.epochs):
        batches = iterate_batches(data, model.input_names, config.batch_size, config.seed + epoch, device,
                                  config.max_steps_per_epoch)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"geta {epoch + 1}", leave=False, disable=not config.progress)
        losses: list[float] = []
        for inputs, labels in bar:
            if step >= schedule.total:
                break
            stage = schedule.stage(step)
            if stage != "warmup":
                hi_now = upper_bound(config.hi, config.lo, config.bit_reduction, schedule.projection_period(step))
            period = t_in = length = 0
            if stage == "joint":
                period, t_in, length = schedule.pruning_period(step)
                if t_in == 0:  # a period starts: choose exactly K_period redundant group channels
                    grads = {k: v / max(acc_steps, 1) for k, v in grad_acc.items()}
                    sq_x, dot, sq_g, numel = channels.sums(grads)
                    scores = saliency_scores(sq_x, dot, sq_g, numel, config.saliency)
                    scores[pruned] = math.inf
                    redundant = select_redundant(scores, counts[period], channels.group_of, room)
                    for c in redundant:
                        room[int(channels.group_of[c])] -= 1
                    history.append({"event": "select", "period": period, "step": step, "k": len(redundant),
                                    "channels": [list(model.channel_ref[c]) for c in redundant]})
                    grad_acc.clear()
                    acc_steps = 0
            teacher = model.teacher_outputs(*inputs) if config.task_loss != "cross_entropy" else None
            loss = task_loss(config.task_loss, model(*inputs), teacher, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for name in quantizers:
                    for p in model.raw_params(name):
                        if p is not None and p.grad is not None:
                            acc = grad_acc.get(id(p))
                            grad_acc[id(p)] = p.grad.detach().clone() if acc is None else acc + p.grad.detach()
                acc_steps += 1
                gamma = None
                if stage == "joint" and redundant:
                    gamma = _forget_factors(channels, redundant, t_in, length, config)
            optimiser.step()
            with torch.no_grad():
                if gamma is not None:
                    channels.scale(gamma)
                if stage != "warmup":
                    for q in quantizers.values():
                        q.project(config.lo, hi_now)
                if stage == "joint" and t_in == length - 1:
                    channels.commit(redundant)
                    pruned.extend(redundant)
                    history.append({"event": "commit", "period": period, "step": step, "pruned": len(pruned)})
                    redundant = []
                elif pruned:
                    channels.commit(pruned)  # keep committed channels at exactly zero (Adam's decay)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", stage=stage)
            step += 1
        if losses:
            bits = [q.bits() for q in quantizers.values()]
            history.append({"epoch": epoch + 1, "stage": schedule.stage(step - 1), "loss": float(np.mean(losses)),
                            "upper_bit": hi_now, "bits_min": min(bits), "bits_max": max(bits),
                            "bits_mean": float(np.mean(bits)), "pruned": len(pruned), "redundant": len(redundant)})
            logger.info("geta epoch %d (%s): loss %.4f, bits %.2f-%.2f, %d pruned", epoch + 1,
                        history[-1]["stage"], history[-1]["loss"], min(bits), max(bits), len(pruned))
    if redundant:  # the run ended inside a period (a short run): commit what it chose
        channels.commit(redundant)
        pruned.extend(redundant)
    missing = config.n_remove - len(pruned)
    if missing > 0:  # too few steps for a joint stage: choose the rest at once, by the same scores
        scores = saliency_scores(*channels.sums(), config.saliency)
        scores[pruned] = math.inf
        rest = select_redundant(scores, missing, channels.group_of, room)
        channels.commit(rest)
        pruned.extend(rest)
        history.append({"event": "select_and_commit", "step": step, "k": len(rest)})
    with torch.no_grad():
        for q in quantizers.values():
            q.project(config.lo, hi_now)
    by_group: dict[str, list[int]] = {}
    for c in pruned:
        gid, k = model.channel_ref[c]
        by_group.setdefault(gid, []).append(k)
    bits = {name: q.bits() for name, q in quantizers.items()}
    return QassoResult({g: sorted(v) for g, v in by_group.items()}, bits, hi_now, history, schedule,
                       time.perf_counter() - start)


def _forget_factors(channels: _Channels, redundant: Sequence[int], t: int, length: int,
                    config: QassoConfig) -> Tensor:
    """``1 - gamma`` per group channel: GETA's forget rate per channel group, over the group's
    redundant channels (1 elsewhere)."""
    sq_x, dot, sq_g, _ = channels.sums()
    chosen = torch.as_tensor(list(redundant), dtype=torch.long)
    n_groups = int(channels.group_of.max()) + 1 if channels.n else 0
    groups = channels.group_of[chosen]
    g_sq_x = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, sq_x[chosen])
    g_dot = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, dot[chosen])
    g_sq_g = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, sq_g[chosen])
    factor = torch.ones(channels.n, dtype=torch.float64)
    for group in sorted(set(groups.tolist())):
        x_norm, g_norm = math.sqrt(float(g_sq_x[group])), math.sqrt(float(g_sq_g[group]))
        cosine = float(g_dot[group]) / max(x_norm * g_norm, _EPS)
        gamma = forget_rate(t, length, cosine, lr=config.lr, grad_norm=g_norm, x_norm=x_norm, eta=config.eta)
        members = chosen[groups == group]
        factor[members] = 1.0 - gamma
    return factor


__all__ = ["DEFAULT_SALIENCY_WEIGHTS", "GetaModel", "GetaWeightQuantizer", "QassoConfig", "QassoResult",
           "QassoSchedule", "bits_of", "forget_rate", "geta_quantize", "project_step", "run_qasso",
           "saliency_scores", "select_redundant", "snap_bits", "split_counts", "step_for_bits", "upper_bound"]
