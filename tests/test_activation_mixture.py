"""The searchable activation quantizer's one-node mixture (quantizers._ActivationMixtureSTE)
against the per-width sum it replaces: ``sum_j theta_j * Q_j(x)`` with ``Q_j`` the PACT /
symmetric-clip straight-through quantizers: the same y bit for bit, the same gradients (x, clip,
logits) up to float32 summation order."""

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


def test_clip_below_minimum_keeps_gradient() -> None:
    q = SearchableActivationQuantizer((2, 8), init_clip=1.0)
    with torch.no_grad():
        q.clip.fill_(1e-9)  # below _MIN_CLIP: used as _MIN_CLIP, the gradient still reaches the clip
    x = torch.full((2, 3), 5.0)
    q(x).sum().backward()
    assert q.clip.grad is not None and float(q.clip.grad) == pytest.approx(6.0, rel=1e-5)
