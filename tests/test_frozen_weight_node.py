"""The frozen weight quantizer's training-step node (quantizers._frozen_weight_y, issue 15: no
repeated work for frozen parts): the same values and gradients, bit for bit, as
quantize_weight_per_channel, its fallbacks where the clamp matters, its cache following the
plan, and a whole QAT run that trains to the same bits with the node on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.engine import quantizers as q
from plugin.engine.geta import GetaWeightQuantizer


def _both(quantizer, w: torch.Tensor, bits, ch_axis: int, upstream: torch.Tensor):
    a = w.clone().requires_grad_(True)
    ya = quantizer(a)
    (ya * upstream).sum().backward()
    b = w.clone().requires_grad_(True)
    yb = q.quantize_weight_per_channel(b, bits, ch_axis).y
    (yb * upstream).sum().backward()
    return (ya, a.grad), (yb, b.grad)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal as bit patterns (so 0.0 and -0.0 differ, and NaN equals the same NaN)."""
    return x.shape == y.shape and torch.equal(x.contiguous().view(torch.int32), y.contiguous().view(torch.int32))


@pytest.mark.parametrize("ch_axis", [0, 1])
@pytest.mark.parametrize("case", ["mixed", "all-kept", "zero-channel", "tiny", "nan", "inf", "huge"])
def test_frozen_node_is_quantize_weight_per_channel(case: str, ch_axis: int) -> None:
    torch.manual_seed(1)
    for trial in range(12):
        w = torch.randn(5, 5, 3, 3) * float(torch.rand(()) * 10 + 1e-3)
        bits = torch.tensor([0, 2, 4, 8, 8, 4, 2])[torch.randperm(7)][:5]
        index = [slice(None)] * 4
        index[ch_axis] = 1
        if case == "all-kept":
            bits = torch.full((w.shape[ch_axis],), (2, 4, 8)[trial % 3])
        elif case == "zero-channel":
            w[tuple(index)] = 0.0
        elif case == "tiny":  # subnormal weights: a subnormal scale loses precision
            w[tuple(index)] *= 1e-40
        elif case == "nan":
            w.select(ch_axis, 1)[trial % 5, trial % 3, 0] = float("nan")
        elif case == "inf":
            w.select(ch_axis, 1)[trial % 5, trial % 3, 0] = -float("inf")
        elif case == "huge":
            w[tuple(index)] *= 3e38
        quantizer = q.FrozenWeightQuantizer(w.shape[ch_axis], ch_axis=ch_axis)
        quantizer.freeze(bits)
        upstream = torch.randn_like(w)
        (ya, ga), (yb, gb) = _both(quantizer, w, bits, ch_axis, upstream)
        assert _same_bits(ya, yb), (case, trial)
        assert _same_bits(ga, gb), (case, trial)


def test_frozen_node_takes_the_one_node_path_and_falls_back(monkeypatch) -> None:
    calls = {"node": 0, "general": 0}
    node, general = q._FrozenRoundSTE.apply, q.quantize_weight_per_channel

    def count_node(*args):
        calls["node"] += 1
        return node(*args)

    def count_general(*args, **kwargs):
        calls["general"] += 1
        return general(*args, **kwargs)

    monkeypatch.setattr(q._FrozenRoundSTE, "apply", count_node)
    monkeypatch.setattr(q, "quantize_weight_per_channel", count_general)
    quantizer = q.FrozenWeightQuantizer(3)
    quantizer.freeze([8, 0, 2])
    w = torch.randn(3, 4)
    quantizer(w)
    assert calls == {"node": 1, "general": 0}
    w[0, 0] = float("nan")
    quantizer(w)
    assert calls == {"node": 1, "general": 1}


def test_frozen_node_cache_follows_the_plan() -> None:
    """Re-freezing, and GETA's in-place pruning of its bits tensor, reach the next forward."""
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 3)
    quantizer = q.FrozenWeightQuantizer(4)
    quantizer.freeze([8, 8, 8, 8])
    assert torch.equal(quantizer(w), q.quantize_weight_per_channel(w, 8).y)
    quantizer.freeze([2, 0, 4, 8])
    assert torch.equal(quantizer(w), q.quantize_weight_per_channel(w, [2, 0, 4, 8]).y)
    geta = GetaWeightQuantizer(4, q_m=float(w.abs().max()))
    geta.freeze([8, 4, 4, 8])
    assert torch.equal(geta(w), q.quantize_weight_per_channel(w, [8, 4, 4, 8]).y)
    geta.frozen_bits[2] = 0  # in place, as set_pruned does
    assert torch.equal(geta(w), q.quantize_weight_per_channel(w, [8, 4, 0, 8]).y)
    assert torch.equal(geta(w)[2], torch.zeros_like(w[2]))


def test_frozen_node_keeps_the_quantizers_errors() -> None:
    quantizer = q.FrozenWeightQuantizer(3)
    with pytest.raises(ValueError, match="3 channels on axis 0|expected 3"):
        quantizer(torch.randn(4, 2))


def _qat_run(enabled: bool, monkeypatch) -> tuple[list[float], dict[str, torch.Tensor]]:
    from pathlib import Path

    from graph_passes.prepare import prepare_model
    from plugin.data import Dataset
    from plugin.engine.config import SearchConfig
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.engine.supernet import Supernet
    from plugin.engine.training import FinetuneConfig, finetune
    from plugin.space import Precisions, SearchSpace

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(q, "_FROZEN_WEIGHT_NODE", enabled)
    calls = {"node": 0}
    node = q._FrozenRoundSTE.apply

    def counted(*args):
        calls["node"] += 1
        return node(*args)

    monkeypatch.setattr(q._FrozenRoundSTE, "apply", counted)
    prepared = prepare_model(str(root / "samples/digits/model.onnx"))
    z = np.load(root / "samples/digits/train.npz")
    name = prepared.model.graph.input[0].name
    data = Dataset({name: z["input"][:192].astype(np.float32)}, z["labels"][:192].astype(np.int64))
    config = SearchConfig(batch_size=64, progress=False, seed=0)
    space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, config.site_precisions))
    torch.manual_seed(0)
    net = Supernet.build(prepared.model, config, space=space)
    with torch.no_grad():  # a mixed plan with pruned channels in every group
        for alpha in {id(m): m for m in net.modules() if isinstance(m, q.SharedAlpha)}.values():
            alpha.alpha.normal_(0.0, 3.0)
    plan = net.discretise()
    layer_bits = [b for layer in plan.layers.values() for b in layer.bits]
    assert 0 in layer_bits and len(set(layer_bits)) >= 3
    model = FakeQuantModel.build(prepared.model, config, space=space)
    model.calibrate(data, 64)
    result = finetune(model, plan, data, FinetuneConfig(epochs=2, batch_size=64, progress=False,
                                                        keep_best=False))
    assert (calls["node"] > 0) == enabled  # the node ran (every layer, every step) only when on
    return result.epoch_losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_qat_trains_to_the_same_bits_with_the_node(monkeypatch) -> None:
    losses_on, state_on = _qat_run(True, monkeypatch)
    losses_off, state_off = _qat_run(False, monkeypatch)
    assert losses_on == losses_off
    assert state_on.keys() == state_off.keys()
    for key in state_on:
        assert torch.equal(state_on[key], state_off[key]), key
