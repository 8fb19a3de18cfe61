"""Unit and property tests for plugin.quantizers (exact values written out by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from plugin.engine.quantizers import (
    PACTQuantizer,
    QuantOutput,
    SearchableActivationQuantizer,
    SearchableWeightQuantizer,
    SharedAlpha,
    SymmetricClipQuantizer,
    clip_parameters,
    nas_parameters,
    net_param_groups,
    net_parameters,
    pact_quantize,
    quantize_weight_per_channel,
    set_temperature,
    symmetric_clip_quantize,
)


# Upstream gradients are applied as (y * g).sum().backward(): y.backward(g) imports
# torch.fx.experimental.symbolic_shapes on first use (seconds on a loaded machine).


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """torch.allclose with a message (torch.testing.assert_close costs seconds to import)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{actual} != {expected}"


# ----------------------------------------------------------------------------- weights, exact

# (bits, weight rows, expected integers, expected scale = max|W_c| / (2^(b-1) - 1))
WEIGHT_CASES = [
    # qmax 1: 0.5 is a tie and rounds half to even -> 0 (as ONNX QuantizeLinear does)
    (2, [[0.5, -1.0, 0.25, 0.75], [2.0, 0.9, -1.1, 0.0]], [[0, -1, 0, 1], [1, 0, -1, 0]], [1.0, 2.0]),
    # qmax 7: -3.5 -> -4 and -0.5 -> 0 (half to even)
    (4, [[7.0, -3.5, 1.25, -0.5], [0.7, 0.33, -0.26, 0.04]], [[7, -4, 1, 0], [7, 3, -3, 0]], [1.0, 0.1]),
    # qmax 127
    (8, [[1.27, -0.5, 0.013, -1.0], [-2.54, 1.0, 0.3, 0.0]], [[127, -50, 1, -100], [-127, 50, 15, 0]], [0.01, 0.02]),
]


@pytest.mark.parametrize(("bits", "rows", "ints", "scales"), WEIGHT_CASES)
def test_weight_quantizer_exact_integers(bits: int, rows: list, ints: list, scales: list) -> None:
    w = _t(rows)
    out = quantize_weight_per_channel(w, bits)
    assert isinstance(out, QuantOutput)
    _assert_close(out.scale, _t(scales), rtol=1e-6, atol=0)
    assert torch.equal(out.scale, w.abs().amax(dim=1) / (2 ** (bits - 1) - 1))
    assert torch.equal(out.y, _t(ints) * out.scale[:, None])  # = DequantizeLinear(ints, scale)
    assert out.zero_point.tolist() == [0, 0]
    assert out.bit_width.tolist() == [bits, bits]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_max_is_on_the_grid(bits: int) -> None:
    """max|W_c| maps to the integer +-qmax exactly; its value back to 1 ulp (float rounding)."""
    w = _t([[0.3, -0.71, 0.2], [1.9, 0.1, -0.4]])
    out = quantize_weight_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    ints = (out.y / out.scale[:, None]).round()
    assert ints[0, 1].item() == -qmax and ints[1, 0].item() == qmax
    _assert_close(out.y.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1.2e-7, atol=0)


def test_weight_bits_zero_gives_zeros_and_no_gradient() -> None:
    w = _t([[0.5, -1.0], [2.0, 3.0]]).requires_grad_()
    out = quantize_weight_per_channel(w, 0)
    assert torch.equal(out.y, torch.zeros(2, 2))
    assert out.scale.tolist() == [1.0, 1.0]
    out.y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(2, 2))


def test_weight_all_zero_channel_has_scale_one() -> None:
    w = torch.zeros(2, 3, requires_grad=True)
    out = quantize_weight_per_channel(w, 4)
    assert out.scale.tolist() == [1.0, 1.0]
    assert torch.equal(out.y, torch.zeros(2, 3))
    out.y.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_weight_ste_gradient_is_identity() -> None:
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    upstream = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    (quantize_weight_per_channel(w, 2).y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_weight_mixed_widths_in_one_tensor() -> None:
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)).requires_grad_()
    out = quantize_weight_per_channel(w, [8, 0, 2])
    assert torch.equal(out.y[0], quantize_weight_per_channel(w[:1], 8).y[0])
    assert torch.equal(out.y[1], torch.zeros(5))
    assert torch.equal(out.y[2], quantize_weight_per_channel(w[2:], 2).y[0])
    assert out.bit_width.tolist() == [8, 0, 2]
    out.y.sum().backward()
    assert w.grad[:, 0].tolist() == [1.0, 0.0, 1.0]


