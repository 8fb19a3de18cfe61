"""Budget mode: drive lambda until the *discretised* plan meets a cost target.

Targets (``--target``) are parsed by :mod:`plugin.targets`: ``size=25%`` is relative to the same
model with every weight and activation at 8 bits and nothing pruned; ``size=40KB`` or
``mpic=1.2e6cycles`` are absolute, in a unit of the cost model. The controller serves every
strategy that steers a DNAS supernet (gradient, sequential).

Strategy (DESIGN "Lessons": one lambda that is a little too large collapses the model): approach
the budget from above. One search runs with lambda rising geometrically, ``lam_start *
lam_factor**round`` for ``epochs_per_round`` epochs per round, *warm-started*: optimisers, weights,
logits and temperature carry over, so the whole controller costs one search of the length it
needs, like the paper's lambda ramp, and each round starts from a plan just above the budget
instead of jumping to a large lambda from scratch. After every epoch the discretised plan's cost
is checked; the first plan that meets the budget is returned. A budget below the cheapest plan
the search can produce (one channel per prunable group, lowest bit-widths) fails before any
training, naming that smallest reachable value.

When the rounds run out above a reachable budget (a short search: plain-SGD logit steps are
proportional to the cost a column stands for, so the channels of small columns barely move;
PP-OCRv4 rec at 2 steps per epoch kept its 6625-class classifier, 30% of its weights, at 8 bits
through lambda 1.6e5), :func:`complete_to_budget` projects the search's last logits onto the
budget (each kept channel's width chosen against mu times its cost, the smallest such mu by
bisection; the pruning is the search's) and says so in a warning and in the plan's metadata
(``budget_completion``). Only when even every kept channel at its narrowest width misses the
budget does the controller fail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graph_passes.errors import CostModelError
from plugin.engine.config import SearchConfig, SearchConfigError
from plugin.engine.supernet import SearchRunner
from plugin.plan import CompressionPlan
from plugin.targets import Budget, format_cost, parse_target

if TYPE_CHECKING:
    from plugin.engine.supernet import Supernet

logger = logging.getLogger(__name__)

@dataclass
class BudgetConfig:
    """lambda schedule of the controller (lambda is relative to the 8-bit cost, see search.py)."""

    lam_start: float = 10.0
    lam_factor: float = 2.0
    epochs_per_round: int = 1
    max_rounds: int = 15
    check_every: int = 5

    def __post_init__(self) -> None:
        if not (self.lam_start > 0 and self.lam_factor > 1 and self.epochs_per_round >= 1 and self.max_rounds >= 1):
            raise SearchConfigError("budget controller needs lam_start > 0, lam_factor > 1, epochs_per_round >= 1 "
                                    f"and max_rounds >= 1; got {self}")


@dataclass
class BudgetResult:
    plan: CompressionPlan
    budget: Budget
    target: float
    lam: float
    epochs: int
    trace: list[dict[str, float]] = field(default_factory=list)


def check_reachable(searchable: Supernet, budget: Budget) -> float:
    """The absolute target; CostModelError (with the smallest reachable value) if unreachable."""
    name = budget.cost_model
    before = searchable.cost_before(name)
    target = budget.absolute(before)
    smallest = searchable.cost_of_plan(searchable.minimal_plan([name]), name)
    if target < smallest * (1 - 1e-9):
        raise CostModelError(
            f"budget {budget.text!r} ({format_cost(name, target)}) cannot be met: the smallest reachable "
            f"{name} cost is {format_cost(name, smallest)} ({smallest / before:.4f} of the 8-bit model: one "
            f"channel per prunable group at the lowest bit-width); set the budget to at least that")
    return target


def search_to_budget(searchable: Supernet, data: Any, target: str | Budget,
                     config: SearchConfig | None = None, budget_config: BudgetConfig | None = None) -> BudgetResult:
    """Raise lambda (warm start) until the discretised plan meets ``target``; see the module doc."""
    budget = parse_target(target) if isinstance(target, str) else target
    config = config or searchable.config
    controller = budget_config or BudgetConfig()
    absolute = check_reachable(searchable, budget)
    name = budget.cost_model
    runner = SearchRunner(searchable, data, config)
    trace: list[dict[str, float]] = []
    lam = 0.0
    if _plan_cost(searchable, name) <= absolute:
        if not config.budget_settle or absolute >= searchable.cost_before(name):
            logger.info("budget %s already met by the starting plan", budget.text)
            return _result(searchable, runner, budget, absolute, lam, trace)
        return _settled_result(searchable, runner, budget, name, absolute, lam, controller, trace)
    def check() -> bool:
        cost = _plan_cost(searchable, name)
        trace.append({"epoch": float(len(runner.history) + 1), "lambda": lam, "plan_cost": cost})
        return cost <= absolute

    for round_index in range(controller.max_rounds):
        lam = controller.lam_start * controller.lam_factor ** round_index
        past = len(runner.history) + 1 - config.epochs  # rounds past --epochs (this one included)
        if config.logit_steps == "adam" and past > 0:
            # Adam's step is about its learning rate whatever lambda is: past --epochs its rate
            # grows as lambda does, so a short search can still reach the budget
            runner.set_logit_lr(config.alpha_lr * controller.lam_factor ** past)
        for _ in range(controller.epochs_per_round):
            stats = runner.run_epoch(lam, check, controller.check_every)
            logger.info("budget round %d, epoch %d: lambda %.3g, plan %s (target %s)", round_index + 1,
                        stats.epoch, lam, format_cost(name, trace[-1]["plan_cost"]) if trace else "-",
                        format_cost(name, absolute))
            # check again: the epoch's end lowered the temperature, which moves theta and so the
            # plan (an ``expected`` plan met inside the epoch can be above the budget after it)
            if check():
                if config.budget_settle and len(runner.history) < config.epochs:
                    return _settled_result(searchable, runner, budget, name, absolute, lam, controller, trace)
                threshold = _loosest_threshold(searchable, name, absolute)
                return _result(searchable, runner, budget, absolute, lam, trace, threshold)
    best = min((t["plan_cost"] for t in trace), default=float("nan"))
    completed = complete_to_budget(searchable, name, absolute)
    if completed is not None:
        mu, lowered, cost = completed
        logger.warning("budget %s not met by the search after %d rounds (lambda up to %.3g, cheapest plan %s); "
                       "%d channels were lowered to narrower widths in the order of the search's own logits "
                       "(mu %.3g) to meet it (%s); a longer search (more epochs) makes these choices on the data",
                       budget.text, controller.max_rounds, lam, format_cost(name, best), lowered, mu,
                       format_cost(name, cost))
        last = trace[-1]["plan_cost"] if trace else _plan_cost(searchable, name)
        return _result(searchable, runner, budget, absolute, lam, trace, completion=(mu, lowered, last))
    raise CostModelError(
        f"budget {budget.text!r} ({format_cost(name, absolute)}) not met after {controller.max_rounds} rounds "
        f"(lambda up to {lam:.3g}); the cheapest plan reached {format_cost(name, best)}, and with every kept "
        "channel at its narrowest width it stays above the budget; raise max_rounds or lam_factor, or relax "
        "the budget")


def _settle(runner: SearchRunner, searchable: Supernet, name: str, absolute: float, lam: float,
            controller: BudgetConfig, trace: list[dict[str, float]]) -> float:
    """``budget_settle``: search the rest of ``config.epochs`` with lambda steered by the
    discretised plan's cost. Every ``check_every`` steps ``lam *= clip((cost / target) ** 2,
    1/2, 2)``: above the budget it rises, below it falls so bits can come back (a fixed lambda
    that met the budget overshoots: the logits' momentum carries on, digits 12% ended at 0.01 of
    W8 and chance accuracy). The logits' momentum is reset when settling starts; the temperature
    is annealed geometrically to ``settle_temperature`` when one is set. Returns the last lambda."""
    config = runner.config
    remaining = config.epochs - len(runner.history)
    start_t, final_t = runner.temperature, config.settle_temperature
    state = {"lam": lam if lam > 0 else controller.lam_start, "steps": 0}
    logger.info("budget met after %d epochs; settling for %d more (lambda %.3g%s)", len(runner.history), remaining,
                state["lam"], f", temperature {start_t:.3g} -> {final_t:.3g}" if final_t is not None else "")
    runner.reset_logit_momentum()

    def steer() -> float:
        if state["steps"] and state["steps"] % controller.check_every == 0:
            cost = _plan_cost(searchable, name)
            trace.append({"epoch": float(len(runner.history) + 1), "step": float(state["steps"]),
                          "lambda": state["lam"], "plan_cost": cost, "settle": 1.0})
            state["lam"] *= min(2.0, max(0.5, (cost / absolute) ** 2))
        state["steps"] += 1
        return state["lam"]

    for k in range(remaining):
        if final_t is not None:
            runner.set_temperature(start_t * (final_t / start_t) ** ((k + 1) / remaining))
        stats = runner.run_epoch(steer)
        logger.info("settle epoch %d: lambda %.3g, plan %s (target %s)", stats.epoch, state["lam"],
                    format_cost(name, _plan_cost(searchable, name)), format_cost(name, absolute))
    return float(state["lam"])


def _settled_result(searchable: Supernet, runner: SearchRunner, budget: Budget, name: str, absolute: float,
                    lam: float, controller: BudgetConfig, trace: list[dict[str, float]]) -> BudgetResult:
    """Settle (:func:`_settle`), then the plan: the loosest threshold that meets the budget, or,
    when the last plan is above it, the search's logits projected onto it."""
    lam = _settle(runner, searchable, name, absolute, lam, controller, trace)
    cost = _plan_cost(searchable, name)
    if cost > absolute:
        completed = complete_to_budget(searchable, name, absolute)
        if completed is not None:
            mu, lowered, _ = completed
            logger.info("settled plan above the budget: %d channels lowered to meet it (mu %.3g)", lowered, mu)
            return _result(searchable, runner, budget, absolute, lam, trace, completion=(mu, lowered, cost))
        raise CostModelError(
            f"budget {budget.text!r} ({format_cost(name, absolute)}) not met: the settled plan costs "
            f"{format_cost(name, cost)}, and with every kept channel at its narrowest width it stays above the "
            "budget; relax the budget or search without settle")
    return _result(searchable, runner, budget, absolute, lam, trace, _loosest_threshold(searchable, name, absolute))


