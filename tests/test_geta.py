"""``--strategy geta``: the learned-step quantizer, the bit-range projection, the forget-rate
schedule, the K selection, the flags, and a short compress that meets its targets exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from graph_passes.errors import ConfigError
from plugin import api
from plugin.cli.compress import check_flags
from plugin.engine.geta import (
    GetaWeightQuantizer,
    QassoSchedule,
    bits_of,
    forget_rate,
    geta_quantize,
    project_step,
    saliency_scores,
    select_redundant,
    snap_bits,
    split_counts,
    step_for_bits,
    upper_bound,
)
from plugin.engine.quantizers import quantize_weight_per_channel
from plugin.strategies.geta import parse_bits, parse_sparsity

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "samples" / "digits" / "model.onnx")
TRAIN = str(REPO / "samples" / "digits" / "train.npz")

# ----------------------------------------------------------------------------- quantizer


def test_step_and_bits_are_inverse() -> None:
    for bits in (2, 3, 4, 6.5, 8):
        for q_m, t in ((0.3, 1.0), (2.0, 0.7), (1.0, 1.6)):
            assert float(bits_of(step_for_bits(bits, q_m, t), q_m, t)) == pytest.approx(bits, abs=1e-9)


def test_quantizer_at_t1_is_the_export_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 3, 3, 3)
    for bits in (2, 4, 8):
        q_m = w.abs().max()
        d = step_for_bits(bits, q_m, 1.0).float()
        ours = geta_quantize(w, d, q_m, torch.tensor(1.0))
        export = quantize_weight_per_channel(w, bits).y
        torch.testing.assert_close(ours, export)
        assert len(torch.unique(ours)) <= 2 ** bits - 1


def test_quantizer_gradients() -> None:
    w = torch.tensor([-1.5, -0.4, 0.0, 0.2, 0.9, 2.0], requires_grad=True)
    d = torch.tensor(0.3, requires_grad=True)
    q_m = torch.tensor(1.0, requires_grad=True)
    t = torch.tensor(1.0, requires_grad=True)
    y = geta_quantize(w, d, q_m, t)
    assert float(y.detach().abs().max()) <= float(d.detach() * torch.round(1.0 / d.detach())) + 1e-6  # clipped at q_m
    y.sum().backward()
    # straight-through inside the range, zero outside it
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # dy/dd = sign(w) (round(p/d) - p/d), summed
    p = torch.minimum(w.detach().abs(), torch.tensor(1.0))
    expected_d = (torch.sign(w.detach()) * (torch.round(p / 0.3) - p / 0.3)).sum()
    assert float(d.grad) == pytest.approx(float(expected_d), abs=1e-6)
    # dy/dq_m = sign(w) t q_m^(t-1) where |w| >= q_m: -1 + 1
    assert float(q_m.grad) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(float(t.grad))


# ----------------------------------------------------------------------------- projection


@pytest.mark.parametrize("lo,hi", [(2, 8), (4, 8), (2, 4), (8, 8)])
def test_projection_keeps_bits_in_range(lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(1)
    d = torch.rand(500, generator=gen, dtype=torch.float64) * 3 + 1e-6
    q_m = torch.rand(500, generator=gen, dtype=torch.float64) * 2 + 0.01
    t = torch.rand(500, generator=gen, dtype=torch.float64) + 0.5
    bits = bits_of(project_step(d, q_m, t, lo, hi), q_m, t)
    assert float(bits.min()) >= lo - 1e-9 and float(bits.max()) <= hi + 1e-9
    inside = (bits_of(d, q_m, t) > lo) & (bits_of(d, q_m, t) < hi)
    assert torch.equal(project_step(d, q_m, t, lo, hi)[inside], d[inside])  # a feasible d is not moved


def test_projection_under_the_lowered_upper_bound() -> None:
    """The quantizer's own projection, step by step through the projection periods, while its d is
    pushed both ways: its bit-width never leaves [lo, upper bound of the period]."""
    q = GetaWeightQuantizer(4, q_m=0.8, bits=8)
    gen = torch.Generator().manual_seed(2)
    seen = []
    for period in range(5):
        hi_now = upper_bound(8, 2, 2, period)
        for _ in range(20):
            with torch.no_grad():
                q.d.mul_(float(torch.exp(torch.randn((), generator=gen) * 2)))
                q.t.add_(float(torch.randn((), generator=gen)) * 0.3)
                q.q_m.mul_(float(torch.exp(torch.randn((), generator=gen) * 0.3)))
            q.project(2, hi_now)
            b = q.bits()
            assert 2 - 1e-6 <= b <= hi_now + 1e-6
            assert 0.5 <= float(q.t.detach()) <= 2.0
            seen.append(hi_now)
    assert sorted(set(seen), reverse=True) == [8, 6, 4, 2]


def test_upper_bound_schedule() -> None:
    assert [upper_bound(8, 2, 2, p) for p in range(5)] == [8, 6, 4, 2, 2]
    assert [upper_bound(8, 4, 2, p) for p in range(4)] == [8, 6, 4, 4]
    assert [upper_bound(4, 4, 2, p) for p in range(2)] == [4, 4]


def test_snap_bits_rounds_then_up_to_an_exportable_width() -> None:
    widths = (2, 4, 8)
    assert [snap_bits(b, widths) for b in (2.0, 2.4, 2.6, 3.0, 4.0, 4.4, 4.6, 7.9)] == [2, 2, 4, 4, 4, 4, 8, 8]
    assert snap_bits(2.0, (4, 8)) == 4 and snap_bits(8.0, (4,)) == 4


# ----------------------------------------------------------------------------- forget rate


def test_forget_rate_schedule_reaches_zero_at_the_period_end() -> None:
    period = 7
    rates = [forget_rate(t, period, cosine=0.3) for t in range(period)]
    assert rates == pytest.approx([1 / (period - t) for t in range(period)])
    remaining = 1.0
    for t, gamma in enumerate(rates):
        remaining *= 1 - gamma
        assert remaining == pytest.approx((period - t - 1) / period)  # linear decay of the group
    assert remaining == 0.0


def test_forget_rate_negative_cosine_and_zero_group() -> None:
    slow = forget_rate(0, 10, cosine=-0.5, lr=1e-3, grad_norm=2.0, x_norm=1.0)
    assert slow == pytest.approx(0.001 * 1e-3 * 2.0 / 0.5)
    assert 0.0 <= forget_rate(0, 10, cosine=-1e-12, lr=10.0, grad_norm=1e9, x_norm=1.0) <= 1.0
    assert forget_rate(3, 10, cosine=0.5, x_norm=0.0) == 0.0
    assert forget_rate(3, 10, cosine=float("nan")) == 0.0


# ----------------------------------------------------------------------------- K selection


def test_split_counts_sum_exactly() -> None:
    for total in (0, 1, 7, 43, 100):
        for periods in (1, 3, 4, 10):
            counts = split_counts(total, periods)
            assert len(counts) == periods and sum(counts) == total and min(counts) >= 0
    assert split_counts(43, 4) == [10, 10, 10, 13]


def test_select_takes_exactly_k_lowest_globally() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3, 0.05, math.inf])
    group_of = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    room = torch.tensor([2, 1, 1])
    assert sorted(select_redundant(scores, 3, group_of, room)) == [1, 3, 5]
    # group 1 has room for one: its second-lowest (0.3) is skipped for the next lowest elsewhere
    assert sorted(select_redundant(scores, 4, group_of, room)) == [0, 1, 3, 5]
    with pytest.raises(ValueError, match="only 4 of 5"):
        select_redundant(scores, 5, group_of, room)  # index 6 is no candidate (inf), groups are full
    assert select_redundant(scores, 0, group_of, room) == []


def test_saliency_orders_small_and_useless_channels_first() -> None:
    sq_x = torch.tensor([4.0, 0.01, 1.0], dtype=torch.float64)
    dot = torch.tensor([-1.0, 0.001, -0.2], dtype=torch.float64)
    sq_g = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    numel = torch.tensor([9.0, 9.0, 9.0], dtype=torch.float64)
    scores = saliency_scores(sq_x, dot, sq_g, numel)
    assert torch.argsort(scores).tolist() == [1, 2, 0]
    assert float(scores.max()) <= 1.0 + 1e-9


def test_schedule_split_covers_every_step() -> None:
    s = QassoSchedule.split(224)
    assert (s.warmup, s.projection, s.joint) == (32, 64, 128)
    stages = [s.stage(i) for i in range(s.total)]
    assert stages.count("warmup") == 32 and stages.count("projection") == 64
    periods = [s.pruning_period(i) for i in range(96, 224)]
    assert [p for p, t, _ in periods if t == 0] == [0, 1, 2, 3]
    assert all(t < length for _, t, length in periods)
    assert [s.projection_period(i) for i in (0, 32, 53, 54, 95, 200)] == [0, 0, 0, 1, 2, 2]
    tiny = QassoSchedule.split(3, pruning_periods=4)
    assert tiny.joint >= tiny.pruning_periods


# ----------------------------------------------------------------------------- flags


def test_parse_flags() -> None:
    assert parse_bits("2-8") == (2, 8) and parse_bits("4") == (4, 4) and parse_bits(" 4-8 ") == (4, 8)
    for bad, needle in (("3-8", "3 bit"), ("1-8", "1 bit"), ("8-4", "low end is above"), ("2-16", "16 bit"),
                        ("two", "LO-HI"), ("-8", "LO-HI")):
        with pytest.raises(ConfigError, match=needle):
            parse_bits(bad)
    assert parse_sparsity("0") == 0.0 and parse_sparsity(0.5) == 0.5
    for bad in ("1", "1.5", "-0.1", "nan", "half"):
        with pytest.raises(ConfigError, match="--sparsity"):
            parse_sparsity(bad)


def _flags(**given):
    base = dict(cost="size", target=None, weight_bits=None, act_bits=None, strategy="geta", strategy_options=(),
                input_shapes=(), output=None)
    base.update(given)
    return check_flags(**base)


def test_check_flags_maps_the_targets() -> None:
    settings = _flags(sparsity=0.25, bits="4-8")
    assert settings["strategy_options"] == {"sparsity": "0.25", "bits": "4-8"}
    assert settings["weight_precisions"] == (0, 4, 8)
    assert "weight_precisions" not in _flags(sparsity=0.1)
    with pytest.raises(ConfigError, match="only --strategy geta"):
        _flags(strategy="gradient", bits="2-8")
    with pytest.raises(ConfigError, match="--bits and --weight-bits"):
        _flags(bits="2-8", weight_bits="0,8")
    with pytest.raises(ConfigError, match="give one of them"):
        _flags(sparsity=0.2, strategy_options=("sparsity=0.3",))
    with pytest.raises(ConfigError, match="-S sparsity"):
        _flags(strategy_options=("sparsity=2",))


@pytest.mark.parametrize("args,needle", [(["--bits", "3-8"], "3 bit(s) cannot be exported"),
                                         (["--bits", "8-4"], "low end is above"),
                                         (["--sparsity", "1"], "must be in [0, 1)"),
                                         (["--strategy", "uniform", "--sparsity", "0.3"], "only --strategy geta")])
def test_cli_refuses_bad_targets_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    from click.testing import CliRunner

    from plugin.cli import main

    out = tmp_path / "x.onnx"
    base = ["compress", DIGITS, "--data", TRAIN, "-o", str(out), "--no-progress"]
    if "--strategy" not in args:
        base += ["--strategy", "geta"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 14, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- end to end


def test_refuses_a_sparsity_that_would_empty_a_group(tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    config = api.CompressConfig(strategy="geta", strategy_options={"sparsity": 0.99}, epochs=1, finetune_epochs=0,
                                max_steps_per_epoch=1, progress=False)
    with pytest.raises(ConfigError, match=r"at most 140 can go; use --sparsity 0\.972 or less"):
        api.compress(DIGITS, TRAIN, output=str(out), config=config)
    assert list(tmp_path.iterdir()) == []


def test_short_run_meets_the_targets_exactly(tmp_path: Path) -> None:
    out = tmp_path / "g.onnx"
    config = api.CompressConfig(strategy="geta", strategy_options={"sparsity": 0.3, "bits": "4-8"},
                                weight_precisions=(0, 4, 8), epochs=4, finetune_epochs=1, max_steps_per_epoch=4,
                                progress=False)
    result = api.compress(DIGITS, TRAIN, output=str(out), config=config)
    plan = result.plan
    prunable = [g for g in plan.groups.values() if g.size in (16, 32, 64)]  # digits: g0-g3 prunable, g4 = logits
    total = sum(g.size for g in prunable)
    removed = sum(len(g.pruned) for g in plan.groups.values())
    assert total == 144 and removed == round(0.3 * 144)
    assert all(len(g.kept) >= 1 for g in plan.groups.values())
    widths = {b for layer in plan.layers.values() for b in layer.bits if b}
    assert widths <= {4, 8}
    summary = plan.metadata["geta"]
    assert summary["removed"] == removed and summary["epochs"] == {"qasso": 3, "cooldown": 1}
    assert all(4 - 1e-6 <= b <= 8 + 1e-6 for b in summary["learned_bits"].values())
    assert out.exists() and (tmp_path / "g.report.json").exists()
    events = [h["event"] for h in result.report["history"] if "event" in h]
    assert events.count("select") == events.count("commit") == 4


def test_no_sparsity_one_width_and_no_cooldown(tmp_path: Path) -> None:
    """sparsity 0 and bits 8-8 in one epoch (no cool-down epoch: the plan is frozen directly)."""
    config = api.CompressConfig(strategy="geta", strategy_options={"sparsity": 0, "bits": "8-8"}, epochs=1,
                                finetune_epochs=0, max_steps_per_epoch=3, progress=False)
    plan = api.compress(DIGITS, TRAIN, config=config).plan
    assert all(len(g.kept) == g.size for g in plan.groups.values())
    assert {b for layer in plan.layers.values() for b in layer.bits} == {8}
    assert plan.metadata["geta"]["epochs"] == {"qasso": 1, "cooldown": 0}


def test_refuses_a_range_the_weight_widths_do_not_allow() -> None:
    config = api.CompressConfig(strategy="geta", strategy_options={"bits": "2-8"}, weight_precisions=(0, 8),
                                epochs=1, finetune_epochs=0, progress=False)
    with pytest.raises(ConfigError, match="needs weight widths 2,4,8"):
        api.compress(DIGITS, TRAIN, config=config)
