"""The compiled activation mixture (plugin.engine.native, issue 15: a search step that costs
little more than training): the same y and pass-through gradient as the eager node, the clip's
and the logits' gradients within float32 summation error of float64, the fallbacks, an atomic
build into the user's cache, and a digits search that ends on the same plan with it on and off.
CI installs a C compiler (.ci/run), so there the kernel must build."""

from __future__ import annotations

import os
import numpy as np
import pytest
import torch

from plugin.engine import native
from plugin.engine import quantizers as q


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if native.kernel() is None:
        if os.environ.get("PRUNEQUANT_CI") == "1":
            pytest.fail("the activation mixture kernel did not build (CI installs a C compiler)")
        pytest.skip("no C compiler here: the eager activation mixture runs")


def _run(x, clip, theta, levels, signed, use_native: bool, monkeypatch, dtype=None):
    monkeypatch.setattr(q, "_NATIVE_MIXTURE", use_native)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, clip, theta)]
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    y = q._ActivationMixtureSTE.apply(*leaves, levels, signed)
    upstream = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y.nan_to_num(0.0) * upstream).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("levels", [(255,), (3, 15, 255), (1, 3, 7, 127)])
@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (3, 5, 7)])  # 65536 elements, and 105 (not a multiple of 16)
@pytest.mark.parametrize("clip_value", [1.3, 1e-8])  # 1e-8: below the clip floor
def test_native_matches_the_eager_node(signed, levels, shape, clip_value, monkeypatch) -> None:
    if signed:
        levels = tuple(n for n in levels if n > 1)
    torch.manual_seed(len(levels) + len(shape))
    x = torch.randn(shape) * 2 * max(clip_value, 1e-6)
    flat = x.view(-1)
    flat[:8] = torch.tensor([clip_value, -clip_value, 0.0, -0.0, float("inf"), -float("inf"), 3 * clip_value, 1e-40])
    clip = torch.tensor(clip_value)
    theta = torch.softmax(torch.randn(len(levels)), 0)
    y_n, (gx_n, gc_n, gt_n) = _run(x, clip, theta, levels, signed, True, monkeypatch)
    y_e, (gx_e, gc_e, gt_e) = _run(x, clip, theta, levels, signed, False, monkeypatch)
    assert torch.equal(y_n, y_e)  # the same values (a zero's sign may differ)
    assert torch.equal(gx_n, gx_e)
    _, (_, gc_64, gt_64) = _run(x, clip, theta, levels, signed, False, monkeypatch, dtype=torch.float64)
    for got, ref in ((gc_n, gc_64), (gt_n, gt_64), (gc_e, gc_64), (gt_e, gt_64)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-5)


def test_native_takes_float32_contiguous_cpu_only(monkeypatch) -> None:
    calls = {"n": 0}
    forward = native.forward

    def counted(*args):
        calls["n"] += 1
        return forward(*args)

    monkeypatch.setattr(native, "forward", counted)
    theta = torch.softmax(torch.randn(3), 0)
    clip = torch.tensor(1.0)
    x = torch.randn(4, 6, 5)
    q._ActivationMixtureSTE.apply(x, clip, theta, (3, 15, 255), False)
    assert calls["n"] == 1
    for other in (x.transpose(0, 2), x.double()):  # not contiguous, not float32: the eager node
        y = q._ActivationMixtureSTE.apply(other, clip.to(other.dtype), theta.to(other.dtype), (3, 15, 255), False)
        assert calls["n"] == 1 and y.shape == other.shape
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.kernel() is None
    q._ActivationMixtureSTE.apply(x, clip, theta, (3, 15, 255), False)
    assert calls["n"] == 1


def test_native_build_is_atomic_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    lib = native.kernel()
    assert lib is not None
    folder = tmp_path / "prunequant" / "kernels"
    built = sorted(p.name for p in folder.iterdir())
    assert len(built) == 1 and built[0].startswith("mixture-") and built[0].endswith(".so")  # no temporary left
    monkeypatch.setattr(native, "_STATE", {})
    stamp = (folder / built[0]).stat().st_mtime_ns
    assert native.kernel() is not None
    assert (folder / built[0]).stat().st_mtime_ns == stamp  # read back, not rebuilt


def test_no_compiler_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.kernel() is None
    x = torch.randn(2, 3, 4)
    y = q._ActivationMixtureSTE.apply(x, torch.tensor(1.0), torch.softmax(torch.randn(3), 0), (3, 15, 255), False)
    assert y.shape == x.shape and not any(tmp_path.rglob("*.so"))


def _digits_search(use_native: bool, monkeypatch):
    """tests/test_step_speed_equivalence.py's 2-epoch digits search (every speed-up on), with the
    kernel on or off."""
    from tests.test_step_speed_equivalence import _digits_search as search

    monkeypatch.setattr(q, "_NATIVE_MIXTURE", use_native)
    return search(True, monkeypatch)


def test_digits_search_same_plan_with_the_kernel(monkeypatch) -> None:
    losses_on, plan_on = _digits_search(True, monkeypatch)
    losses_off, plan_off = _digits_search(False, monkeypatch)
    np.testing.assert_allclose(losses_on, losses_off, rtol=1e-5)
    assert plan_on == plan_off
