"""Fake quantizers for the joint pruning + channel-wise mixed-precision search.

Every quantizer computes exactly what the exported ONNX model computes, so the fine-tuned torch
model and the exported QDQ model agree bit for bit (given the same float32 scale):

Weights (:func:`quantize_weight_per_channel`)
    Symmetric, per output channel, zero point 0, *narrow* signed range
    ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` (INT8: [-127, 127], INT4: [-7, 7], INT2: [-1, 1]),
    ``scale_c = max|W_c| / (2^(b-1) - 1)``, ``y = clamp(round(W / scale), -qmax, qmax) * scale``.
    This is ONNX ``DequantizeLinear(q, scale_c, zero_point=0, axis=ch_axis)`` on an INT-b
    initializer.

    Deviation from DESIGN.md, which writes ``scale = 2 * max|W_c| / (2^b - 1)``: that formula
    spreads 2^b levels over [-max, max], which no symmetric grid with an exact zero has. Under
    it, ``max|W_c| / scale = 2^(b-1) - 0.5`` is a half-integer that rounds (half to even) to
    2^(b-1), outside the symmetric range; clipping it back to 2^(b-1) - 1 shrinks the largest
    weight by ``(2^b - 2) / (2^b - 1)`` (2/3 at 2 bits, where the levels would be
    {-2max/3, 0, 2max/3}). With ``scale = 2 * max / (2^b - 2)`` the largest weight sits
    exactly on the grid, the grid is symmetric and zero is exact, and the integers fit the
    ONNX signed type with zero point 0. The -2^(b-1) code of the signed type is never used.

Activations (:func:`pact_quantize`, :func:`symmetric_clip_quantize`)
    PACT: ``scale = clip / (2^b - 1)``, ``y = clamp(round(x / scale), 0, 2^b - 1) * scale``
    = ONNX ``QuantizeLinear``/``DequantizeLinear`` with zero point 0 and UINT8/UINT4/UINT2.
    Deviation from DESIGN.md (``floor``): ``QuantizeLinear`` rounds half to even, as does
    ``torch.round``; with floor the exported model would differ from the fine-tuned one by up
    to one step everywhere. Symmetric clip: ``scale = clip / (2^(b-1) - 1)``, narrow signed
    range, INT-b with zero point 0.

Gradients: straight-through estimator for rounding (identity inside the clip range, zero
outside). Weight scales are statistics of the weight and get no gradient. PACT's clip gets
``dL/dclip = sum of dL/dy where x >= clip`` (Choi et al., 2018); the symmetric quantizer's clip
gets ``+dL/dy`` where ``x >= clip`` and ``-dL/dy`` where ``x <= -clip``.

Searchable quantizers' ``forward`` returns a plain tensor (usable with
``torch.nn.utils.parametrize``); ``quant`` returns a :class:`QuantOutput`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

from plugin.engine import native as _native  # noqa: E402
from plugin.space import DEFAULT_ACTIVATION_PRECISIONS, DEFAULT_WEIGHT_PRECISIONS  # noqa: E402
DEFAULT_INIT_CLIP = 6.0
MAX_BITS = 16
_MIN_CLIP = 1e-6


class QuantOutput(NamedTuple):
    """Uniform quantizer result (Brevitas style).

    ``scale``/``zero_point``/``bit_width`` are per channel (shape ``[C]``) for weights and
    0-d for activations. For searchable quantizers in search mode, ``scale`` and ``zero_point``
    are those of the per-channel argmax precision and ``bit_width`` is the *expected*
    bit-width ``sum_j theta_j * b_j`` (differentiable, float).
    """

    y: Tensor
    scale: Tensor
    zero_point: Tensor
    bit_width: Tensor


# ----------------------------------------------------------------------------- validation


def _check_bits(bits: int, *, minimum: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not minimum <= bits <= MAX_BITS:
        raise ValueError(f"{what}: bit-width must be an int in [{minimum}, {MAX_BITS}], got {bits!r}")
    return bits


def _check_precisions(precisions: Iterable[int], *, allow_zero: bool, what: str) -> tuple[int, ...]:
    values = tuple(precisions)
    if not values:
        raise ValueError(f"{what}: the precision set is empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}: duplicate precisions in {values}")
    for bits in values:
        if bits == 0 and not isinstance(bits, bool):
            if allow_zero:
                continue
            raise ValueError(f"{what}: 0 bits (pruning) is not a valid precision here, got {values}")
        _check_bits(bits, minimum=2, what=what)
    if values == (0,):
        raise ValueError(f"{what}: the precision set needs a non-zero bit-width, got {values}")
    return values


def _check_temperature(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return value


# ----------------------------------------------------------------------------- weights


class _SymmetricRoundSTE(torch.autograd.Function):
    """``clamp(round(w / scale), -qmax, qmax) * scale``; gradient identity where unclipped.

    "Unclipped" tests the rounded integer, so the largest weight (whose ``w / scale`` can
    exceed qmax by an ulp) keeps its gradient.
    """

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, qmax: Tensor) -> Tensor:  # type: ignore[override]
        rounded = torch.round(w / scale)
        ctx.save_for_backward(rounded.abs() <= qmax)
        return torch.clamp(rounded, -qmax, qmax) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class _WeightMixtureSTE(torch.autograd.Function):
    """``sum_k theta_k * Q_k(w)`` of the searchable weight quantizer in one node: ``theta``,
    ``scale`` ``[K, *channel view]``, ``qmax`` ``[K, 1, ...]``, the widths widest first.

    The same operations as the per-width graph (``w.unsqueeze(0)`` through
    :class:`_SymmetricRoundSTE`, times theta, the K slices summed narrowest first), in place into
    one buffer, and a backward that computes what autograd computed for that graph in the same
    order: ``y`` and the gradients of ``w`` and ``theta`` are the same bits. The clip mask is made
    only when a rounded value lies outside its range (the largest weight sits on the grid, so
    normally none does: then the clamp and the mask are identities). ``clipped``, when the caller
    knows it, says so without the ``K x |w|`` check: per width and channel the largest
    ``|round(w / s)|`` is ``round(max|w| / s)`` (rounding half to even is odd and monotone, and so
    is division by ``s > 0``), which :meth:`SearchableWeightQuantizer._mixture` computes on
    ``[K, C]`` (a NaN weight makes both checks false)."""

    @staticmethod
    def forward(ctx, w: Tensor, theta: Tensor, scale: Tensor, qmax: Tensor,  # type: ignore[override]
                clipped: bool | None = None) -> Tensor:
        k = scale.shape[0]
        stacked = torch.div(w.unsqueeze(0), scale)  # [K, *w.shape]
        stacked.round_()
        inside = None
        if clipped is None:  # does any rounded value lie outside its range?
            clipped = bool((stacked.abs().amax(dim=tuple(range(1, stacked.ndim))) > qmax.reshape(-1)).any())
        if clipped:
            inside = stacked.abs() <= qmax
            stacked = torch.clamp(stacked, -qmax, qmax)
        stacked.mul_(scale)
        y = stacked[k - 1] * theta[k - 1]
        term = None
        for j in range(k - 2, -1, -1):
            term = torch.mul(stacked[j], theta[j], out=term) if term is not None else stacked[j] * theta[j]
            y.add_(term)
        ctx.save_for_backward(stacked, theta, inside)
        ctx.theta_dims = [d for d in range(stacked.ndim) if theta.shape[d] == 1 and stacked.shape[d] != 1]
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:  # type: ignore[override]
        stacked, theta, inside = ctx.saved_tensors
        spread = grad.unsqueeze(0).expand_as(stacked)
        grad_q = spread * theta
        if inside is not None:
            grad_q = grad_q * inside
        grad_w = grad_q.sum(dim=0)
        grad_theta = spread * stacked
        if ctx.theta_dims:
            grad_theta = grad_theta.sum(dim=ctx.theta_dims, keepdim=True)
        return grad_w, grad_theta, None, None, None


def _channel_view_shape(ndim: int, ch_axis: int, n_channels: int) -> list[int]:
    shape = [1] * ndim
    shape[ch_axis] = n_channels
    return shape


def _per_channel_absmax(w: Tensor, ch_axis: int) -> Tensor:
    return w.detach().abs().movedim(ch_axis, 0).reshape(w.shape[ch_axis], -1).amax(dim=1)


def _mixture_scales(absmax: Tensor, qmax: Tensor) -> tuple[Tensor, bool]:
    """The weight mixture's scales ``[K, C]`` from the per-channel ``absmax`` ``[C]`` and each
    width's top integer ``qmax`` ``[K]`` (1 where a scale would be 0 or not finite), and whether
    any rounded value lies outside its range (:class:`_WeightMixtureSTE`: per width and channel
    the largest ``|round(w / s)|`` is ``round(max|w| / s)``)."""
    absmax = absmax[None, :]
    scale = absmax / qmax[:, None]
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    return scale, bool((torch.round(absmax / scale) > qmax[:, None]).any())


def _bits_tensor(bits: int | Sequence[int] | Tensor, n_channels: int, device: torch.device) -> Tensor:
    if isinstance(bits, int) and not isinstance(bits, bool):
        if bits != 0:
            _check_bits(bits, minimum=2, what="weight quantizer")
        return torch.full((n_channels,), bits, dtype=torch.long, device=device)
    out = torch.as_tensor(bits, device=device).reshape(-1)
    if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise ValueError(f"weight quantizer: bit-widths must be integers, got dtype {out.dtype}")
    out = out.long()
    if out.numel() != n_channels:
        raise ValueError(f"weight quantizer: {out.numel()} bit-widths for {n_channels} channels")
    bad = (out == 1) | (out < 0) | (out > MAX_BITS)
    if bool(bad.any()):
        raise ValueError(f"weight quantizer: bit-widths must be 0 or in [2, {MAX_BITS}], got {out.tolist()}")
    return out


def _top_integers(bit_width: Tensor, kept: Tensor, dtype: torch.dtype) -> Tensor:
    """Each channel's top integer ``2^(b-1) - 1`` (1 for a pruned channel), in ``dtype``."""
    return torch.where(kept, 2 ** (bit_width - 1).clamp_min(1) - 1, 1).to(dtype)


