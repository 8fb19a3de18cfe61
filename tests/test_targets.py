"""Budgets (``--target``) are unambiguous: relative ones say ``%``, absolute ones carry a unit of
the cost model; the old bare-number forms are refused with a message showing the new one."""

from __future__ import annotations

import pytest

from cost_models import get_cost_model
from graph_passes.errors import CostModelError
from plugin.targets import Budget, default_target, format_cost, parse_target, unit_aliases


@pytest.mark.parametrize(
    ("text", "model", "value", "relative"),
    [
        ("size=25%", "size", 0.25, True),
        ("size=35 %", "size", 0.35, True),
        ("size=100%", "size", 1.0, True),
        ("mpic=50%", "mpic", 0.5, True),
        ("size=40KB", "size", 320_000, False),
        ("size = 40 kB", "size", 320_000, False),
        ("size=40000B", "size", 320_000, False),
        ("size=1KiB", "size", 8192, False),
        ("size=2MB", "size", 16e6, False),
        ("size=1MiB", "size", 8 * 1024 * 1024, False),
        ("size=320000bit", "size", 320_000, False),
        ("size=320kbit", "size", 320_000, False),
        ("mpic=1.2e6cycles", "mpic", 1.2e6, False),
        ("mpic=1.2Mcycles", "mpic", 1.2e6, False),
        ("ne16=3e5 cycles", "ne16", 3e5, False),
        ("mpic_energy=350uJ", "mpic_energy", 350, False),
        ("mpic_energy=0.35mJ", "mpic_energy", 350, False),
        ("mpic_energy=2J", "mpic_energy", 2e6, False),
        ("bops=2e9BOPs", "bops", 2e9, False),
        ("bops=2e9bit-op", "bops", 2e9, False),
    ],
)
def test_parse_target(text: str, model: str, value: float, relative: bool) -> None:
    budget = parse_target(text)
    assert (budget.cost_model, budget.relative, budget.text) == (model, relative, text)
    assert budget.value == pytest.approx(value)


def test_every_builtin_cost_model_accepts_its_declared_unit() -> None:
    for name in ("size", "bops", "mpic", "mpic_energy", "ne16"):
        unit = get_cost_model(name).unit
        assert unit in unit_aliases(unit)
        assert parse_target(f"{name}=1000{unit}").value == pytest.approx(1000)


def test_absolute_relative() -> None:
    assert Budget("size", 0.25, True, "size=25%").absolute(800.0) == pytest.approx(200.0)
    assert Budget("size", 320.0, False, "size=40B").absolute(800.0) == 320.0


def test_default_target_follows_the_cost_model() -> None:
    assert default_target("mpic") == "mpic=35%"
    budget = parse_target(default_target("mpic"))
    assert (budget.cost_model, budget.relative, budget.value) == ("mpic", True, pytest.approx(0.35))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("size=0.25", ["size=25%", "size=40KB", "fraction of the all-8-bit model", "absolute size"]),
        ("size=40000", ["size=40000B", "size=40KB", "size=35%"]),
        ("mpic=1.2e6", ["mpic=1.2e6cycles", "mpic=35%"]),
        ("mpic=0.5", ["mpic=50%", "mpic=1.2e6cycles"]),
        ("size=2x", ["size=35%", "size=2B"]),
        ("size=0.5x", ["size=50%"]),
    ],
)
def test_old_and_ambiguous_forms_show_the_new_one(text: str, shown: list[str]) -> None:
    with pytest.raises(CostModelError) as info:
        parse_target(text)
    message = str(info.value)
    assert text in message
    for needle in shown:
        assert needle in message, message
    assert info.value.exit_code == 11


@pytest.mark.parametrize("text", ["size", "size=", "=0.5", "size=abc", "size=-1", "size=0", "size=0%",
                                  "size=150%", "size=3parsec", "mpic=3KB", "size=40cycles", "size=0.5=1",
                                  "size=nan", "size=infKB", "size=40 K B", ""])
def test_parse_target_errors(text: str) -> None:
    with pytest.raises(CostModelError) as info:
        parse_target(text)
    assert text in str(info.value)


def test_unknown_cost_model_is_listed() -> None:
    with pytest.raises(CostModelError, match="nosuchmodel"):
        parse_target("nosuchmodel=35%")


def test_unknown_unit_lists_the_accepted_ones() -> None:
    with pytest.raises(CostModelError) as info:
        parse_target("mpic=3KB")
    assert "cycles" in str(info.value) and "mpic=1.2e6cycles" in str(info.value)


def test_format_cost() -> None:
    assert format_cost("size", 320_000) == "40.00 KB"
    assert format_cost("size", 800) == "100 B"
    assert format_cost("mpic", 1.2e6) == "1.2e+06 cycles"