@settings(max_examples=30, deadline=None)
@given(w_np=hnp.arrays(np.float32, (2, 5), elements=st.floats(-10, 10, width=32, allow_subnormal=False)))
def test_weight_ste_gradient_reaches_the_largest_weight(w_np: np.ndarray) -> None:
    w = torch.from_numpy(w_np.copy()).requires_grad_()
    quantize_weight_per_channel(w, 4).y.sum().backward()
    assert torch.equal(w.grad, torch.ones(2, 5))


@pytest.mark.parametrize("ch_axis", [1, -1])
def test_weight_channel_axis(ch_axis: int) -> None:
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    out = quantize_weight_per_channel(w, 4, ch_axis=ch_axis)
    ref = quantize_weight_per_channel(w.t().contiguous(), 4)
    assert torch.equal(out.y, ref.y.t())
    assert torch.equal(out.scale, ref.scale)


@pytest.mark.parametrize("bits", [1, -1, 17, [2, 1], [4, 4, 4], [2.0, 4.0]])
def test_weight_invalid_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bit-width"):
        quantize_weight_per_channel(torch.ones(2, 2), bits)


# ----------------------------------------------------------------------------- weights, properties

_weights = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(-100, 100, width=32, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None)
@given(w_np=_weights, bits=st.sampled_from([2, 3, 4, 8]))
def test_weight_properties(w_np: np.ndarray, bits: int) -> None:
    w = torch.from_numpy(w_np)
    out = quantize_weight_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = out.scale[:, None]
    ints = out.y / scale
    assert torch.allclose(ints, ints.round(), atol=1e-4)  # on the grid
    assert bool((ints.round().abs() <= qmax).all())  # within the signed narrow range
    for row in out.y:  # at most 2^b - 1 levels per channel
        assert row.unique().numel() <= 2**bits - 1
    assert bool(((out.y - w).abs() <= scale / 2 * (1 + 1e-5)).all())  # error <= scale / 2
    again = quantize_weight_per_channel(out.y, bits)  # idempotence
    _assert_close(again.y, out.y, rtol=1e-6, atol=0)
    assert torch.equal((again.y / again.scale[:, None]).round(), ints.round())


# ----------------------------------------------------------------------------- activations, exact

PACT_CASES = [
    # clip 6, 2 bits: scale 2; 0.5, 1.5 and 2.5 are ties (half to even), 7 saturates at 3
    (2, 6.0, [-1.0, 0.0, 0.9, 1.0, 1.1, 2.9, 3.0, 5.0, 6.0, 7.0], [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]),
    (4, 15.0, [-2.0, 0.4, 0.5, 1.5, 7.49, 14.6, 15.0, 20.0], [0, 0, 0, 2, 7, 15, 15, 15]),
    (8, 255.0, [3.5, 4.5, 254.4, 300.0], [4, 4, 254, 255]),
]


@pytest.mark.parametrize(("bits", "clip", "x", "ints"), PACT_CASES)
def test_pact_exact_values(bits: int, clip: float, x: list, ints: list) -> None:
    quantizer = PACTQuantizer(bits, init_clip=clip)
    out = quantizer.quant(_t(x))
    scale = clip / (2**bits - 1)
    assert out.scale.item() == scale
    assert torch.equal(out.y, _t(ints) * scale)
    assert torch.equal(quantizer(_t(x)), out.y)


