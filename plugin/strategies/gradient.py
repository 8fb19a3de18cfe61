"""``--strategy gradient`` (the default): the joint pruning + channel-wise mixed-precision DNAS
search of Motetti et al. (arXiv 2407.01054), at one lambda or steered to a ``--target`` budget.

Every weight channel gets logits over ``--weight-bits`` (0 = pruned) and every activation site
over ``--act-bits``; the loss is the task loss plus lambda times the expected cost. With a target
the budget controller (``plugin.budget``) raises lambda until the discretised plan meets it.

The ``recipe`` option sets the defaults of four others: under a budget (``auto``, the default)
``discretisation=expected``, ``settle``, ``start=4`` and Adam logit steps, the combination
measured best on three tasks over three seeds (README, "The gradient strategy's budget recipe");
with ``--lambda`` the paper's search (``keep_first``, no settle, the default start, SGD).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping

from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem

logger = logging.getLogger(__name__)

#: the default of the options a recipe sets: "take the recipe's value"
RECIPE = "recipe"

#: recipe -> the values of discretisation, settle, start and logit_steps. ``budget`` is the
#: combination measured best under a --target (benchmarks/results/budget-settle-cpu: 3 seeds,
#: 12 + 6 epochs; MNIST-1D size=7%: 92.80 +- 1.22% vs 80.61 +- 1.23% with expected alone, W2A8 QAT
#: 88.54%; shapes32 size=50% / 20%: 68.56 / 47.59% vs 47.93 / 23.36%; digits size=12%: 95.93 vs
#: 97.28%, size=7%: 87.04 vs 87.59%); ``paper`` the strategy's earlier defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "budget": {"discretisation": "expected", "settle": True, "start": "4", "logit_steps": "adam"},
    "paper": {"discretisation": "keep_first", "settle": False, "start": "default", "logit_steps": "sgd"},
}


def resolve_recipe(options: Mapping[str, Any], target: str | None) -> dict[str, Any]:
    """``options`` with every option left at ``recipe`` given the recipe's value (``auto``: the
    budget recipe with a --target, the paper's with --lambda)."""
    name = str(options.get("recipe", "auto"))
    if name == "auto":
        name = "budget" if target else "paper"
    resolved = dict(options)
    for key, value in RECIPES[name].items():
        if resolved.get(key, RECIPE) == RECIPE:
            resolved[key] = value
    resolved["recipe"] = name
    return resolved


