"""SearchableModel on a tiny residual + depthwise + Gemm model written in ONNX text."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from onnx import numpy_helper

from cost_models import get_cost_model
from graph_passes.channel_groups import analyse
from graph_passes.normalise import normalise
from plugin.bridge import convert
from plugin.engine.quantizers import quantize_weight_per_channel
from plugin.engine.config import SearchConfig
from plugin.engine.supernet import run_search
from plugin.engine.supernet import Supernet as SearchableModel
from plugin.space import Precisions, SearchSpace

# c1, c2 (tied by the Add) and the depthwise dw form one group of 8; c3 one of 6; the Gemm
# reaches the graph output (unprunable).
TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[1,3,6,6] x) => (float[1,5] y) {
    c1 = Conv <pads=[1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1, 1, 1, 1]> (r1, w2, b2)
    s = Add (c1, c2)
    rs = Relu (s)
    dw = Conv <pads=[1, 1, 1, 1], group=8> (rs, wd, bd)
    rd = Relu (dw)
    c3 = Conv (rd, w3, b3)
    r3 = Relu (c3)
    p = GlobalAveragePool (r3)
    f = Flatten (p)
    y = Gemm <transB=1> (f, wg, bg)
}
"""
SHAPES = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (8, 8, 3, 3), "b2": (8,), "wd": (8, 1, 3, 3), "bd": (8,),
          "w3": (6, 8, 1, 1), "b3": (6,), "wg": (5, 6), "bg": (5,)}
W_PRECISIONS = (0, 2, 4, 8)
A_PRECISIONS = (2, 4, 8)


