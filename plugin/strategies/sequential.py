"""``--strategy sequential``: structured pruning first, then mixed precision on the pruned model
(the two-stage baseline the joint search is compared with).

Stage 1 searches pruning alone (weights at the widest ``--weight-bits`` width, or pruned) and
fine-tunes the pruned model; stage 2 searches per-channel widths over ``--weight-bits`` with the
stage-1 channels fixed (removed channels stay removed, kept ones cannot be pruned), starting from
the stage-1 weights; the shared QAT follows. With ``--target`` stage 1 aims at the square root of
the relative budget (e.g. 59% for 35%: half of the reduction, on a log scale, by pruning) unless
``prune_target`` says otherwise, and stage 2 meets the target; with ``--lambda`` both stages use it
unless ``prune_lambda`` is set.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Mapping

from graph_passes.errors import ConfigError
from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem

logger = logging.getLogger(__name__)


class SequentialStrategy:
    name: ClassVar[str] = "sequential"
    summary: ClassVar[str] = ("prune-only search + fine-tuning, then mixed precision on the pruned model "
                              "(the two-stage baseline); --lambda or --target")
    steerable: ClassVar[bool] = True
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "prune_lambda": StrategyOption("prune_lambda", float, None, "lambda of the pruning stage [default: --lambda]"),
        "prune_target": StrategyOption("prune_target", str, None,
                                       "budget of the pruning stage, e.g. size=60% [default: sqrt of --target]"),
        "prune_finetune_epochs": StrategyOption("prune_finetune_epochs", int, None,
                                                "fine-tuning epochs after pruning [default: --finetune-epochs]"),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        from plugin.budget import search_to_budget
        from plugin.bridge import write_back
        from plugin.engine.supernet import run_search
        from plugin.engine.training import FinetuneConfig, finetune
        from plugin.targets import parse_target

        s = problem.settings
        if not s.precisions.prunes:
            raise ConfigError("--strategy sequential prunes first: --weight-bits must include 0, e.g. 0,2,4,8")
        widest = max(s.precisions.weight_widths)
        history: list[dict[str, Any]] = []
        # stage 1: pruning alone
        prune_target = options.get("prune_target")
        if prune_target is None and s.target:
            budget = parse_target(s.target)
            if budget.relative:
                prune_target = f"{budget.cost_model}={100 * math.sqrt(budget.value):.4g}%"
        config1 = problem.search_config(weight_precisions=(0, widest),
                                        lam=options.get("prune_lambda") or (s.lam if s.lam is not None else 1.0))
        net1 = problem.supernet(config1)
        if prune_target:
            result1 = search_to_budget(net1, problem.train, prune_target, config1)
            plan1, epochs1 = result1.plan, result1.epochs
        else:
            plan1, epochs1 = run_search(net1, problem.train, config1), config1.epochs
        ft_epochs = options.get("prune_finetune_epochs")
        ft_epochs = s.finetune_epochs if ft_epochs is None else int(ft_epochs)
        plan1 = finetune(net1, plan1, problem.train, FinetuneConfig(
            epochs=ft_epochs, batch_size=config1.batch_size, task_loss=s.task_loss,
            max_steps_per_epoch=s.max_steps_per_epoch, device=s.device, seed=s.seed, progress=s.progress,
            schedule=s.qat_schedule)).plan
        history.append({"stage": "prune", "target": prune_target, "epochs": epochs1, "finetune_epochs": ft_epochs,
                        "pruned": sum(len(g.pruned) for g in plan1.groups.values()),
                        "cost_after": dict(plan1.cost_after)})
        logger.info("sequential stage 1: %s", problem.space.describe_plan(plan1, s.cost))
        # stage 2: widths only, on the stage-1 weights, stage-1 channels fixed
        weighted = write_back(problem.model, net1.materialised_bridge())
        config2 = problem.search_config()
        net2 = problem.supernet(config2, model=weighted)
        net2.fix_pruned({gid: g.kept for gid, g in plan1.groups.items()})
        if s.target:
            result2 = search_to_budget(net2, problem.train, s.target, config2)
            plan, epochs2 = result2.plan, result2.epochs
        else:
            plan, epochs2 = run_search(net2, problem.train, config2), config2.epochs
        history.append({"stage": "mixed_precision", "target": s.target, "epochs": epochs2,
                        "cost_after": dict(plan.cost_after)})
        metadata = {**plan.metadata, "strategy": "sequential", "stages": history}
        plan = type(plan)(plan.model_sha256, plan.groups, plan.layers, plan.activations, plan.cost_before,
                          plan.cost_after, metadata)
        return StrategyResult(plan, history, engine=net2, epochs_used=s.epochs)
