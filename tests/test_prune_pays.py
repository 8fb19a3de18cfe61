"""Issue 15, "make pruning happen where it pays": the search options that decide how much a
group prunes (plugin/engine/supernet.py, exposed by the gradient strategy).

On the tiny model of tests/test_searchable.py (c3: a 1x1 conv, its own group of 6 channels):
- ``discretisation="expected"`` prunes ``round(sum theta_0)`` channels of a group whose channels
  all sit below theta_0 = 1/2 (``keep_first`` prunes none), the least important first, and gives
  the kept ones widths in the expected counts, the most important the widest;
- ``prune_init_score="taylor"`` starts the least important channel (by ``|w dL/dw|``) likeliest
  pruned, at ``+prune_init``, the most important at ``-prune_init``, and the start still computes
  the FP32 function in expectation;
- ``zero_logit_lr`` multiplies the 0-bit logits' step and only theirs;
- ``ordered_cost`` splits the cost's push within a group by importance rank (the weakest channel
  hardest), at the same mean pressure.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from graph_passes.errors import ConfigError
from plugin.engine.config import SearchConfig, SearchConfigError
from plugin.engine.supernet import SearchRunner, Supernet
from plugin.strategies.gradient import GradientStrategy
from tests.test_searchable import W_PRECISIONS, _data, _searchable, _tiny_model

ZERO = W_PRECISIONS.index(0)


def _model_with_ranked_c3(factors: list[float]) -> onnx.ModelProto:
    """The tiny model with c3's output channel i (weights and bias) scaled by ``factors[i]``."""
    model = _tiny_model(0)
    for name in ("w3", "b3"):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        value = numpy_helper.to_array(tensor).copy()
        value *= np.asarray(factors, dtype=np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
        tensor.CopyFrom(numpy_helper.from_array(value, name))
    return model


def _c3_alpha(net: Supernet) -> int:
    return next(e for e in net._layers.values() if e.info.layer.weight == "w3").info.alpha_index


def _set_theta(net: Supernet, index: int, theta: list[float]) -> None:
    with torch.no_grad():  # temperature 1 at the start: softmax(log p) = p
        alpha = net.alphas[index]
        alpha.alpha.copy_(torch.log(torch.tensor(theta)).reshape(-1, 1).expand_as(alpha.alpha))


def _c3_bits(net: Supernet) -> tuple[int, ...]:
    plan = net.discretise(cost_models=["size"], with_scales=False)
    return plan.layers[next(n for n, e in net._layers.items() if e.info.layer.weight == "w3")].bits


def test_expected_discretisation_prunes_the_expected_number_least_important_first() -> None:
    model = _model_with_ranked_c3([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    theta = [0.3, 0.35, 0.2, 0.15]  # per channel: 0, 2, 4, 8 bits
    first, expected = _searchable(model), _searchable(model, discretisation="expected")
    for net in (first, expected):
        _set_theta(net, _c3_alpha(net), theta)
    assert 0 not in _c3_bits(first)  # theta_0 = 0.3 < 1/2 everywhere: keep_first prunes nothing
    bits = _c3_bits(expected)
    # 6 channels: expected counts 1.8 / 2.1 / 1.2 / 0.9 -> largest remainder 2 / 2 / 1 / 1
    assert bits.count(0) == round(6 * 0.3) == 2
    assert (bits.count(2), bits.count(4), bits.count(8)) == (2, 1, 1)
    assert bits[0] == bits[1] == 0  # the two weakest channels pruned
    assert bits[5] == 8  # the strongest at the widest width
    given_back = expected.discretise(cost_models=["size"], with_scales=False, prune_threshold=0.75)
    layer = next(n for n, e in expected._layers.items() if e.info.layer.weight == "w3")
    assert given_back.layers[layer].bits.count(0) == round(0.5 * 6 * 0.3) == 1  # the budget's give-back
    plan_first = first.discretise(cost_models=["size"], with_scales=False)
    plan_expected = expected.discretise(cost_models=["size"], with_scales=False)
    assert expected.cost_of_plan(plan_expected, "size") < first.cost_of_plan(plan_first, "size")


def test_expected_discretisation_keeps_one_channel_and_follows_unequal_thetas() -> None:
    net = _searchable(_tiny_model(0), discretisation="expected")
    index = _c3_alpha(net)
    _set_theta(net, index, [0.97, 0.01, 0.01, 0.01])  # everything wants to go
    bits = _c3_bits(net)
    assert bits.count(0) == 5  # a group keeps one channel
    with torch.no_grad():  # unequal theta_0: the likeliest-pruned columns go first, whatever their norm
        alpha = net.alphas[index]
        alpha.alpha.zero_()
        alpha.alpha[ZERO, :] = torch.tensor([-2.0, 3.0, -2.0, 3.0, -2.0, -2.0])
    bits = _c3_bits(net)
    theta0 = net.thetas()[index][ZERO].detach()
    assert bits.count(0) == round(float(theta0.sum())) == 2
    assert bits[1] == bits[3] == 0


def test_taylor_init_ranks_channels_by_data_and_keeps_the_start_exact() -> None:
    model = _model_with_ranked_c3([1.0, 1.0, 1e-3, 1.0, 1.0, 1.0])  # channel 2: almost no effect
    net = _searchable(model, prune_init=1.0, prune_init_score="taylor", importance_batches=2)
    index = _c3_alpha(net)
    assert torch.equal(net.alphas[index].alpha[ZERO].detach(), torch.zeros(6))  # nothing before the data
    SearchRunner(net, _data(16, seed=1), net.config)
    logits = net.alphas[index].alpha[ZERO].detach()
    # channel 2 (weights scaled down) and channel 0 (the largest weight norm of the group, but
    # dead behind its ReLU on this data: no gradient) are the two least important by the data;
    # the norm score would rank channel 0 the most important
    scores = net._importance[index]
    assert float(scores[0]) == 0.0 and int(net.weight_scores()[index].argmax()) == 0
    assert set(torch.argsort(logits, descending=True)[:2].tolist()) == {0, 2}
    assert sorted(logits.tolist()) == pytest.approx([-1.0, -0.6, -0.2, 0.2, 0.6, 1.0])  # ranks, not values
    assert float(logits[int(scores.argmax())]) == pytest.approx(-1.0)
    entry = next(e for e in net._layers.values() if e.info.layer.weight == "w3")
    raw = net.net.get_submodule(entry.owner).parametrizations[entry.weight_attr].original.detach()
    fp32 = getattr(net._teacher_module().get_submodule(entry.owner), entry.weight_attr).detach()
    keep = 1 - net.thetas()[index][ZERO].detach()
    torch.testing.assert_close(raw * keep.reshape(-1, 1, 1, 1), fp32, rtol=1e-5, atol=1e-7)


def test_zero_logit_lr_scales_only_the_pruning_step() -> None:
    model = _tiny_model(0)
    moves = {}
    for factor in (1.0, 3.0):
        net = _searchable(model, seed=0, zero_logit_lr=factor)
        runner = SearchRunner(net, _data(16, seed=1), net.config)
        before = [a.alpha.detach().clone() for a in net.alphas]
        runner.alpha_opt.zero_grad(set_to_none=True)
        (1000.0 * net.cost() * runner.cost_scale).backward()
        runner.alpha_opt.step()
        moves[factor] = [a.alpha.detach() - b for a, b in zip(net.alphas, before)]
    index = _c3_alpha(net)
    zero_1, zero_3 = moves[1.0][index][ZERO], moves[3.0][index][ZERO]
    assert float(zero_1.abs().max()) > 0
    torch.testing.assert_close(zero_3, 3 * zero_1)
    torch.testing.assert_close(moves[3.0][index][1:], moves[1.0][index][1:])


def test_ordered_cost_pushes_the_least_important_channel_hardest() -> None:
    model = _model_with_ranked_c3([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    moves, costs = {}, {}
    for strength in (0.0, 0.5):
        net = _searchable(model, seed=0, ordered_cost=strength)
        runner = SearchRunner(net, _data(16, seed=1), net.config)
        index = _c3_alpha(net)
        before = net.alphas[index].alpha.detach().clone()
        costs[strength] = float(net.cost().detach())
        runner.alpha_opt.zero_grad(set_to_none=True)
        (1000.0 * net.cost() * runner.cost_scale).backward()
        runner.alpha_opt.step()
        moves[strength] = (net.alphas[index].alpha.detach() - before)[W_PRECISIONS.index(8)]
    assert costs[0.5] == pytest.approx(costs[0.0], rel=1e-6)  # equal thetas: the same mean pressure
    plain, ordered = moves[0.0], moves[0.5]
    assert torch.allclose(plain, plain[0].expand_as(plain))  # plain: every channel the same step
    assert ordered.argmin() == 0 and ordered.argmax() == 5  # the weakest 8-bit logit falls fastest
    ranks = torch.argsort(torch.argsort(net.weight_scores()[index], stable=True)).float()
    torch.testing.assert_close(ordered, plain * (1 + 0.5 * (1 - 2 * ranks / 5)))


def test_options_are_exposed_and_validated() -> None:
    options = GradientStrategy.options
    assert "expected" in options["discretisation"].choices
    assert options["prune_init_score"].parse("taylor", "gradient") == "taylor"
    assert options["zero_logit_lr"].parse("2.5", "gradient") == 2.5
    with pytest.raises(ConfigError):
        options["prune_init_score"].parse("magic", "gradient")
    assert options["ordered_cost"].parse("0.5", "gradient") == 0.5
    for bad in ({"prune_init_score": "magic"}, {"zero_logit_lr": 0.0}, {"importance_batches": 0},
                {"ordered_cost": 1.0}):
        with pytest.raises(SearchConfigError):
            SearchConfig(**bad)  # type: ignore[arg-type]