def quantize_weight_per_channel(
    w: Tensor, bits: int | Sequence[int] | Tensor, ch_axis: int = 0
) -> QuantOutput:
    """Symmetric per-channel fake quantization of a weight tensor (see the module docstring).

    ``bits`` is one bit-width for all channels or one per channel (mixed widths in one
    tensor); 0 means pruned: those channels are zero (no gradient) with scale 1. A channel
    whose weights are all zero gets scale 1 (never 0 or NaN). Returns per-channel ``scale``
    (same dtype as ``w``), ``zero_point`` (int zeros) and ``bit_width`` (long).
    """
    ch_axis = ch_axis % w.ndim
    n_channels = w.shape[ch_axis]
    bit_width = _bits_tensor(bits, n_channels, w.device)
    kept = bit_width > 0
    qmax = _top_integers(bit_width, kept, w.dtype)
    scale = _per_channel_absmax(w, ch_axis) / qmax
    scale = torch.where(kept & (scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    view = _channel_view_shape(w.ndim, ch_axis, n_channels)
    y = _SymmetricRoundSTE.apply(w, scale.reshape(view), qmax.reshape(view))
    y = torch.where(kept.reshape(view), y, torch.zeros_like(y))
    zero_point = torch.zeros(n_channels, dtype=torch.int32, device=w.device)
    return QuantOutput(y, scale, zero_point, bit_width)


class _FrozenRoundSTE(torch.autograd.Function):
    """The frozen per-channel quantizer's ``y`` in one node, where no rounded value can leave its
    range (:func:`_frozen_weight_y` checks): ``round(w / scale) * scale``, zero in pruned
    channels; the gradient passes unchanged (masked to the kept channels when some are pruned).
    The same values and gradients, bit for bit, as :func:`quantize_weight_per_channel`, whose
    clamp and pass-through mask are identities there."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, kept: Tensor | None) -> Tensor:  # type: ignore[override]
        y = torch.div(w, scale).round_().mul_(scale)
        ctx.kept = kept
        if kept is not None:
            y = torch.where(kept, y, 0.0)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.kept is None:
            return grad, None, None
        return torch.where(ctx.kept, grad, 0.0), None, None


def _frozen_weight_y(owner: nn.Module, w: Tensor, bits: Tensor, ch_axis: int) -> Tensor:
    """``quantize_weight_per_channel(w, bits, ch_axis).y`` (the same bits and gradients) for a
    frozen quantizer's training step, with what depends only on ``bits`` (validated once; the
    top integers, the kept mask) cached on ``owner`` per bits tensor, version, dtype and device.

    ``scale = max|w_c| / qmax_c`` (1 where that is 0 or not finite, as there) normally puts each
    channel's largest weight on the grid, so no rounded value lies outside its range, the clamp
    and the straight-through mask are identities, and one node computes ``y``
    (:class:`_FrozenRoundSTE`). That is checked each step on ``[C]``: per channel the largest
    ``|round(w / s)|`` is ``round(max|w| / s)`` (see :class:`_WeightMixtureSTE`); where a kept
    channel's exceeds ``qmax_c`` or is NaN (non-finite or subnormal-scale weights) the general
    function runs instead."""
    ch = ch_axis % w.ndim
    key = (id(bits), bits._version, w.dtype, w.device, ch, w.ndim)
    cached = owner.__dict__.get("_frozen_cache")
    if cached is None or cached[0] != key or cached[1] is not bits:
        bit_width = _bits_tensor(bits, w.shape[ch], w.device)
        kept = bit_width > 0
        qmax = _top_integers(bit_width, kept, w.dtype)
        view = _channel_view_shape(w.ndim, ch, w.shape[ch])
        bound = torch.where(kept, qmax, math.inf)  # a pruned channel's values are zeroed: any fits
        cached = (key, bits, qmax, bound, None if bool(kept.all()) else kept, kept.reshape(view), view)
        owner.__dict__["_frozen_cache"] = cached
    _, _, qmax, bound, pruned_some, kept_view, view = cached
    absmax = _per_channel_absmax(w, ch)
    scale = absmax / qmax
    valid = (scale > 0) & torch.isfinite(scale)
    if pruned_some is not None:
        valid &= pruned_some
    scale = torch.where(valid, scale, 1.0)
    if not bool((torch.round(absmax / scale) <= bound).all()):  # NaN compares false
        return quantize_weight_per_channel(w, bits, ch).y
    return _FrozenRoundSTE.apply(w, scale.reshape(view), None if pruned_some is None else kept_view)


class SharedAlpha(nn.Module):
    """NAS logits ``alpha[j, g]`` over ``precisions`` for ``n_channels`` group channels.

    Held once per channel group (or activation site) and passed to every quantizer of the
    group, so they all see the same theta. Initial ``alpha_j = b_j / max(b)``.
    """

    def __init__(self, precisions: Sequence[int], n_channels: int) -> None:
        super().__init__()
        self.precisions = _check_precisions(precisions, allow_zero=True, what="SharedAlpha")
        if n_channels < 1:
            raise ValueError(f"SharedAlpha: n_channels must be >= 1, got {n_channels}")
        init = torch.tensor(self.precisions, dtype=torch.float32) / max(self.precisions)
        self.alpha = nn.Parameter(init.unsqueeze(1).repeat(1, n_channels))
        self.register_buffer("logit_mask", None, persistent=False)

    @property
    def n_channels(self) -> int:
        return self.alpha.shape[1]

    @torch.no_grad()
    def fix_columns(self, columns: Sequence[int], bits: int) -> None:
        """Force ``columns`` to precision ``bits`` (theta one-hot there, for good)."""
        if bits not in self.precisions:
            raise ValueError(f"fix_columns: {bits} is not in the precision set {self.precisions}")
        mask = self.logit_mask if self.logit_mask is not None else torch.zeros_like(self.alpha)
        index = torch.as_tensor(list(columns), dtype=torch.long)
        mask[:, index] = float("-inf")
        mask[self.precisions.index(bits), index] = 0.0
        self.logit_mask = mask

    @torch.no_grad()
    def forbid(self, columns: Sequence[int], bits: int) -> None:
        """Take precision ``bits`` away from ``columns`` (e.g. no pruning of kept channels)."""
        mask = self.logit_mask if self.logit_mask is not None else torch.zeros_like(self.alpha)
        index = torch.as_tensor(list(columns), dtype=torch.long)
        mask[self.precisions.index(bits), index] = float("-inf")
        if bool(torch.isinf(mask[:, index]).all(dim=0).any()):
            raise ValueError("forbid: a column would have no precision left")
        self.logit_mask = mask

    def theta(self, temperature: float) -> Tensor:
        """``softmax(alpha / T)`` over precisions, shape ``[len(precisions), n_channels]``.

        Inside :func:`theta_cache` computed once per step: every reader (the layers of the group,
        their bias gates, the cost) gets the same tensor while the logits are unchanged."""
        memo = getattr(_THETA_MEMO, "store", None)
        if memo is None:
            return self._theta(temperature)
        mask = self.logit_mask
        key = (float(temperature), self.alpha._version, torch.is_grad_enabled(),
               None if mask is None else (id(mask), mask._version))
        hit = memo.get(id(self))
        if hit is not None and hit[0] == key and hit[1] is self:
            return hit[2]
        out = self._theta(temperature)
        memo[id(self)] = (key, self, out)
        return out

    def _theta(self, temperature: float) -> Tensor:
        logits = self.alpha / _temperature_tensor(temperature, self.alpha)
        if self.logit_mask is not None:
            logits = logits + self.logit_mask
        return torch.softmax(logits, dim=0)


_THETA_MEMO = threading.local()
_TEMPERATURES: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _temperature_tensor(temperature: float, like: Tensor) -> Tensor:
    """``temperature`` as a 0-d tensor of ``like``'s dtype and device, kept per value: ``alpha / T``
    then divides by the same float32 (torch rounds a Python scalar to the tensor's dtype: the same
    values and gradients, bit for bit) without wrapping and converting the scalar twice a step per
    group (about 5 us each time on CPU)."""
    key = (float(temperature), like.dtype, like.device)
    t = _TEMPERATURES.get(key)
    if t is None:
        if len(_TEMPERATURES) > 256:  # a schedule makes one per epoch: keep the table small
            _TEMPERATURES.clear()
        t = _TEMPERATURES[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
    return t


@contextlib.contextmanager
def theta_cache() -> Iterator[None]:
    """Within the block, each :class:`SharedAlpha`'s theta (and each searchable quantizer's
    columns of it) is computed once per logits version, temperature and grad mode, and shared by
    every reader: one softmax per group per training step instead of one per reader. The values
    are the same bits; the logits' gradient is the same sum, accumulated in another order (one
    softmax backward of the summed readers' gradients). Enter it around one step (forward,
    backward, optimiser step): a tensor kept past the step would hold a freed graph."""
    previous = getattr(_THETA_MEMO, "store", None)
    _THETA_MEMO.store = {}
    try:
        yield
    finally:
        _THETA_MEMO.store = previous


def _memo_columns(owner: nn.Module, base: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(base)``, once per ``base`` tensor inside :func:`theta_cache` (else every call)."""
    memo = getattr(_THETA_MEMO, "store", None)
    if memo is None:
        return make(base)
    hit = memo.get(id(owner))
    if hit is not None and hit[0] is base and hit[1] is owner:
        return hit[2]
    out = make(base)
    memo[id(owner)] = (base, owner, out)
    return out


