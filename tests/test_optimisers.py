"""plugin.engine.optimisers: fused Adam where torch has the kernel, the same updates as the loop
to float32 rounding, the default implementation everywhere else."""

from __future__ import annotations

import torch

from plugin.engine import optimisers
from plugin.engine.optimisers import adam, fusable


def _params(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(s, requires_grad=True) for s in [(8, 3, 3, 3), (8,), (10, 8), (10,), ()]]


def _train(make, steps: int = 40) -> list[torch.Tensor]:
    params = _params()
    opt = make([{"params": params[::2], "weight_decay": 1e-4}, {"params": params[1::2], "weight_decay": 0.0}])
    torch.manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach() for p in params]


def test_fused_on_cpu_and_the_same_updates_as_the_loop(monkeypatch) -> None:
    opt = adam(_params(), lr=1e-3)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"]
    fused = _train(lambda groups: adam(groups, lr=1e-2))
    loop = _train(lambda groups: torch.optim.Adam(groups, lr=1e-2, foreach=False))
    moved = [float((f - p.detach()).abs().max()) for f, p in zip(fused, _params())]
    assert min(moved) > 0.01  # the steps did move every parameter
    for f, p in zip(fused, loop):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(optimisers, "FUSED", False)
    assert not adam(_params(), lr=1e-3).defaults.get("fused")


def test_default_implementation_where_fused_cannot_run() -> None:
    assert fusable(_params())
    assert not fusable([torch.zeros(3, device="meta", requires_grad=True)])  # no fused kernel there
    assert not fusable([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    opt = adam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=1e-3)
    assert not opt.defaults.get("fused")


def test_logits_sgd_foreach_bit_identical_to_the_loop(monkeypatch) -> None:
    opt = optimisers.sgd(_params(), lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["foreach"]
    batched = _train(lambda groups: optimisers.sgd(groups, lr=0.05, momentum=0.9))
    loop = _train(lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, foreach=False))
    assert min(float((b - p.detach()).abs().max()) for b, p in zip(batched, _params())) > 0.01
    for b, p in zip(batched, loop):
        assert torch.equal(b, p)  # the same element-wise operations: the same bits
    monkeypatch.setattr(optimisers, "FUSED", False)
    assert not optimisers.sgd(_params(), lr=0.1, momentum=0.9).defaults.get("foreach")