def test_pact_initial_clip_and_gradients() -> None:
    quantizer = PACTQuantizer(4)
    assert quantizer.clip.item() == 6.0
    x = _t([-1.0, 1.0, 5.9, 6.0, 7.0]).requires_grad_()
    (quantizer(x) * _t([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0, 0.0]  # STE inside [0, clip)
    assert quantizer.clip.grad.item() == 9.0  # PACT: sum of upstream where x >= clip


SYMMETRIC_CASES = [
    # clip 3, 2 bits: scale 3, levels {-3, 0, 3}; 1.5 / 3 = 0.5 rounds to 0
    (2, 3.0, [-5.0, -3.0, -1.6, -1.4, 0.0, 1.5, 3.0, 4.0], [-1, -1, -1, 0, 0, 0, 1, 1]),
    (4, 7.0, [-8.0, -2.5, 0.3, 6.6], [-7, -2, 0, 7]),
    (8, 127.0, [-127.5, -0.5, 1.5, 126.4], [-127, 0, 2, 126]),
]


@pytest.mark.parametrize(("bits", "clip", "x", "ints"), SYMMETRIC_CASES)
def test_symmetric_clip_exact_values(bits: int, clip: float, x: list, ints: list) -> None:
    out = SymmetricClipQuantizer(bits, init_clip=clip).quant(_t(x))
    scale = clip / (2 ** (bits - 1) - 1)
    assert out.scale.item() == scale
    assert torch.equal(out.y, _t(ints) * scale)


def test_symmetric_clip_gradients() -> None:
    quantizer = SymmetricClipQuantizer(2, init_clip=3.0)
    x = _t([-5.0, -3.0, -1.6, -1.4, 0.0, 1.5, 3.0, 4.0]).requires_grad_()
    (quantizer(x) * _t([1, 2, 3, 4, 5, 6, 7, 8])).sum().backward()
    assert x.grad.tolist() == [0, 0, 3, 4, 5, 6, 0, 0]
    assert quantizer.clip.grad.item() == (7 + 8) - (1 + 2)


def _onnx_qdq(x: np.ndarray, scale: np.float32, low: int, high: int) -> np.ndarray:
    """QuantizeLinear (round half to even, saturate) then DequantizeLinear, zero point 0."""
    q = np.clip(np.rint(x / scale), low, high)
    return (q * scale).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    x_np=hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(-20, 20, width=32)),
    clip=st.floats(0.125, 10, width=32),
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
)
def test_activation_matches_onnx_qdq(x_np: np.ndarray, clip: float, bits: int, signed: bool) -> None:
    clip_t = torch.tensor(clip)
    if signed:
        out = symmetric_clip_quantize(torch.from_numpy(x_np), clip_t, bits)
        qmax = 2 ** (bits - 1) - 1
        expected = _onnx_qdq(x_np, out.scale.numpy(), -qmax, qmax)
    else:
        out = pact_quantize(torch.from_numpy(x_np), clip_t, bits)
        expected = _onnx_qdq(x_np, out.scale.numpy(), 0, 2**bits - 1)
    assert np.array_equal(out.y.numpy(), expected)
    assert out.y.unique().numel() <= 2**bits
    inside = np.abs(x_np) <= clip if signed else (x_np >= 0) & (x_np <= clip)
    assert bool((np.abs(out.y.numpy() - x_np)[inside] <= out.scale.numpy() / 2 * (1 + 1e-5)).all())


def test_activation_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="bit-width"):
        PACTQuantizer(0)
    with pytest.raises(ValueError, match="bit-width"):
        SymmetricClipQuantizer(1)
    with pytest.raises(ValueError, match="init_clip"):
        PACTQuantizer(8, init_clip=0.0)


# ----------------------------------------------------------------------------- searchable weights


def test_searchable_initial_alpha_and_theta() -> None:
    quantizer = SearchableWeightQuantizer(3)
    expected_alpha = _t([0.0, 0.25, 0.5, 1.0])[:, None].expand(4, 3)
    assert torch.equal(quantizer.alpha.alpha.detach(), expected_alpha)
    theta = quantizer.theta()
    assert theta.shape == (4, 3)
    _assert_close(theta.sum(dim=0), torch.ones(3))
    _assert_close(theta[:, 0], torch.softmax(_t([0.0, 0.25, 0.5, 1.0]), dim=0))
    assert quantizer.argmax_bits() == [8, 8, 8]


def test_searchable_temperature() -> None:
    quantizer = SearchableWeightQuantizer(2)
    quantizer.temperature = 0.5
    _assert_close(quantizer.theta()[:, 0], torch.softmax(_t([0.0, 0.5, 1.0, 2.0]), dim=0))
    with pytest.raises(ValueError, match="temperature"):
        quantizer.temperature = 0.0


def test_searchable_c_out_eff() -> None:
    quantizer = SearchableWeightQuantizer(4)
    _assert_close(quantizer.c_out_eff(), 4 - quantizer.theta()[0].sum())
    quantizer.c_out_eff().backward()
    assert quantizer.alpha.alpha.grad is not None
    unprunable = SearchableWeightQuantizer(4, precisions=(2, 4, 8))
    assert unprunable.c_out_eff().item() == 4.0


def test_shared_alpha_gives_identical_theta_and_one_parameter() -> None:
    shared = SharedAlpha((0, 2, 4, 8), 3)
    first = SearchableWeightQuantizer(3, alpha=shared)
    second = SearchableWeightQuantizer(3, alpha=shared)
    with torch.no_grad():
        shared.alpha[0, 1] = 5.0
    assert torch.equal(first.theta(), second.theta())
    assert first.argmax_bits() == [8, 0, 8]
    assert len(nas_parameters(nn.ModuleList([first, second]))) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.37, 5.0 / 3.0, 1e-3])
