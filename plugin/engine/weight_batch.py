"""Every small layer's weight mixture of a search step in one autograd node.

A :class:`~plugin.engine.quantizers.SearchableWeightQuantizer` computes its mixture
``sum_k theta_k * Q_k(W)`` per layer: some 30 small operations forward and backward (the theta
columns, the per-channel absmax and scales, the clip check, the node), each a dispatch whose fixed
cost is larger than its arithmetic on the few thousand weights of a small network's layer.
Measured alone on the digits ResNet-8 (10 layers, 77k weights, 1 CPU thread): the ten mixtures'
forward + backward cost about 2.5 ms of a 10-12 ms search step, the same work in one node about
1.2 ms (``benchmarks/step_speed.py --ab-weight-batch`` times the whole step).

:class:`WeightMixtureBatch` takes the layers' theta columns from each group's theta once (one
column gather for all layers), their scales from one absmax pass and one clip check, and runs one
:class:`_BatchedMixtureSTE` node over every layer's weight. Inside the node each weight sees its
layer's own node's operations in the same order (divide by its channel's scale, round, clamp
where some value is clipped, multiply back, the theta-weighted sum narrowest width first; the
weight gradient's sum over widths widest first), so ``y`` and the weights' gradients are the
same bits; the logits' gradient is the same sums, accumulated in another order (float rounding).

It is used only inside :func:`~plugin.engine.quantizers.theta_cache` (one training step): the
first layer asked computes every member's mixture, the others read theirs. A layer reads the
batch's result only for its own raw weight at the version it was computed from and for the
group theta the step's cache hands out (else the batch is computed again, once, or the layer
computes its own). A layer whose sparsity mask is active, that is frozen, whose output channels
are not on axis 0, or whose weight has more than ``MAX_MEMBER_NUMEL`` elements (where the
dispatch cost no longer matters) keeps its own node; so do the widths no other layer shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plugin.engine import quantizers as _q

MAX_MEMBER_NUMEL = 1 << 16  # weights above this many elements keep their own node
ENABLED = True  # False: every layer computes its own mixture (tests and benchmarks compare)


@dataclass
class _Member:
    quantizer: _q.SearchableWeightQuantizer
    module: nn.Module
    attr: str
    mask: nn.Module | None  # the layer's SparsityMask (applied before the quantizer), if any

    def raw(self) -> Tensor:
        return self.module.parametrizations[self.attr].original

    def eligible(self, raw: Tensor) -> bool:
        q = self.quantizer
        return (q.frozen_bits is None and q.ch_axis % raw.ndim == 0 and raw.shape[0] == q.c_out
                and raw.numel() <= MAX_MEMBER_NUMEL and not getattr(self.mask, "sparsity", 0.0))


class _BatchedMixtureSTE(torch.autograd.Function):
    """``sum_k theta_k * Q_k(W_l)`` for several layers' weights ``W_l`` in one node: ``theta`` and
    ``scale`` ``[K, C]`` (every layer's channels in order, widths widest first), ``qmax``
    ``[K, 1]``, ``layout`` each layer's ``(channels, weights per channel)``, then the weights
    (output channels on axis 0). Per layer the operations of
    :class:`~plugin.engine.quantizers._WeightMixtureSTE` run on ``[K, channels, weights per
    channel]`` views of one buffer, where a channel's theta and scale broadcast over its weights
    (expanding them to every weight is a gather, which costs more than the kernels it saves);
    the rounding and the clip run once on the whole buffer. Each weight sees the per-layer node's
    operations in its order, so ``y`` and the weights' gradients are the same bits
    (tests/test_step_speed_equivalence.py)."""

    @staticmethod
    def forward(ctx, theta: Tensor, scale: Tensor, qmax: Tensor, clipped: bool,  # type: ignore[override]
                layout: tuple[tuple[int, int], ...], *weights: Tensor) -> tuple[Tensor, ...]:
        k = scale.shape[0]
        sizes = [w.numel() for w in weights]
        channels = [c for c, _ in layout]
        stacked = weights[0].new_empty((k, sum(sizes)))
        views = [part.view(k, c, n) for part, (c, n) in zip(stacked.split(sizes, dim=1), layout)]
        scales = [part.unsqueeze(2) for part in scale.split(channels, dim=1)]
        for view, w, s, (c, n) in zip(views, weights, scales, layout):
            torch.div(w.view(1, c, n), s, out=view)
        stacked.round_()
        inside = None
        if clipped:
            inside = stacked.abs() <= qmax
            stacked.clamp_(-qmax, qmax)
        thetas = [part.unsqueeze(2) for part in theta.split(channels, dim=1)]
        outs = []
        for view, s, t, w in zip(views, scales, thetas, weights):
            view.mul_(s)
            qs, ts = view.unbind(0), t.unbind(0)
            y = qs[k - 1] * ts[k - 1]  # narrowest first, as the per-layer node adds
            term = None
            for j in range(k - 2, -1, -1):
                term = qs[j] * ts[j] if term is None else torch.mul(qs[j], ts[j], out=term)
                y.add_(term)
            outs.append(y.view(w.shape))
        ctx.save_for_backward(stacked, theta, inside)
        ctx.layout, ctx.sizes = layout, sizes
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        stacked, theta, inside = ctx.saved_tensors
        k = stacked.shape[0]
        layout = ctx.layout
        views = [part.view(k, c, n) for part, (c, n) in zip(stacked.split(ctx.sizes, dim=1), layout)]
        masks = [None] * len(views) if inside is None else \
            [part.view(k, c, n) for part, (c, n) in zip(inside.split(ctx.sizes, dim=1), layout)]
        thetas = [part.unsqueeze(2) for part in theta.split([c for c, _ in layout], dim=1)]
        grad_ws, grad_thetas = [], []
        for grad, view, mask, t, (c, n) in zip(grads, views, masks, thetas, layout):
            if grad is None:
                grad = view.new_zeros((c, n))
            g = grad.reshape(c, n)
            grad_q = g * t  # [K, c, n], widest first: the per-layer node's sum over widths
            if mask is not None:
                grad_q = grad_q * mask
            grad_ws.append(grad_q.sum(dim=0).view(grad.shape))
            grad_thetas.append((g * view).sum(dim=2))
        return (torch.cat(grad_thetas, dim=1), None, None, None, None, *grad_ws)


class WeightMixtureBatch:
    """The weight mixtures of ``members`` (quantizer, the module and attribute of its
    parametrized weight, its sparsity mask) computed together in a step (module docstring).
    Attach it with :meth:`attach`; a quantizer asks it through :meth:`lookup`."""

    def __init__(self, members: Sequence[tuple[_q.SearchableWeightQuantizer, nn.Module, str, nn.Module | None]]) -> None:
        self.members = [_Member(*m) for m in members]
        self._column_cache: dict[tuple, tuple[list[int], Tensor]] = {}

    def attach(self) -> None:
        for member in self.members:
            member.quantizer.__dict__["_weight_batch"] = self

    def lookup(self, quantizer: _q.SearchableWeightQuantizer, w: Tensor) -> Tensor | None:
        """``quantizer``'s mixture of ``w`` from this step's batch, or None (compute your own)."""
        entry = self._entry(id(self), self._compute, quantizer,
                            lambda e: e[1] == w._version and self._base(quantizer) is e[2], lambda e: w is e[0])
        return None if entry is None else entry[3]

    def keep_mass(self, quantizer: _q.SearchableWeightQuantizer) -> Tensor | None:
        """``1 - theta_0`` per output channel of ``quantizer`` (its bias gate's factor) from this
        step's one gather for every layer that can be pruned, or None (compute your own). The same
        values as ``1 - quantizer.theta()[index of 0]``."""
        entry = self._entry(("keep", id(self)), self._keep_masses, quantizer,
                            lambda e: self._base(quantizer) is e[0])
        return None if entry is None else entry[1]

    def _entry(self, key: object, compute: Callable[[], dict[int, tuple]], quantizer: _q.SearchableWeightQuantizer,
               current: Callable[[tuple], bool], usable: Callable[[tuple], bool] = lambda e: True) -> tuple | None:
        """``quantizer``'s entry of the step's ``compute()`` result kept under ``key`` in the theta
        cache, computed on first use; when it is not ``current`` (the weights or logits moved
        within the block), computed once more; None outside a step, for a layer it leaves out or
        an entry not ``usable`` for this call, or when still not current."""
        store = getattr(_q._THETA_MEMO, "store", None)
        if store is None or not ENABLED:
            return None
        hit = store.get(key)
        fresh = hit is None or hit[0] is not self
        if fresh:
            hit = store[key] = (self, compute())
        entry = hit[1].get(id(quantizer))
        if entry is None or not usable(entry):
            return None
        if current(entry):
            return entry
        if not fresh:
            hit = store[key] = (self, compute())
            entry = hit[1].get(id(quantizer))
            if entry is not None and usable(entry) and current(entry):
                return entry
        return None

    def _keep_masses(self) -> dict[int, tuple[Tensor, Tensor]]:
        group = [(m, m.raw()) for m in self.members if m.quantizer.frozen_bits is None and 0 in m.quantizer.precisions]
        if len(group) < 2:
            return {}
        bases = [self._base(member.quantizer) for member, _ in group]
        alphas, columns = self._columns(group)
        rows = [bases[i][group[i][0].quantizer.precisions.index(0)] for i in alphas]
        pieces = (1 - torch.cat(rows).index_select(0, columns)).split([m.quantizer.c_out for m, _ in group])
        return {id(member.quantizer): (base, piece) for (member, _), base, piece in zip(group, bases, pieces)}

    @staticmethod
    def _base(quantizer: _q.SearchableWeightQuantizer) -> Tensor:
        return quantizer.alpha.theta(quantizer.temperature)  # the step's cached softmax of the group

    def _compute(self) -> dict[int, tuple[Tensor, int, Tensor, Tensor]]:
        groups: dict[tuple, list[tuple[_Member, Tensor]]] = {}
        for member in self.members:
            raw = member.raw()
            if not member.eligible(raw):
                continue
            kept, _, _ = member.quantizer._kept_widths(raw)
            key = (tuple(member.quantizer.precisions[j] for j in kept), raw.dtype, raw.device)
            groups.setdefault(key, []).append((member, raw))
        out: dict[int, tuple[Tensor, int, Tensor, Tensor]] = {}
        for group in groups.values():
            if len(group) > 1:
                out.update(self._compute_group(group))
        return out

    def _compute_group(self, group: list[tuple[_Member, Tensor]]) -> dict[int, tuple[Tensor, int, Tensor, Tensor]]:
        raws = [raw for _, raw in group]
        dtype = raws[0].dtype
        qmax = group[0][0].quantizer._kept_widths(raws[0])[1]  # the same widths in every member
        bases = [self._base(member.quantizer) for member, _ in group]
        alphas, columns = self._columns(group)
        rows = [bases[i].to(dtype).index_select(0, group[i][0].quantizer._kept_widths(group[i][1])[2])
                for i in alphas]  # each group's theta once, widest first
        theta = torch.cat(rows, dim=1).index_select(1, columns)  # [K, C]: every layer's channels in order
        absmax = torch.cat([raw.detach().abs().view(raw.shape[0], -1).amax(dim=1) for raw in raws])
        scale, clipped = _q._mixture_scales(absmax, qmax)  # [K, C]
        layout = tuple((raw.shape[0], raw.numel() // raw.shape[0]) for raw in raws)
        pieces = _BatchedMixtureSTE.apply(theta, scale, qmax.reshape(-1, 1), clipped, layout, *raws)
        return {id(member.quantizer): (raw, raw._version, base, piece)
                for (member, raw), base, piece in zip(group, bases, pieces)}

    def _columns(self, group: list[tuple[_Member, Tensor]]) -> tuple[list[int], Tensor]:
        """The members holding each distinct logits tensor first (their positions in ``group``),
        and for every layer channel in order its column in those tensors' concatenated theta."""
        key = tuple(id(member.quantizer) for member, _ in group) + (group[0][1].device,)
        cached = self._column_cache.get(key)
        if cached is None:
            first: dict[int, int] = {}
            offsets: dict[int, int] = {}
            width = 0
            for i, (member, _) in enumerate(group):
                alpha = member.quantizer.alpha
                if id(alpha) not in first:
                    first[id(alpha)] = i
                    offsets[id(alpha)] = width
                    width += alpha.n_channels
            columns = torch.cat([member.quantizer.channel_to_group_index.cpu() + offsets[id(member.quantizer.alpha)]
                                 for member, _ in group]).to(group[0][1].device)
            cached = (list(first.values()), columns)
            if len(self._column_cache) >= 8:
                self._column_cache.clear()
            self._column_cache[key] = cached
        return cached
