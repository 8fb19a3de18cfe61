"""Tests for cost_models: hand-computed values, numbers vs tensors, gradients, registry."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cost_models
from cost_models import (
    CostInputs,
    CostModel,
    LayerSpec,
    available_cost_models,
    bits_to_bytes,
    cycles_to_microjoules,
    evaluate_cost_models,
    get_cost_model,
    register_cost_model,
    unregister_cost_model,
)
from cost_models import bops, mpic, mpic_energy, ne16, registry, size
from graph_passes.errors import CostModelError

BUILTINS = ("size", "bops", "mpic", "mpic_energy", "ne16")
W_PREC = (0, 2, 4, 8)
A_PREC = (2, 4, 8)


def one_hot(w_bits, a_bits=8, c_in_eff=None, spec=None):
    c_in_eff = spec.c_in if c_in_eff is None else c_in_eff
    return CostInputs.from_bits(w_bits, a_bits, c_in_eff)


def to_torch(inputs: CostInputs, dtype=torch.float64, grad=False) -> CostInputs:
    return CostInputs(
        inputs.w_precisions,
        torch.tensor(inputs.w_theta, dtype=dtype, requires_grad=grad),
        inputs.a_precisions,
        torch.tensor(inputs.a_theta, dtype=dtype, requires_grad=grad),
        torch.tensor(inputs.c_in_eff, dtype=dtype),
    )


def random_inputs(spec: LayerSpec, seed: int) -> CostInputs:
    rng = np.random.default_rng(seed)
    w = rng.random((len(W_PREC), spec.c_out)) + 0.05
    a = rng.random(len(A_PREC)) + 0.05
    c_in_eff = spec.c_in * rng.uniform(0.3, 1.0)
    return CostInputs(W_PREC, w / w.sum(0), A_PREC, a / a.sum(), c_in_eff)


SMALL_LAYERS = [
    LayerSpec("conv3", "conv", 16, 40, (3, 3), (5, 7)),
    LayerSpec("conv5", "conv", 20, 8, (5, 5), (4, 4)),
    LayerSpec("pw", "conv", 40, 36, (1, 1), (4, 5)),
    LayerSpec("grouped", "conv", 8, 12, (3, 3), (2, 2), groups=4),
    LayerSpec("dw", "depthwise", 20, 20, (3, 3), (6, 6), groups=20),
    LayerSpec("fc", "linear", 64, 10),
    LayerSpec("seq_fc", "linear", 12, 6, out_hw=(5, 1)),
]


# --------------------------------------------------------------------------- hand-computed: size


def test_size_conv_hand_computed():
    spec = LayerSpec("c", "conv", 4, 3, (3, 3), (5, 5))
    # bits per output channel 8 + 2 + 0 = 10; c_in_eff 4 * K^2 9 * 10 = 360 bits = 45 bytes
    bits = size.cost(spec, one_hot([8, 2, 0], spec=spec))
    assert bits == 360.0
    assert bits_to_bytes(bits) == 45.0


def test_size_depthwise_is_per_channel():
    spec = LayerSpec("dw", "depthwise", 3, 3, (3, 3), (5, 5), groups=3)
    # K^2 9 * (8 + 4 + 0) = 108 bits; c_in_eff does not enter
    assert size.cost(spec, one_hot([8, 4, 0], c_in_eff=2.0, spec=spec)) == 108.0


def test_size_linear_and_grouped():
    fc = LayerSpec("fc", "linear", 10, 2, out_hw=(7, 1))
    # c_in_eff 10 * (4 + 4) = 80 bits; positions do not enter the size
    assert size.cost(fc, one_hot([4, 4], spec=fc)) == 80.0
    grouped = LayerSpec("g", "conv", 4, 4, (1, 1), (2, 2), groups=2)
    # fan_in = c_in_eff 4 / groups 2 = 2; 2 * 1 * (4 channels * 8 bits) = 64 bits
    assert size.cost(grouped, one_hot([8] * 4, spec=grouped)) == 64.0


def test_size_expectation_under_theta():
    spec = LayerSpec("c", "conv", 4, 2, (1, 1), (1, 1))
    theta = np.array([[0.5, 0.0], [0.0, 0.25], [0.0, 0.75], [0.5, 0.0]])  # rows 0, 2, 4, 8 bits
    inputs = CostInputs(W_PREC, theta, A_PREC, [0, 0, 1], c_in_eff=2.5)
    # E[bits] = 0.5*8 + 0.25*2 + 0.75*4 = 7.5; c_in_eff 2.5 * 1 * 7.5 = 18.75
    assert size.cost(spec, inputs) == pytest.approx(18.75, rel=1e-15)


# --------------------------------------------------------------------------- hand-computed: bops


def test_bops_hand_computed():
    spec = LayerSpec("c", "conv", 2, 2, (1, 1), (2, 2))
    # MACs per channel = c_in_eff 2 * K^2 1 * H_o W_o 4 = 8; weight bits 8 + 4 = 12; a = 4
    # 8 * 12 * 4 = 384
    assert bops.cost(spec, one_hot([8, 4], a_bits=4, spec=spec)) == 384.0
    # a_theta 0.5 on 2 bits, 0.5 on 8 bits: E[b_a] = 5 -> 8 * 12 * 5 = 480
    inputs = CostInputs(W_PREC, one_hot([8, 4], spec=spec).w_theta, A_PREC, [0.5, 0, 0.5], 2)
    assert bops.cost(spec, inputs) == 480.0


def test_bops_c_in_eff_scales_macs():
    spec = LayerSpec("c", "conv", 4, 1, (3, 3), (2, 2))
    # c_in_eff 3 (one input channel pruned upstream): 3 * 9 * 4 = 108 MACs * 8 * 8 = 6912
    assert bops.cost(spec, one_hot([8], c_in_eff=3, spec=spec)) == 6912.0
    assert spec.macs == 4 * 9 * 4  # full channels, per sample


# --------------------------------------------------------------------------- hand-computed: mpic


def test_mpic_hand_computed():
    spec = LayerSpec("c", "conv", 4, 2, (3, 3), (2, 2))
    # MACs per channel = 4 * 9 * 4 = 144; channel 0 at 8 bit, channel 1 at 2 bit, a = 8:
    # 144 / 2.1 + 144 / 2.5 = 68.5714... + 57.6
    expected = 144 / 2.1 + 144 / 2.5
    assert mpic.cost(spec, one_hot([8, 2], spec=spec)) == pytest.approx(expected, rel=1e-15)
    # a_theta 0.5 on 2 bits and 0.5 on 8 bits:
    # 0.5 * (144/2.2 + 144/6.5) + 0.5 * (144/2.1 + 144/2.5)
    inputs = CostInputs(W_PREC, one_hot([8, 2], spec=spec).w_theta, A_PREC, [0.5, 0, 0.5], 4)
    expected = 0.5 * (144 / 2.2 + 144 / 6.5) + 0.5 * (144 / 2.1 + 144 / 2.5)
    assert mpic.cost(spec, inputs) == pytest.approx(expected, rel=1e-15)


def test_mpic_energy_hand_computed():
    spec = LayerSpec("fc", "linear", 21, 5)
    # cycles = 5 channels * 21 MACs / 2.1 = 50; power = (5.30+5.39+5.46+5.38)/4 = 5.3825 mW
    # energy = 50 / 250e6 s * 5.3825e-3 W = 1.0765e-9 J = 1.0765e-3 uJ
    assert mpic.cost(spec, one_hot([8] * 5, spec=spec)) == pytest.approx(50.0, rel=1e-15)
    energy = mpic_energy.cost(spec, one_hot([8] * 5, spec=spec))
    assert energy == pytest.approx(1.0765e-3, rel=1e-12)
    assert cycles_to_microjoules(250e6) == pytest.approx(5.3825e3, rel=1e-12)  # 1 s of MPIC


def test_mpic_rejects_precisions_without_table_entry():
    spec = LayerSpec("fc", "linear", 4, 2)
    inputs = CostInputs((0, 3, 8), np.eye(3)[:, :2], (8,), [1.0], 4)
    with pytest.raises(CostModelError, match="no MPIC table entry"):
        mpic.cost(spec, inputs)


# --------------------------------------------------------------------------- hand-computed: ne16


def test_ne16_conv3x3_one_block():
    spec = LayerSpec("c", "conv", 16, 32, (3, 3), (3, 3))
    # n_spatial = 1, n_in = ceil(16/16) = 1, K_o = 32: one full block, no remainder
    # iteration(32) = 1 * (load 31 + offset 6 + matvec (6 + 32*8) + idx 2) + nq (9+32) + so 13
    #              = 301 + 41 + 13 = 355
    assert ne16.cost(spec, one_hot([8] * 32, spec=spec)) == 355.0


def test_ne16_pointwise_with_remainder():
    spec = LayerSpec("pw", "conv", 40, 40, (1, 1), (4, 5))
    # n_spatial = ceil(4/3) * ceil(5/3) = 4; n_in = ceil(40/16) = 3; K_o = 40 = 32 + 8
    # 1x1: iteration(k) = 3 * (19 + 6 + (6 + k) + 2) + (9 + k) + 13 = 121 + 4k
    # iteration(32) = 249, iteration(8) = 153; total = 4 * (249 + 153) = 1608
    assert ne16.cost(spec, one_hot([8] * 40, spec=spec)) == 1608.0


def test_ne16_depthwise():
    spec = LayerSpec("dw", "depthwise", 20, 20, (3, 3), (3, 3), groups=20)
    # blocks of 16: K_o = 20 = 16 + 4; n_spatial = 1; no n_in factor
    # iteration_dw(k) = 31 + (6 + k) + (6 + 8k) + 2 + (9 + k) + 13 = 67 + 10k
    # iteration(16) = 227, iteration(4) = 107; total = 334
    assert ne16.cost(spec, one_hot([8] * 20, spec=spec)) == 334.0


def test_ne16_5x5_kernel_decomposes_into_3x3_and_1x1_passes():
    spec = LayerSpec("c5", "conv", 16, 8, (5, 5), (3, 3))
    # 1 pass 3x3 + (25 - 9) = 16 passes 1x1; n_in = 1; K_o = 8 at 4 bits
    # 3x3: (31 + 6 + (6 + 8*4) + 2) + (9 + 8) + 13 = 77 + 30 = 107
    # 1x1: (19 + 6 + (6 + 8) + 2) + (9 + 8) + 13 = 41 + 30 = 71
    # total = 107 + 16 * 71 = 1243
    assert ne16.cost(spec, one_hot([4] * 8, spec=spec)) == 1243.0


def test_ne16_linear_and_mixed_precision():
    fc = LayerSpec("fc", "linear", 64, 10)
    # n_in = 4, 1x1 pass: 4 * (19 + 6 + (6 + 10) + 2) + (9 + 10) + 13 = 172 + 32 = 204
    assert ne16.cost(fc, one_hot([8] * 10, spec=fc)) == 204.0
    conv = LayerSpec("c", "conv", 16, 3, (3, 3), (3, 3))
    # each precision group costed alone; 8 bit K_o = 1, 2 bit K_o = 1, 0 bit skipped
    # 8 bit: (31 + 6 + (6 + 8) + 2) + (9 + 1) + 13 = 53 + 23 = 76
    # 2 bit: (31 + 6 + (6 + 2) + 2) + (9 + 1) + 13 = 47 + 23 = 70; total 146
    assert ne16.cost(conv, one_hot([8, 2, 0], spec=conv)) == 146.0


def test_ne16_ignores_activation_precision():
    spec = LayerSpec("c", "conv", 16, 32, (3, 3), (3, 3))
    assert ne16.cost(spec, one_hot([8] * 32, a_bits=2, spec=spec)) == 355.0
    soft = CostInputs(W_PREC, one_hot([8] * 32, spec=spec).w_theta, A_PREC, [0.4, 0.4, 0.2], 16)
    assert ne16.cost(spec, soft) == 355.0


def test_ne16_rejects_weights_wider_than_8_bits():
    spec = LayerSpec("fc", "linear", 4, 1)
    with pytest.raises(CostModelError, match="at most 8 bits"):
        ne16.cost(spec, CostInputs((0, 16), [[0.0], [1.0]], (8,), [1.0], 4))


# --------------------------------------------------------------------------- cross-model properties


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("spec", SMALL_LAYERS, ids=lambda s: s.name)
def test_numbers_and_tensors_agree(name, spec):
    model = get_cost_model(name)
    inputs = random_inputs(spec, seed=spec.c_out)
    plain = model(spec, inputs)
    assert isinstance(plain, float)
    tensor64 = model(spec, to_torch(inputs))
    assert isinstance(tensor64, torch.Tensor) and tensor64.dtype == torch.float64
    assert tensor64.item() == pytest.approx(plain, rel=1e-12, abs=1e-12)
    tensor32 = model(spec, to_torch(inputs, torch.float32))
    assert tensor32.item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("spec", SMALL_LAYERS, ids=lambda s: s.name)
def test_pruned_channels_cost_nothing(name, spec):
    model = get_cost_model(name)
    assert model(spec, one_hot([0] * spec.c_out, spec=spec)) == 0.0
    if spec.groups > 1 and spec.kind == "conv":
        return  # c_out - 1 channels do not split into the same groups
    # pruning the last channel costs the same as the layer without that channel
    # (a depthwise layer loses the tied input channel too)
    tied = 1 if spec.kind == "depthwise" else 0
    smaller = LayerSpec(spec.name, spec.kind, spec.c_in - tied, spec.c_out - 1, spec.kernel,
                        spec.out_hw, groups=spec.groups - tied)
    bits = ([8, 2, 4] * spec.c_out)[: spec.c_out - 1]
    pruned = model(spec, one_hot(bits + [0], spec=spec))
    assert pruned > 0.0
    assert pruned == pytest.approx(model(smaller, one_hot(bits, spec=smaller)), rel=1e-12)


def _plain_formula(name: str, spec: LayerSpec, w_bits: list[int], a_bits: int) -> float:
    """Per-channel loops straight from DESIGN.md, for one-hot inputs with c_in_eff = c_in."""
    k2, hw, fan_in = spec.kernel_area, spec.positions, spec.fan_in
    kept = [b for b in w_bits if b]
    if name == "size":
        return sum(fan_in * k2 * b for b in kept)
    if name == "bops":
        return sum(fan_in * k2 * hw * b * a_bits for b in kept)
    cycles = sum(fan_in * k2 * hw / mpic.MACS_PER_CYCLE[a_bits][b] for b in kept)
    return cycles if name == "mpic" else cycles / 250e6 * 5.3825e-3 * 1e6


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(("size", "bops", "mpic", "mpic_energy")),
    spec=st.sampled_from(SMALL_LAYERS),
    data=st.data(),
)
def test_one_hot_reduces_to_plain_formula(name, spec, data):
    n = spec.c_out
    w_bits = data.draw(st.lists(st.sampled_from(W_PREC), min_size=n, max_size=n))
    a_bits = data.draw(st.sampled_from(A_PREC))
    value = get_cost_model(name)(spec, one_hot(w_bits, a_bits, spec=spec))
    assert value == pytest.approx(_plain_formula(name, spec, w_bits, a_bits), rel=1e-12, abs=0)


def test_ne16_one_hot_groups_channels_by_precision():
    spec = LayerSpec("c", "conv", 16, 40, (3, 3), (3, 3))
    # 40 channels: 30 at 8 bit, 10 at 2 bit, interleaved -> same as sub-layers of 30 and 10
    bits = [8, 2, 8, 8, 8, 8, 8, 2] * 5
    whole = ne16.cost(spec, one_hot(bits, spec=spec))
    spec8, spec2 = (LayerSpec(n, "conv", 16, c, (3, 3), (3, 3)) for n, c in (("a", 30), ("b", 10)))
    part8 = ne16.cost(spec8, one_hot([8] * 30, spec=spec8))
    part2 = ne16.cost(spec2, one_hot([2] * 10, spec=spec2))
    assert whole == part8 + part2


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ("size", "bops", "mpic", "mpic_energy"))
def test_smooth_models_pass_gradcheck(name):
    spec = LayerSpec("c", "conv", 6, 4, (3, 3), (3, 3))
    base = random_inputs(spec, seed=3)
    w = torch.tensor(base.w_theta, requires_grad=True)
    a = torch.tensor(base.a_theta, requires_grad=True)
    model = get_cost_model(name)

    def f(w_theta, a_theta):
        return model(spec, CostInputs(W_PREC, w_theta, A_PREC, a_theta, torch.tensor(4.5)))

    assert torch.autograd.gradcheck(f, (w, a))


@pytest.mark.parametrize("name", BUILTINS)
def test_gradients_reach_theta(name):
    spec = LayerSpec("c", "conv", 16, 40, (3, 3), (4, 4))
    inputs = to_torch(random_inputs(spec, seed=7), torch.float32, grad=True)
    get_cost_model(name)(spec, inputs).backward()
    w_grad = inputs.w_theta.grad
    assert w_grad is not None and torch.isfinite(w_grad).all()
    assert (w_grad[1:] > 0).all()  # more mass on a non-zero precision costs more
    assert (w_grad[0] == 0).all()  # the 0-bit row costs nothing
    if name in ("bops", "mpic", "mpic_energy"):
        a_grad = inputs.a_theta.grad
        assert a_grad is not None and torch.isfinite(a_grad).all() and (a_grad != 0).all()
    else:  # size and ne16 do not depend on activation precision
        assert inputs.a_theta.grad is None


def test_ne16_straight_through_gradient_value():
    spec = LayerSpec("c", "conv", 16, 32, (3, 3), (3, 3))
    inputs = to_torch(one_hot([8] * 32, spec=spec), grad=True)
    ne16.cost(spec, inputs).backward()
    # floor(K_o / 32) has identity STE gradient -> d/dK_o = iteration(32) / 32 = 355 / 32;
    # the remainder K_o - 32 * floor(K_o / 32) then has zero gradient.
    row8 = W_PREC.index(8)
    assert torch.allclose(inputs.w_theta.grad[row8], torch.full_like(inputs.w_theta[0], 355 / 32))
    # 2-bit row (K_o = 0): iteration(32) at 2 bits = (31 + 6 + (6 + 64) + 2) + 41 + 13 = 163
    assert (inputs.w_theta.grad[W_PREC.index(2)] == 163 / 32).all()


def test_ne16_gradient_through_ceil_of_c_in_eff():
    spec = LayerSpec("c", "conv", 32, 32, (3, 3), (3, 3))
    inputs = one_hot([8] * 32, spec=spec)
    c_in_eff = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    value = ne16.cost(spec, CostInputs(W_PREC, inputs.w_theta, A_PREC, inputs.a_theta, c_in_eff))
    value.backward()
    # n_in = ceil(20 / 16) = 2: 2 * (31 + 6 + 262 + 2) + 41 + 13 = 656
    assert value.item() == 656.0
    # d n_in / d c_in_eff = 1 / 16 (STE); d total / d n_in = 301
    assert c_in_eff.grad.item() == pytest.approx(301 / 16, rel=1e-12)


# --------------------------------------------------------------------------- specs and inputs


def test_layer_spec_validation():
    with pytest.raises(CostModelError, match="unknown kind 'pool'"):
        LayerSpec("p", "pool", 4, 4)
    with pytest.raises(CostModelError, match="groups == c_in"):
        LayerSpec("dw", "depthwise", 4, 4, (3, 3))
    with pytest.raises(CostModelError, match="disagrees with its shape"):
        LayerSpec("c", "conv", 4, 4, (3, 3), (2, 2), macs=1)
    with pytest.raises(CostModelError, match="kernel"):
        LayerSpec("fc", "linear", 4, 4, (3, 3))
    with pytest.raises(CostModelError, match="must divide"):
        LayerSpec("g", "conv", 6, 4, groups=4)
    with pytest.raises(CostModelError, match="2-d layers at most"):
        LayerSpec("c3d", "conv", 4, 4, (3, 3, 3), (2, 2, 2))
    assert LayerSpec("c", "conv", 4, 8, (3, 3), (2, 2), macs=8 * 4 * 9 * 4).macs == 1152
    conv1d = LayerSpec("c1d", "conv", 4, 8, [5], [10])  # 1-d sizes become (1, k)
    assert (conv1d.kernel, conv1d.out_hw, conv1d.macs) == ((1, 5), (1, 10), 8 * 4 * 5 * 10)


def test_cost_inputs_validation():
    with pytest.raises(CostModelError, match="w_theta has 2 rows"):
        CostInputs(W_PREC, np.zeros((2, 3)), A_PREC, [0, 0, 1], 3)
    with pytest.raises(CostModelError, match="a_theta has 2 entries"):
        CostInputs(W_PREC, np.zeros((4, 3)), A_PREC, [0, 1], 3)
    with pytest.raises(CostModelError, match="distinct"):
        CostInputs((8, 8), np.zeros((2, 3)), A_PREC, [0, 0, 1], 3)
    with pytest.raises(CostModelError, match="not among"):
        CostInputs.from_bits([8, 3], 8, 4)
    spec = LayerSpec("c", "conv", 4, 2)
    for name in BUILTINS:
        with pytest.raises(CostModelError, match="columns but the layer has c_out=2"):
            get_cost_model(name)(spec, CostInputs.from_bits([8, 8, 8], 8, 4))
        with pytest.raises(CostModelError, match="c_in_eff=5.0 is outside"):
            get_cost_model(name)(spec, CostInputs.from_bits([8, 8], 8, 5))


def test_c_out_eff():
    theta = np.array([[0.25, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.75, 0.0, 1.0]])
    inputs = CostInputs(W_PREC, theta, A_PREC, [0, 0, 1], 4)
    # C_out - sum_c theta[0, c] = 3 - 1.25
    assert inputs.c_out_eff() == 1.75
    assert to_torch(inputs).c_out_eff().item() == 1.75
    assert CostInputs((2, 8), np.eye(2), A_PREC, [0, 0, 1], 4).c_out_eff() == 2.0


# --------------------------------------------------------------------------- registry


def test_builtins_registered_with_units():
    assert set(BUILTINS) <= set(available_cost_models())
    units = {name: get_cost_model(name).unit for name in BUILTINS}
    assert units == {"size": "bit", "bops": "bit-op", "mpic": "cycles", "mpic_energy": "uJ",
                     "ne16": "cycles"}


def test_unknown_name_lists_available_on_one_line():
    with pytest.raises(CostModelError) as info:
        get_cost_model("tpu")
    message = str(info.value)
    assert "\n" not in message and "unknown cost model 'tpu'" in message
    assert "bops, horowitz_energy, mpic, mpic_energy, ne16, size" in message
    assert info.value.exit_code == 11


def test_register_function_and_decorator():
    def flat(spec, inputs):
        return 1.0

    model = register_cost_model(CostModel("flat_test", "layers", flat))
    try:
        assert get_cost_model("flat_test") is model
        with pytest.raises(CostModelError, match="already registered"):
            register_cost_model(CostModel("flat_test", "layers", flat))
        register_cost_model(CostModel("flat_test", "layers", flat, "v2"), replace=True)
        assert get_cost_model("flat_test").description == "v2"
    finally:
        unregister_cost_model("flat_test")

    @register_cost_model(name="macs_test", unit="MAC")
    def macs(spec, inputs):
        return spec.macs_per_out_channel(inputs.c_in_eff) * inputs.c_out_eff()

    try:
        assert macs.__name__ == "macs"  # the decorator returns the function
        spec = LayerSpec("c", "conv", 2, 2, (1, 1), (2, 2))
        # c_in_eff 2 * 1 * 4 positions = 8 MACs per channel * C_out_eff 1 = 8
        assert get_cost_model("macs_test")(spec, one_hot([8, 0], spec=spec)) == 8.0
    finally:
        unregister_cost_model("macs_test")
    assert "macs_test" not in available_cost_models()


def test_register_rejects_malformed_models():
    with pytest.raises(CostModelError, match="lacks unit, cost"):
        register_cost_model(type("M", (), {"name": "x"})())
    with pytest.raises(CostModelError, match="non-empty string name"):
        CostModel("", "bit", lambda s, i: 0.0)
    with pytest.raises(CostModelError, match="needs name= and unit="):
        register_cost_model(name="x")
    with pytest.raises(CostModelError, match="no registered cost model"):
        unregister_cost_model("never_registered")


def test_evaluate_cost_models_sums_layers():
    layers = [(spec, random_inputs(spec, seed=i)) for i, spec in enumerate(SMALL_LAYERS)]
    totals = evaluate_cost_models(layers)
    assert set(BUILTINS) <= set(totals)
    for name in BUILTINS:
        model = get_cost_model(name)
        assert totals[name] == pytest.approx(sum(model(s, i) for s, i in layers), rel=1e-12)
    assert evaluate_cost_models(layers, names=["size"]) == {"size": totals["size"]}
    assert evaluate_cost_models([], names=["ne16"]) == {"ne16": 0.0}
    torch_totals = evaluate_cost_models([(s, to_torch(i)) for s, i in layers], names=["bops"])
    assert torch_totals["bops"].item() == pytest.approx(totals["bops"], rel=1e-12)


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """An importable third-party module with a good, a broken and a misnamed cost model."""
    (tmp_path / "chip_costs_pq_test.py").write_text(textwrap.dedent("""
        from cost_models import CostModel

        def _cost(spec, inputs):
            return 7.0 * spec.c_out

        CHIP = CostModel("chip", "cycles", _cost, "a third-party chip")
        MISNAMED = CostModel("other", "cycles", _cost)

        class Plain:  # shaped like a cost model, not a CostModel
            name = "plain"
            unit = "ms"
            cost = staticmethod(_cost)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    group = cost_models.ENTRY_POINT_GROUP
    targets = {"chip": "CHIP", "plain": "Plain", "broken": "MISSING", "misnamed": "MISNAMED",
               "size": "CHIP"}
    entry_points = [importlib.metadata.EntryPoint(name, f"chip_costs_pq_test:{attr}", group)
                    for name, attr in targets.items()]
    entry_points.append(importlib.metadata.EntryPoint("elsewhere", "x:Y", "other.group"))
    seen_groups = []

    def fake_entry_points(*, group):
        seen_groups.append(group)
        return [ep for ep in entry_points if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_WARNED_SHADOWED", set())
    yield seen_groups
    sys.modules.pop("chip_costs_pq_test", None)


def test_entry_points_are_discovered_and_loaded(plugin_module):
    names = available_cost_models()
    assert plugin_module == [cost_models.ENTRY_POINT_GROUP]
    assert {"chip", "plain", "broken", "misnamed"} <= set(names)
    assert names.count("size") == 1
    spec = LayerSpec("fc", "linear", 4, 3)
    chip = get_cost_model("chip")
    assert (chip.unit, chip(spec, one_hot([8] * 3, spec=spec))) == ("cycles", 21.0)
    assert get_cost_model("plain").unit == "ms"


def test_entry_point_cannot_shadow_builtin(plugin_module, caplog):
    with caplog.at_level("WARNING", logger="cost_models.registry"):
        assert get_cost_model("size") is size.COST_MODEL
        get_cost_model("size")
        available_cost_models()
    assert available_cost_models().count("size") == 1
    warnings = [r.getMessage() for r in caplog.records if "'size'" in r.getMessage()]
    assert len(warnings) == 1 and "ignored: the name is already registered" in warnings[0]


def test_broken_and_misnamed_entry_points_fail_clearly(plugin_module):
    with pytest.raises(CostModelError, match="'broken' .* failed to load: AttributeError"):
        get_cost_model("broken")
    with pytest.raises(CostModelError, match="named 'other'; make the two names equal"):
        get_cost_model("misnamed")
    with pytest.raises(CostModelError, match="failed to load"):
        evaluate_cost_models([], names=None)


# --------------------------------------------------------------------------- import hygiene


def test_import_does_not_load_torch_or_plugin():
    code = ("import sys, cost_models; "
            "assert 'torch' not in sys.modules and 'plugin' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- fine-grained sparsity, horowitz_energy


SPARSE_SPEC = LayerSpec("sparse", "conv", 16, 4, (3, 3), (8, 8))


def test_sparsity_counted_as_each_model_states():
    from cost_models import horowitz_energy

    dense = CostInputs.from_bits([8, 8, 0, 4], 8, 16)
    sparse = CostInputs.from_bits([8, 8, 0, 4], 8, 16, sparsity=0.5)
    # n = 16 * 9 = 144 weights per kept channel, floor(0.5 * 144) = 72 zero: 72 nonzero
    assert size.cost(SPARSE_SPEC, dense) == 144 * 20
    assert size.cost(SPARSE_SPEC, sparse) == 3 * 144 + 72 * 20  # bitmap of the 3 kept channels + nonzeros
    # the bitmap is used only where it is smaller: 2-bit weights at 30% zeros stay dense
    two = CostInputs.from_bits([2, 2, 2, 2], 8, 16, sparsity=0.3)
    assert size.cost(SPARSE_SPEC, two) == 144 * 8
    for model in (bops, mpic, mpic_energy, ne16):  # none of them skips zero weights
        assert model.cost(SPARSE_SPEC, sparse) == model.cost(SPARSE_SPEC, dense)
    # horowitz_energy skips the zero-weight MACs and reads the sparse encoding
    mult = 0.2 / 64 * (8 * 8 + 8 * 8 + 4 * 8)
    compute = 64 * 72 * (mult + 0.1 * 3)
    memory = (3 * 144 + 72 * 20 + 16 * 64 * 8) * 10 / 64
    assert horowitz_energy.cost(SPARSE_SPEC, sparse) == pytest.approx((compute + memory) * 1e-6, rel=1e-12)
    dense_compute = 64 * 144 * (mult + 0.1 * 3)
    dense_memory = (144 * 20 + 16 * 64 * 8) * 10 / 64
    assert horowitz_energy.cost(SPARSE_SPEC, dense) == pytest.approx((dense_compute + dense_memory) * 1e-6, rel=1e-12)
    # an odd count floors the zeros: 0.3 * 144 = 43.2 -> 43 zero
    assert size.cost(SPARSE_SPEC, CostInputs.from_bits([8] * 4, 8, 16, sparsity=0.3)) == 4 * 144 + 4 * 101 * 8


def test_horowitz_constants_and_scaling():
    from cost_models import horowitz_energy as h

    assert h.mac_pj(8, 8) == pytest.approx(0.3)  # 0.2 pJ multiply + 0.1 pJ 32-bit accumulate
    # the w * a rule reproduces Horowitz's own 32-bit multiply (3.1 pJ) within 5%
    assert h.multiply_pj(32, 32) == pytest.approx(h.MULT_32BIT_PJ, rel=0.05)
    assert h.multiply_pj(4, 4) == pytest.approx(0.0125 * 4) and h.multiply_pj(2, 2) == pytest.approx(0.0125)
    model = get_cost_model("horowitz_energy")
    assert model.unit == "uJ" and "horowitz_energy" in available_cost_models()
    # fewer bits and fewer channels cost less; the accumulator keeps a floor
    spec = SMALL_LAYERS[0]
    e8, e2 = model(spec, one_hot([8] * spec.c_out, 8, spec=spec)), model(spec, one_hot([2] * spec.c_out, 2, spec=spec))
    assert 0.3 < e2 / e8 < 0.6


def test_horowitz_energy_on_tensors_matches_numbers_and_has_gradients():
    spec = SMALL_LAYERS[0]
    inputs = random_inputs(spec, seed=3)
    model = get_cost_model("horowitz_energy")
    t = to_torch(inputs, grad=True)
    value = model(spec, t)
    assert value.item() == pytest.approx(model(spec, inputs), rel=1e-10)
    value.backward()
    assert t.w_theta.grad is not None and torch.isfinite(t.w_theta.grad).all()
    sparse = CostInputs(inputs.w_precisions, inputs.w_theta, inputs.a_precisions, inputs.a_theta, inputs.c_in_eff,
                        0.4)
    assert model(spec, sparse) < model(spec, inputs)
    with pytest.raises(CostModelError, match="sparsity must be in"):
        CostInputs.from_bits([8], 8, 1, sparsity=1.0)