def _column_costs(searchable: Supernet, name: str) -> tuple[list, float]:
    """Per alpha the cost each column stands for (``Supernet.column_costs``), and their
    cost-weighted mean (0 when nothing costs anything)."""
    costs = [c.detach().cpu() for c in searchable.column_costs(name)]
    flat = [float(v) for c in costs for v in c.tolist() if v > 0]
    return costs, (sum(v * v for v in flat) / sum(flat) if flat else 0.0)


def _completed_bits(searchable: Supernet, mu: float, column_costs: list, ref: float) -> list:
    """The discrete column bits (frozen layers as frozen) with every kept column at the width
    maximising ``log theta_j - mu * (C_c / ref) * b_j / b_max`` over its non-zero widths; mu = 0
    is the discretisation's own choice, a larger mu a narrower width (never a wider one)."""
    import torch

    column_bits = searchable._column_bits_argmax(0.5)
    for bits, alpha, theta, cost in zip(column_bits, searchable.alphas, searchable.thetas(), column_costs):
        precisions = torch.tensor(alpha.precisions, dtype=torch.float64)
        widths = precisions > 0
        if mu <= 0 or int(widths.sum()) < 2:
            continue
        logp = torch.log(theta.detach().cpu().double().clamp_min(0))  # forbidden widths: -inf
        penalty = mu * (cost.double() / ref)[None, :] * (precisions / precisions.max())[:, None]
        score = torch.where(widths[:, None], logp - penalty, torch.full_like(logp, -torch.inf))
        choice = precisions[score.argmax(dim=0)].to(bits.dtype)
        kept = (bits != 0) & torch.isfinite(score.max(dim=0).values)  # a column with no allowed width keeps its own
        bits[kept] = torch.minimum(bits[kept], choice[kept])
    for entry in searchable._layers.values():
        if entry.quantizer.frozen_bits is not None:
            bits = column_bits[entry.info.alpha_index]
            bits[torch.as_tensor(entry.info.columns)] = entry.quantizer.frozen_bits.cpu().to(bits.dtype)
    return column_bits