def test_shared_alpha_theta_same_bits_as_dividing_by_the_float(temperature: float) -> None:
    torch.manual_seed(0)
    shared = SharedAlpha((0, 2, 4, 8), 7)
    with torch.no_grad():
        shared.alpha.normal_()
    weights = torch.randn(4, 7)
    theta = shared.theta(temperature)
    (theta * weights).sum().backward()
    ours = shared.alpha.grad.clone()
    shared.alpha.grad = None
    reference = torch.softmax(shared.alpha / temperature, dim=0)
    (reference * weights).sum().backward()
    assert torch.equal(theta, reference) and torch.equal(ours, shared.alpha.grad)


def test_channel_to_group_index() -> None:
    shared = SharedAlpha((0, 4, 8), 2)
    layer = SearchableWeightQuantizer(4, (0, 4, 8), alpha=shared, channel_to_group_index=torch.tensor([0, 0, 1, 1]))
    with torch.no_grad():
        shared.alpha[0, 0] = 5.0
    assert layer.argmax_bits() == [0, 0, 8, 8]
    assert torch.equal(layer.theta()[:, 0], layer.theta()[:, 1])


def test_searchable_invalid_construction() -> None:
    with pytest.raises(ValueError, match="precisions"):
        SearchableWeightQuantizer(3, (0, 2, 4), alpha=SharedAlpha((0, 2, 4, 8), 3))
    with pytest.raises(ValueError, match="channel_to_group_index"):
        SearchableWeightQuantizer(4, alpha=SharedAlpha((0, 2, 4, 8), 2))
    with pytest.raises(ValueError, match="channel_to_group_index"):
        SearchableWeightQuantizer(2, alpha=SharedAlpha((0, 2, 4, 8), 2), channel_to_group_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="duplicate"):
        SearchableWeightQuantizer(2, (2, 2))
    with pytest.raises(ValueError, match="bit-width"):
        SearchableWeightQuantizer(2, (0, 1))


def test_searchable_mixture_and_gradients() -> None:
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(4)).requires_grad_()
    quantizer = SearchableWeightQuantizer(3)
    theta = quantizer.theta().detach()
    expected = sum(theta[j][:, None] * quantize_weight_per_channel(w, b).y for j, b in enumerate((0, 2, 4, 8)))
    y = quantizer(w)
    _assert_close(y, expected)
    y.pow(2).sum().backward()
    assert w.grad is not None and quantizer.alpha.alpha.grad is not None
    assert bool((quantizer.alpha.alpha.grad != 0).any())
    _assert_close(quantizer.quant(w).bit_width, (theta * _t([0, 2, 4, 8])[:, None]).sum(0))


def test_rescale_compensates_the_zero_bit_share() -> None:
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    quantizer = SearchableWeightQuantizer(3)
    theta = quantizer.theta().detach()
    kept = theta[1:].sum(dim=0)
    _assert_close(quantizer.rescale_factor(), 1 / kept)
    scaled = w.clone()
    quantizer.rescale_weight_(scaled)
    expected = sum(theta[j][:, None] * quantize_weight_per_channel(w, b).y for j, b in ((1, 2), (2, 4), (3, 8)))
    _assert_close(quantizer(scaled).detach(), expected / kept[:, None])


def test_freeze_gives_mixed_widths_and_pruned_zeros() -> None:
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(6))
    quantizer = SearchableWeightQuantizer(3)
    quantizer.freeze([8, 0, 2])
    assert quantizer.is_frozen
    out = quantizer.quant(w)
    assert torch.equal(out.y, quantize_weight_per_channel(w, [8, 0, 2]).y)
    assert torch.equal(out.y[1], torch.zeros(2, 3, 3))
    assert out.bit_width.tolist() == [8, 0, 2]
    quantizer.unfreeze()
    assert not quantizer.is_frozen
    with pytest.raises(ValueError, match="not in the precision set"):
        quantizer.freeze([8, 3, 2])
    with pytest.raises(ValueError, match="3 output channels"):
        quantizer.freeze([8, 8])


def test_searchable_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        SearchableWeightQuantizer(3)(torch.ones(4, 2))


def test_searchable_works_as_parametrization() -> None:
    layer = nn.Linear(4, 3)
    quantizer = SearchableWeightQuantizer(3)
    quantizer.freeze([4, 4, 0])
    nn.utils.parametrize.register_parametrization(layer, "weight", quantizer)
    assert torch.equal(layer.weight[2], torch.zeros(4))


# ----------------------------------------------------------------------------- searchable activations