class GradientStrategy:
    name: ClassVar[str] = "gradient"
    summary: ClassVar[str] = ("joint pruning + per-channel mixed precision by one gradient (DNAS) search "
                              "(Motetti et al. 2024); --lambda or --target")
    steerable: ClassVar[bool] = True
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "lambda_ramp": StrategyOption("lambda_ramp", bool, False,
                                      "ramp lambda from lambda/100 over the first half of the search"),
        "prune_init": StrategyOption("prune_init", float, 0.0,
                                     "start weak channels likelier to be pruned (0 = off, the paper's start)"),
        "recipe": StrategyOption("recipe", str, "auto",
                                 "the defaults of discretisation, settle, start and logit_steps: auto "
                                 "(budget with a --target or the default budget, paper with --lambda), "
                                 "budget (expected, settle, start=4, adam: measured best under a budget, "
                                 "README) or paper (keep_first, no settle, default start, sgd: the paper's "
                                 "search); an option given itself wins",
                                 choices=("auto", "budget", "paper")),
        "discretisation": StrategyOption("discretisation", str, RECIPE,
                                         "keep_first (prune when theta_0 > 1/2), expected (per group, "
                                         "round(sum theta_b) channels at each width) or argmax (the paper's); "
                                         "default: the recipe's",
                                         choices=("keep_first", "argmax", "expected")),
        "prune_init_score": StrategyOption("prune_init_score", str, "weight",
                                           "the score prune_init starts from: weight (norms) or taylor "
                                           "(|w dL/dw| per channel over a few batches, label-free)",
                                           choices=("weight", "taylor")),
        "zero_logit_lr": StrategyOption("zero_logit_lr", float, 1.0,
                                        "multiplier of the 0-bit (pruning) logits' learning rate"),
        "ordered_cost": StrategyOption("ordered_cost", float, 0.0,
                                       "in [0, 1): each channel's cost in the loss weighted by its importance "
                                       "rank in its group (the least important pushed hardest); 0 = off"),
        "settle": StrategyOption("settle", bool, RECIPE,
                                 "with --target: after the first plan that meets the budget, search the rest of "
                                 "--epochs with lambda steered to the budget (off: the unused epochs go to QAT); "
                                 "default: the recipe's"),
        "settle_temperature": StrategyOption("settle_temperature", float, 0.0,
                                             "with settle: anneal the temperature to this by the last epoch "
                                             "(0 = keep the usual decay)"),
        "start": StrategyOption("start", str, RECIPE,
                                "where the logits start: default (alpha_b = b / max b, the paper's), budget (near "
                                "the widest uniform width that meets --target) or a width such as 4; default: the "
                                "recipe's (budget recipe: 4 when searched, else default)",
                                ),
        "start_logit": StrategyOption("start_logit", float, 2.0,
                                      "with start: how far that width's logit is raised at the start"),
        "logit_steps": StrategyOption("logit_steps", str, RECIPE,
                                      "how the logits step: sgd (the paper's), sgd_per_cost (each channel's "
                                      "step divided by the cost it stands for: keeps attention heads) or adam; "
                                      "default: the recipe's",
                                      choices=("sgd", "sgd_per_cost", "adam")),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        from plugin.budget import search_to_budget
        from plugin.engine.supernet import run_search

        start_from_recipe = options.get("start", RECIPE) == RECIPE
        options = resolve_recipe(options, problem.settings.target)

        config = problem.search_config(lambda_ramp=bool(options["lambda_ramp"]),
                                       prune_init=float(options["prune_init"]),
                                       discretisation=str(options["discretisation"]),
                                       logit_steps=str(options["logit_steps"]),
                                       prune_init_score=str(options["prune_init_score"]),
                                       zero_logit_lr=float(options["zero_logit_lr"]),
                                       ordered_cost=float(options["ordered_cost"]),
                                       budget_settle=bool(options["settle"]),
                                       settle_temperature=float(options["settle_temperature"]) or None)
        net = problem.supernet(config)
        target = problem.settings.target
        _start(net, str(options["start"]), float(options["start_logit"]), target, lenient=start_from_recipe)
        if target:
            budget = search_to_budget(net, problem.train, target, config)
            plan, epochs = budget.plan, budget.epochs
        else:
            plan, epochs = run_search(net, problem.train, config), config.epochs
        return StrategyResult(plan, list(plan.metadata.get("history", [])), engine=net, epochs_used=epochs,
                              options=options)


def _start(net: Any, start: str, strength: float, target: str | None, lenient: bool = False) -> None:
    """The ``start`` option: the logits raised toward one width (``plugin.engine.search_start``).
    ``lenient`` (the recipe's width, not the user's): a width that is not searched leaves the
    paper's start instead of an error."""
    from graph_passes.errors import ConfigError
    from plugin.budget import check_reachable
    from plugin.engine.search_start import start_at_width, widest_width_within
    from plugin.targets import parse_target

    if start == "default":
        return
    if start == "budget":
        if not target:
            raise ConfigError("-S gradient.start=budget needs a --target budget; give one, or a width "
                              "(e.g. -S gradient.start=4)")
        budget = parse_target(target)
        bits = widest_width_within(net, budget.cost_model, check_reachable(net, budget))
    else:
        try:
            bits = int(start)
        except ValueError:
            raise ConfigError(f"-S gradient.start={start!r}: use default, budget or a weight width such as 4") from None
        widths = sorted({b for alpha in net.alphas for b in alpha.precisions if b > 0})
        if bits not in widths and lenient:
            logger.info("the recipe's start width %d is not searched (%s): the default start", bits, widths)
            return
        if bits not in widths:
            raise ConfigError(f"-S gradient.start={bits}: not a searched weight width ({', '.join(map(str, widths))})")
    start_at_width(net, bits, strength)