def _completed_plan(searchable: Supernet, mu: float, column_costs: list, ref: float,
                    metadata: dict[str, Any] | None = None, with_scales: bool = False) -> CompressionPlan:
    site_bits = {s.tensor: s.quantizer.frozen_bits or s.quantizer.argmax_bits() for s in searchable.sites.values()}
    return searchable._plan_from_column_bits(_completed_bits(searchable, mu, column_costs, ref), site_bits,
                                             metadata, with_scales)


def complete_to_budget(searchable: Supernet, name: str, absolute: float, steps: int = 24
                       ) -> tuple[float, int, float] | None:
    """When the search ran out of rounds above the budget: the smallest mu whose completed plan
    (:func:`_completed_bits`: the search's discretised plan, its pruning kept, each kept channel's
    width chosen by its logits against mu times the cost it stands for) meets ``absolute``.

    A Lagrangian projection of the search's last logits: per channel the chosen width only
    narrows as mu grows, so the plan cost falls monotonically and a bisection finds the loosest
    mu. It helps where plain-SGD logit steps, proportional to the cost each column stands for,
    left the channels of small columns at 8 bits (PP-OCRv4 rec, 2 steps per epoch: its
    6625-class classifier, 120 weights per channel, 30% of the model's weights, never moved).
    Returns ``(mu, channels lowered, cost)``, or None when even mu -> inf (every kept channel at
    its narrowest width) misses the budget."""
    costs, ref = _column_costs(searchable, name)
    if ref <= 0:
        return None

    def cost_at(mu: float) -> float:
        return searchable.cost_of_plan(_completed_plan(searchable, mu, costs, ref), name)

    hi = 1.0
    while cost_at(hi) > absolute:
        hi *= 4.0
        if hi > 1e12:
            return None
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if cost_at(mid) <= absolute:
            hi = mid
        else:
            lo = mid
    before = _completed_bits(searchable, 0.0, costs, ref)
    after = _completed_bits(searchable, hi, costs, ref)
    lowered = int(sum(int((a != b).sum()) for a, b in zip(after, before)))
    return hi, lowered, cost_at(hi)