def test_searchable_activation_mixture_and_freeze() -> None:
    quantizer = SearchableActivationQuantizer()
    assert torch.equal(quantizer.alpha.alpha.detach()[:, 0], _t([0.25, 0.5, 1.0]))
    theta = quantizer.theta()
    _assert_close(theta.sum(), torch.tensor(1.0))
    x = torch.linspace(-1, 8, 40).requires_grad_()
    clip = torch.tensor(6.0)
    expected = sum(theta[j].detach() * pact_quantize(x, clip, b).y for j, b in enumerate((2, 4, 8)))
    y = quantizer(x)
    _assert_close(y, expected)
    y.sum().backward()
    assert quantizer.clip.grad is not None and quantizer.alpha.alpha.grad is not None
    quantizer.freeze(4)
    assert torch.equal(quantizer(x), pact_quantize(x, clip, 4).y)
    with pytest.raises(ValueError, match="precision set"):
        quantizer.freeze(3)


def test_searchable_activation_signed() -> None:
    quantizer = SearchableActivationQuantizer((2, 8), signed=True, init_clip=3.0)
    quantizer.freeze(2)
    assert quantizer(_t([-5.0, -1.4, 1.6])).tolist() == [-3.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="0 bits"):
        SearchableActivationQuantizer((0, 8))


# ----------------------------------------------------------------------------- parameter groups


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = SharedAlpha((0, 2, 4, 8), 3)
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(4, 3)
        self.wq1 = SearchableWeightQuantizer(3, alpha=shared)
        self.wq2 = SearchableWeightQuantizer(3, alpha=shared)
        self.aq = SearchableActivationQuantizer()
        self.pact = PACTQuantizer(8)


def test_parameter_groups() -> None:
    model = _Tiny()
    nas = nas_parameters(model)
    assert [p.shape for p in nas] == [(4, 3), (3, 1)]
    clips = clip_parameters(model)
    assert {id(p) for p in clips} == {id(model.aq.clip), id(model.pact.clip)}
    net = net_parameters(model)
    assert {id(p) for p in net} == {id(p) for p in model.parameters()} - {id(p) for p in nas}
    decayed, undecayed = net_param_groups(model, weight_decay=1e-4)
    assert decayed["weight_decay"] == 1e-4 and undecayed["weight_decay"] == 0.0
    assert len(decayed["params"]) == 4 and {id(p) for p in undecayed["params"]} == {id(p) for p in clips}
    assert set_temperature(model, 0.5) == 3
    assert model.wq1.temperature == model.aq.temperature == 0.5


@pytest.mark.parametrize("precisions", [(0, 2, 4, 8), (0, 8), (2, 4, 8), (4,)])
@pytest.mark.parametrize("ch_axis", [0, 1])
def test_batched_mixture_equals_the_sum_of_per_width_quantizers(precisions, ch_axis) -> None:
    """The batched mixture (one rounding pass for all widths) against the definition
    ``sum_j theta_j Q_bj(W)`` built from quantize_weight_per_channel: values, gradients
    w.r.t. W and alpha, and the reported scale of each channel's likeliest width."""
    torch.manual_seed(0)
    shape = [5, 3, 3, 3] if ch_axis == 0 else [3, 5, 3, 3]
    w = torch.randn(*shape, dtype=torch.float64)
    w.select(ch_axis, 2).zero_()  # an all-zero channel: scale 1
    q = SearchableWeightQuantizer(5, precisions, ch_axis=ch_axis, temperature=0.7)
    with torch.no_grad():
        q.alpha.alpha.add_(torch.randn_like(q.alpha.alpha))
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    out = q.quant(w1)
    theta = q.theta().to(w.dtype)
    view = [1] * w.ndim
    view[ch_axis] = 5
    parts = [quantize_weight_per_channel(w2, b, ch_axis) for b in precisions]
    ref = sum(theta[j].reshape(view) * p.y for j, p in enumerate(parts))
    torch.testing.assert_close(out.y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(w)
    (ga_w, ga_a) = torch.autograd.grad((out.y * g).sum(), (w1, q.alpha.alpha))
    (gb_w, gb_a) = torch.autograd.grad((ref * g).sum(), (w2, q.alpha.alpha))
    torch.testing.assert_close(ga_w, gb_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga_a, gb_a, rtol=1e-12, atol=1e-12)
    best = theta.argmax(dim=0)
    expected_scale = torch.stack([p.scale for p in parts]).gather(0, best[None]).squeeze(0)
    torch.testing.assert_close(out.scale, expected_scale)
