"""The searchable activation quantizer's one-node mixture (quantizers._ActivationMixtureSTE)
against the per-width sum it replaces: ``sum_j theta_j * Q_j(x)`` with ``Q_j`` the PACT /
symmetric-clip straight-through quantizers: the same y bit for bit (and a one-hot theta gives
that width's quantizer exactly), the same gradients (x, clip, logits) up to float32 summation
order."""

from __future__ import annotations

import copy

import pytest
import torch

from plugin.engine.quantizers import SearchableActivationQuantizer, _PactSTE, _SymmetricClipSTE


def _per_width(q: SearchableActivationQuantizer, x: torch.Tensor) -> torch.Tensor:
    theta = q.theta().to(x.dtype)
    terms = []
    for b in q.precisions:
        clip = q.clip.to(x.dtype)  # each straight-through quantizer floors it (quantizers._floored)
        if q.signed:
            terms.append(_SymmetricClipSTE.apply(x, clip, 2 ** (b - 1) - 1))
        else:
            terms.append(_PactSTE.apply(x, clip, 2**b - 1))
    return sum(theta[j] * t for j, t in enumerate(terms))


def _run(q, x, fn):
    for p in q.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in q.named_parameters()}


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("precisions", [(2, 4, 8), (8,), (4, 8)])
def test_mixture_matches_per_width_sum(signed, precisions) -> None:
    torch.manual_seed(3)
    q = SearchableActivationQuantizer(precisions, signed=signed, init_clip=1.3, temperature=0.7)
    with torch.no_grad():
        q.alpha.alpha.normal_()
    x = torch.randn(3, 4, 6, 6) * 2
    x[0, 0, 0, :3] = torch.tensor([1.3, -1.3, 0.0])  # on the clip edges and at zero
    y_new, gx_new, gp_new = _run(q, x, q)
    y_old, gx_old, gp_old = _run(q, x, lambda t: _per_width(q, t))
    assert torch.equal(y_new, y_old)
    torch.testing.assert_close(gx_new, gx_old, rtol=1e-6, atol=1e-6)
    # the clip's and the logits' gradients are sums over every element: both float32 forms are
    # within float32 summation error of the per-width sum in float64
    q64 = copy.deepcopy(q).double()
    _, _, gp_64 = _run(q64, x.double(), lambda t: _per_width(q64, t))
    assert gp_new.keys() == gp_old.keys() == gp_64.keys()
    for name in gp_64:
        for got in (gp_new[name], gp_old[name]):
            torch.testing.assert_close(got.double(), gp_64[name], rtol=1e-4, atol=2e-5)
    assert torch.equal(q.quant(x).y, y_new)  # quant() takes the same path


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("clip", [1.3, 0.1, 7.0, 1e-7])
def test_one_hot_theta_gives_each_width_bit_for_bit(signed, clip) -> None:
    """theta one-hot (a logit far above the others: softmax exactly 1 and 0): the mixture is that
    width's quantizer bit for bit, so the shared clamp gives every width the same integers as
    clamping after rounding, at the clip edges, beyond them and below the clip floor."""
    torch.manual_seed(5)
    x = torch.randn(4, 5, 7, 7) * 2 * max(clip, 1e-6)
    x.view(-1)[:8] = torch.tensor([clip, -clip, 0.0, -0.0, 3 * clip, -3 * clip, float("inf"), -float("inf")])
    q = SearchableActivationQuantizer((2, 4, 8), signed=signed, init_clip=1.0)
    with torch.no_grad():
        q.clip.fill_(clip)
    for j, b in enumerate(q.precisions):
        with torch.no_grad():
            q.alpha.alpha.fill_(-1e4)
            q.alpha.alpha[j] = 1e4
        assert torch.equal(q.theta(), torch.eye(3)[j])
        one = _SymmetricClipSTE.apply(x, q.clip, 2 ** (b - 1) - 1) if signed else _PactSTE.apply(x, q.clip, 2**b - 1)
        assert torch.equal(q(x), one), b


def test_clip_below_minimum_keeps_gradient() -> None:
    q = SearchableActivationQuantizer((2, 8), init_clip=1.0)
    with torch.no_grad():
        q.clip.fill_(1e-9)  # below _MIN_CLIP: used as _MIN_CLIP, the gradient still reaches the clip
    x = torch.full((2, 3), 5.0)
    q(x).sum().backward()
    assert q.clip.grad is not None and float(q.clip.grad) == pytest.approx(6.0, rel=1e-5)