def _plan_cost(searchable: Supernet, name: str, threshold: float = 0.5) -> float:
    plan = searchable.discretise(cost_models=[], prune_threshold=threshold, with_scales=False)
    return searchable.cost_of_plan(plan, name)


def _loosest_threshold(searchable: Supernet, name: str, absolute: float) -> float:
    """The largest prune threshold (>= 0.5) whose plan still meets the budget.

    A whole group's columns tend to cross theta_0 = 1/2 together, so the first plan under the
    budget can undershoot it by a lot (a residual group pruned to one channel). Raising the
    threshold restores the columns with the smallest theta_0 first; the plan cost only grows
    with the threshold, so a binary search over the candidate values finds the loosest one.
    With ``discretisation="expected"`` a threshold t prunes ``round(2 (1 - t) sum theta_0)``
    channels per group (t = 1: none), searched over a grid of 64 steps.
    """
    if searchable.config.discretisation == "expected":  # t prunes round(2 (1 - t) sum theta_0) per group
        candidates = [0.5 + 0.5 * k / 64 for k in range(1, 65)]
    else:
        candidates = sorted({p for p in searchable.prune_probabilities() if p > 0.5})
    lo, hi, best = 0, len(candidates) - 1, 0.5
    while lo <= hi:
        mid = (lo + hi) // 2
        if _plan_cost(searchable, name, candidates[mid]) <= absolute:
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _result(searchable: Supernet, runner: SearchRunner, budget: Budget, absolute: float, lam: float,
            trace: list[dict[str, float]], threshold: float = 0.5,
            completion: tuple[float, int, float] | None = None) -> BudgetResult:
    extra: dict[str, Any] = {"budget": budget.text, "budget_absolute": float(absolute), "lambda": float(lam),
                             "prune_threshold": float(threshold)}
    if completion is None:
        metadata = runner.metadata(**extra)
        plan = searchable.discretise(metadata=metadata, prune_threshold=threshold)
    else:  # the search ended above the budget: its logits projected onto it (complete_to_budget)
        mu, lowered, searched = completion
        extra["budget_completion"] = {"mu": float(mu), "channels_lowered": lowered, "searched_cost": float(searched)}
        metadata = runner.metadata(**extra)
        costs, ref = _column_costs(searchable, budget.cost_model)
        plan = _completed_plan(searchable, mu, costs, ref, metadata, with_scales=True)
        plan = searchable.space.with_costs(plan, None)
    logger.info("budget %s met: %s", budget.text, searchable.describe_plan(plan, budget.cost_model))
    _warn_if_loose(searchable, plan, budget, absolute)
    return BudgetResult(plan, budget, absolute, lam, len(runner.history), trace)


#: below this share of the budget, a met budget is reported as one with room to spare
LOOSE_BUDGET_SHARE = 0.75


def _warn_if_loose(searchable: Supernet, plan: CompressionPlan, budget: Budget, absolute: float) -> None:
    """Say so when the plan uses less than ``LOOSE_BUDGET_SHARE`` of the budget: a user who asked
    for ``size=80%`` should know the search stopped far below it (at loose budgets the budget
    recipe's 4-bit start already meets them and settling does not widen channels; README,
    benchmarks/results/fp32-accuracy-cpu)."""
    if absolute <= 0:
        return
    cost = searchable.cost_of_plan(plan, budget.cost_model)
    if cost < LOOSE_BUDGET_SHARE * absolute:
        logger.warning("budget %s met with room to spare: the plan costs %s, %.0f%% of the budget (%s); the "
                       "search did not keep or widen channels to use the rest", budget.text,
                       format_cost(budget.cost_model, cost), 100 * cost / absolute,
                       format_cost(budget.cost_model, absolute))