def _tiny_model(seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(TINY)
    rng = np.random.default_rng(seed)
    for name, shape in SHAPES.items():
        value = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return normalise(model, verify=False).model


@pytest.fixture(scope="module")
def tiny() -> onnx.ModelProto:
    return _tiny_model()


def _searchable(model: onnx.ModelProto, **config: object) -> SearchableModel:
    cfg = SearchConfig(init_clip=4.0, progress=False, **config)  # type: ignore[arg-type]
    space = SearchSpace(analyse(model), Precisions(cfg.weight_precisions, cfg.site_precisions))
    return SearchableModel(model, space, convert(model), cfg)


def _by_op(sm: SearchableModel) -> dict[str, list]:
    out: dict[str, list] = {}
    for entry in sm._layers.values():
        out.setdefault(entry.info.layer.op_type + ("dw" if entry.info.layer.is_depthwise else ""), []).append(entry)
    return out


def _data(n: int = 16, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g),) for _ in range(n // 4)]


def test_residual_group_shares_one_alpha_and_gemm_has_no_zero_bit(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    layers = {e.info.layer.weight: e.quantizer for e in sm._layers.values()}
    assert layers["w1"].alpha is layers["w2"].alpha is layers["wd"].alpha
    assert layers["w3"].alpha is not layers["w1"].alpha
    assert layers["w1"].precisions == W_PRECISIONS
    assert layers["wg"].precisions == (2, 4, 8)  # reaches the graph output: unprunable
    assert len(sm.nas_parameters()) == 3 + len(sm.sites)
    nas = {id(p) for p in sm.nas_parameters()}
    assert not nas & {id(p) for p in sm.net_parameters()}


def test_signed_input_site_and_unsigned_relu_sites(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    signed = {site.tensor: site.quantizer.signed for site in sm.sites.values()}
    assert signed["x"] is True
    assert not any(v for k, v in signed.items() if k != "x")


def _expected_size(sm: SearchableModel) -> float:
    """Hand-computed expected size at the initial alpha (b / max b), T = 1."""
    theta_w = torch.softmax(torch.tensor(W_PRECISIONS, dtype=torch.float64) / 8, 0)
    theta_u = torch.softmax(torch.tensor((2, 4, 8), dtype=torch.float64) / 8, 0)
    eb_w = float((theta_w * torch.tensor(W_PRECISIONS, dtype=torch.float64)).sum())
    eb_u = float((theta_u * torch.tensor((2, 4, 8), dtype=torch.float64)).sum())
    keep = 1 - float(theta_w[0])
    # c1: input x (no group) 3 * 9 * 8 ch; c2: 8 kept-eff * 9 * 8; dw: 9 * 8 (per channel);
    # c3: 8 kept-eff * 1 * 6; Gemm: 6 kept-eff * 5 channels without a 0-bit option.
    return (3 * 9 * 8 * eb_w + 8 * keep * 9 * 8 * eb_w + 9 * 8 * eb_w + 8 * keep * 6 * eb_w
            + 6 * keep * 5 * eb_u)


def test_cost_at_init_matches_hand_computation(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    assert float(sm.cost("size").detach()) == pytest.approx(_expected_size(sm), rel=1e-5)
    assert sm.cost_before("size") == (3 * 9 * 8 + 8 * 9 * 8 + 9 * 8 + 8 * 6 + 6 * 5) * 8
    assert math.isfinite(float(sm.cost("mpic").detach())) and float(sm.cost("bops").detach()) > 0


def test_gradients_reach_alpha_from_cost_and_from_task_loss(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    sm.cost("size").backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sm.nas_parameters()[:3])
    sm.zero_grad()
    x = _data(4)[0][0]
    (sm(x) - sm.teacher_outputs(x)).pow(2).sum().backward()
    weight_alphas = [a.alpha for a in sm.alphas]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weight_alphas)
    site_alpha = next(iter(sm.sites.values())).quantizer.alpha.alpha
    assert site_alpha.grad is not None and site_alpha.grad.abs().sum() > 0


def test_discretise_never_empties_a_group(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    with torch.no_grad():
        for alpha in sm.alphas:
            if 0 in alpha.precisions:
                alpha.alpha[0] = 10.0  # everything wants to be pruned
                alpha.alpha[0, 3] = 0.5  # ... column 3 least of all
    plan = sm.discretise()
    prunable = [g for g in sm.analysis.groups if g.prunable]
    for group in prunable:
        assert len(plan.groups[group.id].kept) == 1
    group_a = next(g for g in prunable if g.size == 8)
    assert plan.groups[group_a.id].kept == (3,)
    for name, layer in plan.layers.items():
        assert any(b != 0 for b in layer.bits), name
    assert plan.cost_after["size"] < plan.cost_before["size"]
    assert sm.cost_of_plan(plan, "size") == plan.cost_after["size"]


def test_freeze_applies_bits_exactly_and_masks_pruned_channels(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    plan = sm.uniform_plan(8)
    layers = dict(plan.layers)
    ops = _by_op(sm)
    conv1 = ops["Conv"][0]
    bits = [0, 2, 4, 8, 8, 4, 2, 8]
    from plugin.plan import CompressionPlan, GroupPlan, LayerPlan

    for entry in ops["Conv"][:2] + ops["Convdw"]:
        layers[entry.info.name] = LayerPlan(tuple(bits))
    groups = dict(plan.groups)
    gid = conv1.info.layer.output_groups[0]
    groups[gid] = GroupPlan(8, tuple(range(1, 8)))
    plan = CompressionPlan(plan.model_sha256, groups, layers, plan.activations)
    sm.freeze(plan)
    for entry in sm._layers.values():
        module = sm.net.get_submodule(entry.owner)
        raw = module.parametrizations[entry.weight_attr].original
        expected = quantize_weight_per_channel(raw.detach(), list(plan.layers[entry.info.name].bits),
                                               entry.quantizer.ch_axis).y
        assert torch.equal(getattr(module, entry.weight_attr).detach(), expected)
    weight = sm.net.get_submodule(conv1.owner).weight.detach()
    assert torch.count_nonzero(weight[0]) == 0
    assert float(sm.net.get_submodule(conv1.owner).bias[0].detach()) == 0.0
    site = sm.sites[sm._site_key[ops["Conv"][1].info.layer.input]]
    assert site.mask is not None and site.mask.tolist() == [False] + [True] * 7
    materialised = sm.materialised_bridge()
    assert torch.equal(materialised.module.get_submodule(conv1.owner).weight, weight)


def test_freeze_8bit_reproduces_the_float_model(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny, act_bits=(8,))
    sm.calibrate(_data(8))
    sm.freeze(sm.uniform_plan(8))
    x = _data(4, seed=5)[0][0]
    out, ref = sm(x).detach(), sm.teacher_outputs(x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_search_is_deterministic(tiny: onnx.ModelProto) -> None:
    plans = []
    for _ in range(2):
        sm = _searchable(tiny, epochs=2, lam=200.0, seed=3)
        plans.append(run_search(sm, _data(16), sm.config).to_json())
    assert plans[0] == plans[1]


def test_cost_of_plan_counts_pruned_inputs(tiny: onnx.ModelProto) -> None:
    sm = _searchable(tiny)
    minimal = sm.minimal_plan(["size"])
    # c1: 1 ch * 3 * 9 * 2; c2: 1 * 1 * 9 * 2; dw: 9 * 2; c3: 1 * 1 * 2; Gemm: 1 * 5 * 2 (no 0-bit)
    assert minimal.cost_after["size"] == 3 * 9 * 2 + 9 * 2 + 9 * 2 + 2 + 5 * 2
    assert get_cost_model("size").unit == "bit"


def test_prune_init_breaks_symmetry_by_channel_norm_and_keeps_the_start_exact(tiny: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(tiny)
    # scale c3's output channel 2 down: it becomes the weakest channel of its (own) group
    w3 = next(t for t in model.graph.initializer if t.name == "w3")
    value = numpy_helper.to_array(w3).copy()
    value[2] *= 0.05
    w3.CopyFrom(numpy_helper.from_array(value, "w3"))
    plain, broken = _searchable(model), _searchable(model, prune_init=1.0)
    group_c3 = next(e for e in broken._layers.values() if e.info.layer.weight == "w3").info.alpha_index
    zero = W_PRECISIONS.index(0)
    assert torch.equal(plain.alphas[group_c3].alpha[zero], torch.zeros(6))  # symmetric start
    logits = broken.alphas[group_c3].alpha[zero].detach()
    assert int(logits.argmax()) == 2 and float(logits[2]) > 0.8  # weak channel: likelier to be pruned
    assert float(logits.min()) < 0  # strong channels: less likely than before
    assert torch.allclose(broken.alphas[group_c3].alpha[1:], plain.alphas[group_c3].alpha[1:])
    # the raw weights are rescaled by 1 / (1 - theta_0) channel by channel, so the expected
    # effective weight starts at the FP32 one, as without the symmetry breaker
    entry = next(e for e in broken._layers.values() if e.info.layer.weight == "w3")
    raw = broken.net.get_submodule(entry.owner).parametrizations[entry.weight_attr].original.detach()
    fp32 = getattr(broken._teacher_module().get_submodule(entry.owner), entry.weight_attr).detach()
    keep = 1 - broken.thetas()[group_c3][zero].detach()
    torch.testing.assert_close(raw * keep.reshape(-1, 1, 1, 1), fp32, rtol=1e-5, atol=1e-7)