class _SearchableBase(nn.Module):
    """Temperature and frozen/unfrozen state shared by the searchable quantizers."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self._temperature = _check_temperature(temperature)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)

    @property
    def is_frozen(self) -> bool:
        return getattr(self, "frozen_bits", None) is not None

    def unfreeze(self) -> None:
        """Back to search mode (the mixture over all precisions)."""
        self.frozen_bits = None


class SearchableWeightQuantizer(_SearchableBase):
    """Mixture ``sum_j theta[j, c] * Q_{b_j}(W_c)`` over a per-channel precision choice.

    ``alpha`` is an externally owned :class:`SharedAlpha` (shared by all layers of a channel
    group) or None for a private one over ``precisions`` with one column per output channel.
    ``channel_to_group_index[c]`` is the group channel (alpha column) of output channel ``c``;
    None means the identity (needs ``alpha.n_channels == c_out``). Use precisions without 0
    for a channel group that cannot be pruned.
    """

    frozen_bits: Tensor | None

    def __init__(
        self,
        c_out: int,
        precisions: Sequence[int] = DEFAULT_WEIGHT_PRECISIONS,
        *,
        ch_axis: int = 0,
        alpha: SharedAlpha | None = None,
        channel_to_group_index: Tensor | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        if c_out < 1:
            raise ValueError(f"SearchableWeightQuantizer: c_out must be >= 1, got {c_out}")
        self.c_out = c_out
        self.ch_axis = ch_axis
        self.precisions = _check_precisions(precisions, allow_zero=True, what="SearchableWeightQuantizer")
        self.alpha = alpha if alpha is not None else SharedAlpha(self.precisions, c_out)
        if self.alpha.precisions != self.precisions:
            raise ValueError(
                f"SearchableWeightQuantizer: shared alpha has precisions {self.alpha.precisions}, "
                f"this quantizer {self.precisions}; build both from the same channel group"
            )
        index = self._index_map(channel_to_group_index)
        self.register_buffer("channel_to_group_index", index, persistent=False)
        self.register_buffer("frozen_bits", None, persistent=False)

    def _index_map(self, index: Tensor | None) -> Tensor:
        n_group = self.alpha.n_channels
        if index is None:
            if n_group != self.c_out:
                raise ValueError(
                    f"SearchableWeightQuantizer: alpha covers {n_group} group channels but the "
                    f"layer has {self.c_out} output channels; pass channel_to_group_index"
                )
            return torch.arange(self.c_out)
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).clone()
        if index.numel() != self.c_out or bool((index < 0).any()) or bool((index >= n_group).any()):
            raise ValueError(
                f"SearchableWeightQuantizer: channel_to_group_index needs {self.c_out} entries "
                f"in [0, {n_group}), got {index.tolist()}"
            )
        return index

    def theta(self) -> Tensor:
        """``softmax(alpha / T)`` per output channel, shape ``[len(precisions), c_out]``."""
        return _memo_columns(self, self.alpha.theta(self._temperature),
                             lambda theta: theta[:, self.channel_to_group_index])

    def c_out_eff(self) -> Tensor:
        """Expected kept channels ``C_out - sum_c theta[0, c]`` (differentiable, 0-d)."""
        if 0 not in self.precisions:
            return self.alpha.alpha.new_tensor(float(self.c_out))
        return self.c_out - self.theta()[self.precisions.index(0)].sum()

    def expected_bit_width(self) -> Tensor:
        """``sum_j theta[j, c] * b_j`` per output channel (differentiable)."""
        theta = self.theta()
        return (theta * theta.new_tensor(self.precisions)[:, None]).sum(dim=0)

    def argmax_bits(self) -> list[int]:
        """Per output channel, the precision with the largest theta (the discretised plan)."""
        best = self.theta().detach().argmax(dim=0)
        return [self.precisions[i] for i in best.tolist()]

    def rescale_factor(self) -> Tensor:
        """Per-channel ``1 / sum_{b != 0} theta_b`` (detached); 1 without a 0-bit option."""
        theta = self.theta().detach()
        kept = [j for j, b in enumerate(self.precisions) if b != 0]
        mass = theta[kept].sum(dim=0)
        return torch.where(mass > 0, 1.0 / mass.clamp_min(torch.finfo(mass.dtype).tiny), torch.ones_like(mass))

    @torch.no_grad()
    def rescale_weight_(self, weight: Tensor) -> None:
        """Multiply ``weight`` in place by :meth:`rescale_factor` (the search's initial step).

        Per-channel quantization commutes with a positive per-channel factor, so afterwards
        the mixture at the initial theta equals the theta-average of ``Q_b(W)`` over b != 0.
        """
        factor = self.rescale_factor().to(weight.dtype)
        weight.mul_(factor.reshape(_channel_view_shape(weight.ndim, self.ch_axis % weight.ndim, self.c_out)))

    def freeze(self, bits_per_channel: Sequence[int] | Tensor) -> None:
        """Fix one bit-width per output channel (each in ``precisions``) for QAT."""
        bits = torch.as_tensor(bits_per_channel, dtype=torch.long).reshape(-1)
        if bits.numel() != self.c_out:
            raise ValueError(f"freeze: {bits.numel()} bit-widths for {self.c_out} output channels")
        unknown = sorted(set(bits.tolist()) - set(self.precisions))
        if unknown:
            raise ValueError(f"freeze: bit-widths {unknown} are not in the precision set {self.precisions}")
        self.frozen_bits = bits.to(self.channel_to_group_index.device)
        logger.debug("froze weight quantizer: %s", bits.tolist())

    def quant(self, w: Tensor) -> QuantOutput:
        if w.shape[self.ch_axis] != self.c_out:
            raise ValueError(
                f"SearchableWeightQuantizer: weight has {w.shape[self.ch_axis]} channels on axis "
                f"{self.ch_axis}, expected {self.c_out}"
            )
        if self.frozen_bits is not None:
            return quantize_weight_per_channel(w, self.frozen_bits, self.ch_axis)
        return self._mixture(w)

    def _mixture(self, w: Tensor, y_only: bool = False) -> QuantOutput:
        """``sum_j theta_j * Q_{b_j}(W)``, all non-zero widths in one batched fake-quantization
        (the 0-bit term is zero): one absmax and one rounding pass instead of one per width.

        On one quantizer this is bit-identical to summing ``quantize_weight_per_channel`` per
        width (values and gradients; widths are stacked widest first so autograd sums the
        weight gradient in the per-width graph's order, and the forward adds narrowest first).
        In a whole model the alpha gradients, shared with bias gates and the cost, are summed
        in another order, so training differs from the per-width version by float rounding.
        Measured alone on 2 cores: 5-20% less training time per search (benchmarks/README.md).
        The rounding, clipping and weighted sum are one autograd node (:class:`_WeightMixtureSTE`:
        the same values and gradients bit for bit as the per-width graph it replaces).
        """
        theta = self.theta().to(w.dtype)
        ch = self.ch_axis % w.ndim
        kept, qmax, kept_index = self._kept_widths(w)
        scale, clipped = _mixture_scales(_per_channel_absmax(w, ch), qmax)
        view = [len(kept), *_channel_view_shape(w.ndim, ch, self.c_out)]
        y = _WeightMixtureSTE.apply(w, theta.index_select(0, kept_index).reshape(view), scale.reshape(view),
                                    qmax.reshape([len(kept)] + [1] * w.ndim), clipped)
        if y_only:  # forward(): the scale, zero point and expected width below are not used
            return QuantOutput(y, None, None, None)  # type: ignore[arg-type]
        best = theta.detach().argmax(dim=0)
        scales = torch.ones(len(self.precisions), self.c_out, dtype=w.dtype, device=w.device)
        scales[kept] = scale.detach()
        scale_best = scales.gather(0, best[None]).squeeze(0)
        zero_point = torch.zeros(self.c_out, dtype=torch.int32, device=w.device)
        return QuantOutput(y, scale_best, zero_point, self.expected_bit_width())

    def _kept_widths(self, w: Tensor) -> tuple[list[int], Tensor, Tensor]:
        """The non-zero widths' indices, widest first (a list and a long tensor), and their top
        integers (cached per dtype and device: no tensor made from a list every step)."""
        key = (w.dtype, w.device)
        cached = self.__dict__.get("_kept_cache")
        if cached is None or cached[0] != key or cached[1] != self.precisions:
            kept = sorted((j for j, b in enumerate(self.precisions) if b != 0), key=lambda j: -self.precisions[j])
            cached = (key, self.precisions, kept, w.new_tensor([2 ** (self.precisions[j] - 1) - 1 for j in kept]),
                      torch.tensor(kept, dtype=torch.long, device=w.device))
            self.__dict__["_kept_cache"] = cached
        return cached[2], cached[3], cached[4]

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen_bits is None and w.shape[self.ch_axis] == self.c_out:
            batch = self.__dict__.get("_weight_batch")  # plugin.engine.weight_batch: every layer in one node
            y = batch.lookup(self, w) if batch is not None else None
            if y is not None:
                return y
            return self._mixture(w, y_only=True).y  # the same y as quant(w).y, less work per step
        if self.frozen_bits is not None and w.shape[self.ch_axis] == self.c_out and _FROZEN_WEIGHT_NODE:
            return _frozen_weight_y(self, w, self.frozen_bits, self.ch_axis)  # quant(w).y, less work
        return self.quant(w).y


# ----------------------------------------------------------------------------- activations


class _PactSTE(torch.autograd.Function):
    """PACT forward ``clamp(round(x / s), 0, n) * s`` with ``s = clip / n``. On CPU the
    backward's masks come from :func:`_masked_gradients` against the saved ``x`` (the same
    gradients, no bool tensors); elsewhere the bool masks are saved."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, n_levels: int) -> Tensor:  # type: ignore[override]
        clip = _floored(clip)
        ctx.clip_shape = clip.shape
        ctx.fast = x.device.type == "cpu" and _FLOAT_MASKS_ON_CPU
        if ctx.fast:
            ctx.clip_value = float(clip)
            ctx.save_for_backward(x)
        else:
            above = x >= clip
            ctx.save_for_backward((x >= 0) & ~above, above)  # bool masks: 1 byte per element
        scale = clip / n_levels
        return torch.div(x, scale).round_().clamp_(0, n_levels).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        if ctx.fast:
            (x,) = ctx.saved_tensors
            inside, edge = _masked_gradients(grad, x, ctx.clip_value, False)
            return inside, edge.reshape(ctx.clip_shape), None
        inside, above = ctx.saved_tensors
        return grad * inside, (grad * above).sum().reshape(ctx.clip_shape), None


class _SymmetricClipSTE(torch.autograd.Function):
    """Forward ``clamp(round(x / s), -q, q) * s`` with ``s = clip / q``, ``q = 2^(b-1) - 1``; the
    backward's masks as :class:`_PactSTE`'s."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, qmax: int) -> Tensor:  # type: ignore[override]
        clip = _floored(clip)
        ctx.clip_shape = clip.shape
        ctx.fast = x.device.type == "cpu" and _FLOAT_MASKS_ON_CPU
        if ctx.fast:
            ctx.clip_value = float(clip)
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(x >= clip, x <= -clip)  # bool masks: 1 byte per element
        scale = clip / qmax
        return torch.div(x, scale).round_().clamp_(-qmax, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        if ctx.fast:
            (x,) = ctx.saved_tensors
            inside, edge = _masked_gradients(grad, x, ctx.clip_value, True)
            return inside, edge.reshape(ctx.clip_shape), None
        above, below = ctx.saved_tensors
        grad_clip = (grad * above).sum() - (grad * below).sum()
        return grad * ~(above | below), grad_clip.reshape(ctx.clip_shape), None


class _ActivationMixtureSTE(torch.autograd.Function):
    """``sum_j theta_j * Q_j(x)`` of the searchable activation quantizer in one node.

    The widths share one clip, so the pass-through and clip masks of every ``Q_j`` (PACT or
    symmetric clip, as :class:`_PactSTE` / :class:`_SymmetricClipSTE`) are the same: they are
    made once, and the backward needs no per-width products. ``y`` is the same value, bit for
    bit, as the per-width sum (the same operations in the same order, in place into one buffer);
    the gradients are the same sums taken in another order (measured: 1e-7 relative on x, the
    clip and the logits' gradient to float32 reduction rounding).

    On CPU no boolean mask is made or saved (a comparison into a bool tensor costs about five
    float passes there): the backward masks the gradient against ``x`` itself (saved; often the
    producer's ReLU saves that tensor already) with :func:`_masked_gradients`, which selects
    exactly the elements the masks select. Elsewhere the boolean masks are saved.
    ``levels``: the top integer of each width (``2^b - 1`` unsigned, ``2^(b-1) - 1`` signed)."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, theta: Tensor, levels: tuple[int, ...],  # type: ignore[override]
                signed: bool) -> Tensor:
        clip, clip_value = _floored_value(clip)
        ctx.native = None
        if _NATIVE_MIXTURE and _FLOAT_MASKS_ON_CPU and _native.usable(x, len(levels)) and (
                signed or _subnormal_bound_holds(_LOWEST_FLOAT32, torch.float32)):
            # the compiled loops (plugin.engine.native): the same y, no [K, *x.shape] buffer; the
            # kernel takes each scale clip / n as torch's 0-d float32 division computes it
            ctx.native = clip_value
            ctx.signed, ctx.clip_shape, ctx.levels = signed, clip.shape, levels
            ctx.save_for_backward(x, theta)
            return _native.forward(x, clip_value, theta, levels, signed)
        stacked = x.new_empty((len(levels), *x.shape))  # every Q_j(x): the logits' gradient
        y = term = None
        for j, n in enumerate(levels):
            scale = clip / n
            q = stacked[j]
            torch.div(x, scale, out=q)
            q.round_().clamp_(-n if signed else 0, n).mul_(scale)
            if y is None:
                y = q * theta[j]
            else:
                term = torch.mul(q, theta[j], out=term) if term is not None else q * theta[j]
                y.add_(term)
        ctx.signed = signed
        ctx.clip_shape = clip.shape
        ctx.fast = x.device.type == "cpu" and _FLOAT_MASKS_ON_CPU
        if ctx.fast:
            ctx.clip_value = clip_value
            ctx.save_for_backward(x, stacked, theta)
        elif signed:
            above, below = x >= clip, x <= -clip
            ctx.save_for_backward(~(above | below), above, below, stacked, theta)
        else:
            above = x >= clip
            ctx.save_for_backward((x >= 0) & ~above, above, stacked, theta)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        if ctx.native is not None:
            x, theta = ctx.saved_tensors
            grad_x, out = _native.backward(x, grad, ctx.native, float(theta.sum()), ctx.levels, ctx.signed)
            grad_theta = out[1:] if theta.dtype == torch.float32 else out[1:].to(theta.dtype)
            return grad_x, out[0].reshape(ctx.clip_shape), grad_theta, None, None
        if ctx.fast:
            x, stacked, theta = ctx.saved_tensors
            inside, edge = _masked_gradients(grad, x, ctx.clip_value, ctx.signed)
        elif ctx.signed:
            inside_mask, above, below, stacked, theta = ctx.saved_tensors
            edge = (grad * above).sum() - (grad * below).sum()
            inside = grad * inside_mask
        else:
            inside_mask, above, stacked, theta = ctx.saved_tensors
            edge = (grad * above).sum()
            inside = grad * inside_mask
        total = theta.sum()  # d y / d x = sum_j theta_j inside the clip range
        grad_theta = stacked.reshape(len(stacked), -1) @ grad.reshape(-1).to(stacked.dtype)
        return inside * total, (edge * total).reshape(ctx.clip_shape), grad_theta, None, None


class _OneWidthMixtureSTE(torch.autograd.Function):
    """The activation mixture over one width: theta is the softmax of one logit, exactly 1, so
    ``theta_0 * Q(x)`` is ``Q(x)`` and the node is :class:`_PactSTE` / :class:`_SymmetricClipSTE`
    (the same y and gradients of ``x`` and the clip, bit for bit, as :class:`_ActivationMixtureSTE`
    with one width). The logit's gradient, which a one-element softmax makes exactly 0 whatever
    reaches theta, is returned as zeros for the logit itself (``logits``, the ``[1, 1]``
    parameter): the logit still gets its (zero) gradient, without the softmax, the
    ``Q(x) . grad`` reduction, the ``theta * Q(x)`` pass and the stacked buffer of the mixture."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, logits: Tensor, n: int, signed: bool) -> Tensor:  # type: ignore[override]
        ctx.one_width = _SymmetricClipSTE if signed else _PactSTE
        ctx.theta_like = (logits.shape, logits.dtype, logits.device)
        return ctx.one_width.forward(ctx, x, clip, n)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        grad_x, grad_clip, _ = ctx.one_width.backward(ctx, grad)
        shape, dtype, device = ctx.theta_like
        return grad_x, grad_clip, torch.zeros(shape, dtype=dtype, device=device), None, None


_FLOAT_MASKS_ON_CPU = True  # False: the boolean masks on CPU too (tests compare the two)
_SINGLE_WIDTH_SHORTCUT = True  # False: a one-width activation site runs the mixture node too (tests, benchmarks)
_LOWEST_FLOAT32 = -float(torch.finfo(torch.float32).tiny) * float(torch.finfo(torch.float32).eps)  # -(smallest subnormal)
_NATIVE_MIXTURE = True  # False: the eager mixture node even where the compiled kernel is available (tests, benchmarks)
_FROZEN_WEIGHT_NODE = True  # False: frozen weight quantizers' forward runs quantize_weight_per_channel (tests, benchmarks)


def _subnormal_bound_holds(lowest: float, dtype: torch.dtype) -> bool:
    """Whether ``0 <= lowest`` is false in this thread's float arithmetic at ``dtype`` (``lowest``
    minus the dtype's smallest subnormal): false where denormals are flushed
    (``torch.set_flush_denormal``: the bound becomes -0 (FTZ, when converted) or is read as 0 (DAZ)).
    float32 and float64 ask the CPU through Python floats (``struct`` converts to float32 with a C
    cast, as the kernel's scalar is), about 1 us; other dtypes run a one-element
    ``hardtanh_backward`` (about 50 us)."""
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<f", lowest))[0] < 0.0
    if dtype == torch.float64:
        return lowest < 0.0
    probe = torch.ops.aten.hardtanh_backward(torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype), lowest, 1.0)
    return bool(probe[0] == 1)


def _masked_gradients(grad: Tensor, x: Tensor, clip: float, signed: bool) -> tuple[Tensor, Tensor]:
    """The clip quantizers' straight-through masks applied with float kernels only:
    ``(grad where it passes, sum of grad where x >= clip, minus where x <= -clip if signed)``;
    unsigned passes ``0 <= x < clip``, signed ``-clip < x < clip``. ``threshold_backward(g, x, t)``
    is ``x <= t ? 0 : g`` and ``hardtanh_backward(g, x, lo, hi)`` is ``x <= lo or x >= hi ? 0 : g``;
    ``x >= clip`` is ``x > nextafter(clip, -inf)`` and ``x >= 0`` is ``x > -(smallest subnormal)``
    (unless denormals are flushed: then ``x < 0`` is taken out as ``-x > 0``). NaN inputs pass."""
    aten = torch.ops.aten
    info = torch.finfo(x.dtype)
    below_clip = math.nextafter(clip, -math.inf) if x.dtype == torch.float64 else \
        float(np.nextafter(np.float32(clip), np.float32(-np.inf))) if x.dtype == torch.float32 else \
        float(torch.nextafter(torch.tensor(clip, dtype=x.dtype), torch.tensor(-math.inf, dtype=x.dtype)))
    edge = aten.threshold_backward(grad, x, below_clip).sum()  # x >= clip
    if signed:
        edge = edge - aten.threshold_backward(grad, x.neg(), below_clip).sum()  # x <= -clip
        return aten.hardtanh_backward(grad, x, -clip, clip), edge
    lowest = -float(info.tiny) * float(info.eps)  # minus the smallest subnormal
    if _subnormal_bound_holds(lowest, x.dtype):
        return aten.hardtanh_backward(grad, x, lowest, clip), edge
    # denormals flushed (torch.set_flush_denormal): the three parts are disjoint, the subtraction exact
    return grad - aten.threshold_backward(grad, x, below_clip) - aten.threshold_backward(grad, x.neg(), 0.0), edge


def _zero_point(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.int32, device=x.device)


def _floored(clip: Tensor) -> Tensor:
    """The clip the activation quantizers use, applied inside their autograd functions (so their
    gradient reaches the raw clip unchanged, no graph): ``clip`` itself when >= _MIN_CLIP, else
    ``clip + (max(clip, _MIN_CLIP) - clip)``."""
    return _floored_value(clip)[0]


def _floored_value(clip: Tensor) -> tuple[Tensor, float]:
    """:func:`_floored` and its value as a float (one read of the tensor where the clip is not floored)."""
    value = float(clip)
    if value >= _MIN_CLIP:
        return clip, value
    clip = clip + (clip.clamp_min(_MIN_CLIP) - clip)
    return clip, float(clip)


def _levels(bits: int, signed: bool) -> int:
    """An activation width's top integer: ``2^(b-1) - 1`` signed (b >= 2), ``2^b - 1`` unsigned."""
    if signed:
        return 2 ** (_check_bits(bits, minimum=2, what="symmetric clip quantizer") - 1) - 1
    return 2 ** _check_bits(bits, minimum=1, what="PACT") - 1


def _activation_y(x: Tensor, clip: Tensor, bits: int, signed: bool) -> Tensor:
    """``_activation_quantize(x, clip, bits, signed).y`` without the scale, zero-point and bits
    tensors (a forward pass reads only y). The clip's floor is applied inside the autograd
    function (:func:`_floored`)."""
    return (_SymmetricClipSTE if signed else _PactSTE).apply(x, clip.to(x.dtype), _levels(bits, signed))


def _clip_quantize(x: Tensor, clip: Tensor, bits: int, signed: bool) -> QuantOutput:
    y = _activation_y(x, clip, bits, signed)
    scale = _floored(clip.detach()) / _levels(bits, signed)
    return QuantOutput(y, scale, _zero_point(x), torch.tensor(bits, device=x.device))


def pact_quantize(x: Tensor, clip: Tensor, bits: int) -> QuantOutput:
    """Unsigned PACT fake quantization: UINT-b, zero point 0, ``scale = clip / (2^b - 1)``."""
    return _clip_quantize(x, clip, bits, False)


def symmetric_clip_quantize(x: Tensor, clip: Tensor, bits: int) -> QuantOutput:
    """Signed learned-clip fake quantization: INT-b narrow range, zero point 0."""
    return _clip_quantize(x, clip, bits, True)


def _activation_quantize(x: Tensor, clip: Tensor, bits: int, signed: bool) -> QuantOutput:
    return symmetric_clip_quantize(x, clip, bits) if signed else pact_quantize(x, clip, bits)


class _ClipHolder(nn.Module):
    """A module owning one learned clip parameter (excluded from weight decay)."""

    clip: nn.Parameter

    def _init_clip(self, init_clip: float) -> None:
        if not math.isfinite(init_clip) or init_clip <= 0:
            raise ValueError(f"{type(self).__name__}: init_clip must be a finite number > 0, got {init_clip!r}")
        self.clip = nn.Parameter(torch.tensor(float(init_clip)))


class PACTQuantizer(_ClipHolder):
    """Fixed-precision PACT quantizer for non-negative activations (learned clip)."""

    def __init__(self, bits: int, init_clip: float = DEFAULT_INIT_CLIP) -> None:
        super().__init__()
        self.bits = _check_bits(bits, minimum=1, what="PACTQuantizer")
        self._init_clip(init_clip)

    def quant(self, x: Tensor) -> QuantOutput:
        return pact_quantize(x, self.clip, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return _activation_y(x, self.clip, self.bits, False)


class SymmetricClipQuantizer(_ClipHolder):
    """Fixed-precision learned-clip quantizer for activations that can be negative."""

    def __init__(self, bits: int, init_clip: float = DEFAULT_INIT_CLIP) -> None:
        super().__init__()
        self.bits = _check_bits(bits, minimum=2, what="SymmetricClipQuantizer")
        self._init_clip(init_clip)

    def quant(self, x: Tensor) -> QuantOutput:
        return symmetric_clip_quantize(x, self.clip, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return _activation_y(x, self.clip, self.bits, True)


class SearchableActivationQuantizer(_SearchableBase, _ClipHolder):
    """``sum_j theta_j * Q_{b_j}(x)`` over ``precisions`` with one shared learned clip.

    ``signed`` picks the symmetric quantizer (inputs that can be negative) over PACT.
    ``alpha`` may be an externally owned :class:`SharedAlpha` with one column.
    """

    frozen_bits: int | None

    def __init__(
        self,
        precisions: Sequence[int] = DEFAULT_ACTIVATION_PRECISIONS,
        *,
        signed: bool = False,
        init_clip: float = DEFAULT_INIT_CLIP,
        alpha: SharedAlpha | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        self.precisions = _check_precisions(precisions, allow_zero=False, what="SearchableActivationQuantizer")
        self.signed = signed
        self._init_clip(init_clip)
        self.alpha = alpha if alpha is not None else SharedAlpha(self.precisions, 1)
        if self.alpha.precisions != self.precisions or self.alpha.n_channels != 1:
            raise ValueError(
                f"SearchableActivationQuantizer: shared alpha must have precisions {self.precisions} "
                f"and one column, got {self.alpha.precisions} x {self.alpha.n_channels}"
            )
        self.frozen_bits = None

    def theta(self) -> Tensor:
        """``softmax(alpha / T)``, shape ``[len(precisions)]``."""
        return _memo_columns(self, self.alpha.theta(self._temperature), lambda theta: theta[:, 0])

    def expected_bit_width(self) -> Tensor:
        theta = self.theta()
        return (theta * theta.new_tensor(self.precisions)).sum()

    def argmax_bits(self) -> int:
        return self.precisions[int(self.theta().detach().argmax())]

    def freeze(self, bits: int) -> None:
        """Fix the bit-width (one of ``precisions``) for QAT."""
        if bits not in self.precisions or isinstance(bits, bool):
            raise ValueError(f"freeze: bit-width {bits!r} is not in the precision set {self.precisions}")
        self.frozen_bits = int(bits)

    def quant(self, x: Tensor) -> QuantOutput:
        if self.frozen_bits is not None:
            return _activation_quantize(x, self.clip, self.frozen_bits, self.signed)
        y = self._mixture_y(x)
        best_bits = self.precisions[int(self.theta().detach().argmax())]
        best = _activation_quantize(x.detach(), self.clip.detach(), best_bits, self.signed)
        return QuantOutput(y, best.scale, best.zero_point, self.expected_bit_width())

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen_bits is not None:
            return _activation_y(x, self.clip, self.frozen_bits, self.signed)
        # quant(x).y without the per-width QuantOutput bookkeeping (scale, zero point and bits
        # tensors, the argmax, the expected width): the same y and gradients
        return self._mixture_y(x)

    def _mixture_y(self, x: Tensor) -> Tensor:
        if len(self.precisions) == 1 and _SINGLE_WIDTH_SHORTCUT and self.alpha.logit_mask is None:
            # one width (``act_bits=(8,)``): theta is softmax of one logit, exactly 1, so the
            # mixture is that width's quantizer, bit for bit (:class:`_OneWidthMixtureSTE`)
            return _OneWidthMixtureSTE.apply(x, self.clip.to(x.dtype), self.alpha.alpha,
                                             _levels(self.precisions[0], self.signed), self.signed)
        theta = self.theta().to(x.dtype)
        levels = tuple(_levels(b, self.signed) for b in self.precisions)
        return _ActivationMixtureSTE.apply(x, self.clip.to(x.dtype), theta, levels, self.signed)


# ----------------------------------------------------------------------------- frozen (plan) quantizers


class FrozenWeightQuantizer(nn.Module):
    """One fixed bit-width per output channel (0 = pruned): the quantizer of the fake-quantized
    model that freezes any plan (no logits, no temperature). Starts at 8 bits everywhere."""

    precisions: tuple[int, ...] = (0, *range(2, MAX_BITS + 1))

    def __init__(self, c_out: int, *, ch_axis: int = 0, bits: int = 8) -> None:
        super().__init__()
        if c_out < 1:
            raise ValueError(f"FrozenWeightQuantizer: c_out must be >= 1, got {c_out}")
        self.c_out = c_out
        self.ch_axis = ch_axis
        self.register_buffer("frozen_bits", torch.full((c_out,), int(bits), dtype=torch.long), persistent=False)

    @property
    def is_frozen(self) -> bool:
        return True

    def freeze(self, bits_per_channel: Sequence[int] | Tensor) -> None:
        bits = _bits_tensor(torch.as_tensor(bits_per_channel, dtype=torch.long).reshape(-1), self.c_out,
                            self.frozen_bits.device)
        self.frozen_bits = bits

    def unfreeze(self) -> None:
        """Nothing to go back to: this quantizer is always frozen."""

    def rescale_factor(self) -> Tensor:
        return torch.ones(self.c_out)

    def quant(self, w: Tensor) -> QuantOutput:
        if w.shape[self.ch_axis] != self.c_out:
            raise ValueError(f"FrozenWeightQuantizer: weight has {w.shape[self.ch_axis]} channels on axis "
                             f"{self.ch_axis}, expected {self.c_out}")
        return quantize_weight_per_channel(w, self.frozen_bits, self.ch_axis)

    def forward(self, w: Tensor) -> Tensor:
        if w.shape[self.ch_axis] != self.c_out or not _FROZEN_WEIGHT_NODE:
            return self.quant(w).y  # quant() says what is wrong
        return _frozen_weight_y(self, w, self.frozen_bits, self.ch_axis)  # quant(w).y, less work per step


class FrozenActivationQuantizer(_ClipHolder):
    """A fixed bit-width with a learned clip (PACT, or symmetric where ``signed``)."""

    def __init__(self, bits: int = 8, *, signed: bool = False, init_clip: float = DEFAULT_INIT_CLIP) -> None:
        super().__init__()
        self.signed = signed
        self._init_clip(init_clip)
        self.frozen_bits: int = _check_bits(int(bits), minimum=2, what="FrozenActivationQuantizer")
        self.precisions = tuple(range(2, MAX_BITS + 1))

    def freeze(self, bits: int) -> None:
        self.frozen_bits = _check_bits(int(bits), minimum=2, what="FrozenActivationQuantizer")

    def unfreeze(self) -> None:
        """Nothing to go back to: this quantizer is always frozen."""

    def argmax_bits(self) -> int:
        return self.frozen_bits

    def quant(self, x: Tensor) -> QuantOutput:
        return _activation_quantize(x, self.clip, self.frozen_bits, self.signed)

    def forward(self, x: Tensor) -> Tensor:
        return _activation_y(x, self.clip, self.frozen_bits, self.signed)  # quant(x).y, less work per step


# ----------------------------------------------------------------------------- parameter groups


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            out.append(param)
    return out


def nas_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The architecture logits (every :class:`SharedAlpha`, each once)."""
    return _unique(m.alpha for m in module.modules() if isinstance(m, SharedAlpha))


def clip_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Learned activation clip values (train with the weights, but without weight decay)."""
    return _unique(m.clip for m in module.modules() if isinstance(m, _ClipHolder))


def net_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not an architecture logit (weights, biases, clips)."""
    nas = {id(p) for p in nas_parameters(module)}
    return [p for p in _unique(module.parameters()) if id(p) not in nas]


def net_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Optimiser groups for the network: decayed weights, then clips with no decay."""
    clips = {id(p) for p in clip_parameters(module)}
    net = net_parameters(module)
    return [
        {"params": [p for p in net if id(p) not in clips], "weight_decay": weight_decay},
        {"params": [p for p in net if id(p) in clips], "weight_decay": 0.0},
    ]


def set_temperature(module: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every searchable quantizer; returns how many."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, _SearchableBase):
            sub.temperature = temperature
            count += 1
    return count
