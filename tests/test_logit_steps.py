"""``SearchConfig.logit_steps``: how the architecture logits step (plugin/engine/supernet.py).

On a tiny model with a wide group (two convs tied by a residual Add plus a depthwise conv: 108
weights per channel) and a narrow one (a 1x1 conv: 8 weights per channel; inputs from the wide
group counted at their initial keep probability), one step on the cost
alone moves a wide column ~14x as far as a narrow one under plain SGD, the same distance under
``sgd_per_cost``, and ``alpha_lr`` under Adam.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from plugin.engine.config import SearchConfig, SearchConfigError
from plugin.engine.supernet import SearchRunner, Supernet, run_search
from tests.test_searchable import _data as _searchable_data, _searchable, _tiny_model

# the model of tests/test_searchable.py: c1, c2 (tied by the Add) and the depthwise dw form one
# group of 8; c3 one of 6; the Gemm reaches the graph output (unprunable).
# weights per channel of the c1 + c2 + dw group and of c3, their inputs from the group counted
# at the initial keep probability 1 - theta_0 (softmax of (0, 2, 4, 8) / 8)
KEEP = 1 - 1 / sum(np.exp(b / 8) for b in (0, 2, 4, 8))
WIDE = 3 * 9 + 8 * 9 * KEEP + 9
NARROW = 8 * KEEP


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return _tiny_model(0)


def _net(model: onnx.ModelProto, **config: object) -> Supernet:
    return _searchable(model, seed=0, **config)


def _data() -> list[tuple[torch.Tensor]]:
    return _searchable_data(16, seed=1)


def _alpha_of(net: Supernet, weight: str):
    entry = next(e for e in net._layers.values() if e.info.layer.weight == weight)
    return entry.quantizer.alpha, entry.info.columns


def _cost_step(net: Supernet, runner: SearchRunner) -> dict[str, torch.Tensor]:
    """The change of every column's 8-bit logit after one logit step on the normalised cost."""
    before = {w: _alpha_of(net, w)[0].alpha.detach().clone() for w in ("w1", "w3")}
    runner.alpha_opt.zero_grad(set_to_none=True)
    (1000.0 * net.cost() * runner.cost_scale).backward()
    runner.alpha_opt.step()
    out = {}
    for w, old in before.items():
        alpha, columns = _alpha_of(net, w)
        eight = alpha.precisions.index(8)
        out[w] = (alpha.alpha.detach() - old)[eight, sorted(set(columns))]
    return out


def test_column_costs_are_the_weight_bits_each_column_stands_for(model: onnx.ModelProto) -> None:
    net = _net(model)
    costs = net.column_costs("size")
    wide_alpha, wide_cols = _alpha_of(net, "w1")
    narrow_alpha, narrow_cols = _alpha_of(net, "w3")
    index = {id(a.alpha): i for i, a in enumerate(net.alphas)}
    assert torch.allclose(costs[index[id(wide_alpha.alpha)]][wide_cols], torch.full((8,), 8.0 * WIDE))
    assert torch.allclose(costs[index[id(narrow_alpha.alpha)]][narrow_cols], torch.full((6,), 8.0 * NARROW))
    scales = net.logit_step_scales("size")
    wide = scales[id(wide_alpha.alpha)][0, wide_cols]
    narrow = scales[id(narrow_alpha.alpha)][0, narrow_cols]
    assert torch.allclose(narrow / wide[0], torch.full((6,), WIDE / NARROW))
    assert torch.allclose(wide, wide[0].expand(8))
    # lambda keeps its meaning: sum_c s_c C_c^2 == sum_c C_c^2 over every weight column
    flat_costs = torch.cat(costs)
    flat_scales = torch.cat([scales[id(a.alpha)][0] for a in net.alphas])
    assert float((flat_scales * flat_costs**2).sum()) == pytest.approx(float((flat_costs**2).sum()), rel=1e-5)


def test_plain_sgd_moves_a_wide_column_further(model: onnx.ModelProto) -> None:
    net = _net(model, logit_steps="sgd")
    step = _cost_step(net, SearchRunner(net, _data(), net.config))
    assert bool((step["w1"] < 0).all()) and bool((step["w3"] < 0).all())  # cost pushes 8 bits down
    ratio = step["w1"].abs().mean() / step["w3"].abs().mean()
    assert float(ratio) == pytest.approx(WIDE / NARROW, rel=1e-4)


def test_sgd_per_cost_moves_wide_and_narrow_columns_alike(model: onnx.ModelProto) -> None:
    net = _net(model, logit_steps="sgd_per_cost")
    step = _cost_step(net, SearchRunner(net, _data(), net.config))
    assert bool((step["w1"] < 0).all())
    assert torch.allclose(step["w1"], torch.full_like(step["w1"], float(step["w3"][0])), rtol=1e-4)
    assert torch.allclose(step["w3"], step["w3"][0].expand_as(step["w3"]), rtol=1e-4)


def test_adam_steps_every_logit_by_the_learning_rate(model: onnx.ModelProto) -> None:
    net = _net(model, logit_steps="adam", alpha_lr=0.01)
    runner = SearchRunner(net, _data(), net.config)
    assert isinstance(runner.alpha_opt, torch.optim.Adam)
    assert runner.alpha_opt.defaults["fused"] and runner.weight_opt.defaults["fused"]  # plugin.engine.optimisers
    step = _cost_step(net, runner)
    for value in step.values():
        assert torch.allclose(value, torch.full_like(value, -0.01), rtol=1e-3)


def test_search_runs_with_each_logit_step(model: onnx.ModelProto) -> None:
    for steps in ("sgd_per_cost", "adam"):
        net = _net(model, logit_steps=steps, epochs=2, lam=50.0)
        plan = run_search(net, _data(), net.config)
        assert plan.cost_after["size"] <= plan.cost_before["size"]
        assert all(torch.isfinite(a.alpha).all() for a in net.alphas)


def test_unknown_logit_steps_is_a_config_error() -> None:
    with pytest.raises(SearchConfigError, match="logit_steps"):
        SearchConfig(logit_steps="rmsprop")


def test_gradient_strategy_option_reaches_logit_steps_and_refuses_unknown_values():
    from graph_passes.errors import ConfigError
    from plugin.strategies.gradient import GradientStrategy

    option = GradientStrategy.options["logit_steps"]
    assert option.parse("sgd_per_cost", "gradient") == "sgd_per_cost"
    with pytest.raises(ConfigError, match="sgd \\| sgd_per_cost \\| adam"):
        option.parse("bogus", "gradient")
    with pytest.raises(ConfigError, match="keep_first \\| argmax"):
        GradientStrategy.options["discretisation"].parse("median", "gradient")
