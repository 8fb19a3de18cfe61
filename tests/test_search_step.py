"""The searchable quantizers' forward() computes only ``y`` (benchmarks/step_speed.py): the same
values and gradients, bit for bit, as ``quant(x).y``."""

from __future__ import annotations

import pytest
import torch

from plugin.engine.quantizers import SearchableActivationQuantizer, SearchableWeightQuantizer


def _grads(module, x, via_quant: bool):
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module.quant(x).y if via_quant else module(x)
    (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters() if p.grad is not None]


def _same(a, b) -> None:
    ya, xa, pa = a
    yb, xb, pb = b
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert len(pa) == len(pb) and all(torch.equal(u, v) for u, v in zip(pa, pb))


@pytest.mark.parametrize("precisions,axis", [((0, 2, 4, 8), 0), ((2, 4, 8), 1)])
def test_weight_forward_is_quant_y(precisions, axis) -> None:
    torch.manual_seed(0)
    q = SearchableWeightQuantizer(6, precisions, ch_axis=axis, temperature=0.7)
    with torch.no_grad():
        q.alpha.alpha.normal_()
    w = torch.randn(6, 5, 3, 3) if axis == 0 else torch.randn(5, 6)
    _same(_grads(q, w, True), _grads(q, w, False))


@pytest.mark.parametrize("signed", [False, True])
def test_activation_forward_is_quant_y(signed) -> None:
    torch.manual_seed(1)
    q = SearchableActivationQuantizer((2, 4, 8), signed=signed, init_clip=1.5, temperature=0.8)
    with torch.no_grad():
        q.alpha.alpha.normal_()
    x = torch.randn(4, 3, 5, 5) * 2
    _same(_grads(q, x, True), _grads(q, x, False))
    q.freeze(4)
    _same(_grads(q, x, True), _grads(q, x, False))
