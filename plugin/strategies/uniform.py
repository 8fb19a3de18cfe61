"""``--strategy uniform``: uniform quantization-aware training, no search and no pruning.

Every weight at the one non-zero ``--weight-bits`` width and every activation at the widest
``--act-bits`` width (``--strategy uniform --weight-bits 8 --act-bits 8`` is W8A8 QAT). The
search's epochs train the weights at that plan (the training budget matches the other strategies'),
then the shared QAT runs ``--finetune-epochs`` more.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from graph_passes.errors import ConfigError
from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem


class UniformStrategy:
    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "uniform QAT baseline: one --weight-bits width, the widest --act-bits width, no pruning"
    steerable: ClassVar[bool] = False
    options: ClassVar[Mapping[str, StrategyOption]] = {}

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        from plugin.engine.supernet import run_search

        widths = problem.settings.precisions.weight_widths
        if len(widths) != 1:
            raise ConfigError(f"--strategy uniform needs one weight width, got --weight-bits "
                              f"{','.join(map(str, problem.settings.precisions.weights))}; e.g. --weight-bits 8")
        bits, act = widths[0], max(problem.settings.precisions.activations)
        config = problem.search_config(weight_precisions=(bits,), act_bits=(act,), lam=0.0)
        net = problem.supernet(config)
        plan = run_search(net, problem.train, config)
        metadata = {**plan.metadata, "strategy": "uniform", "weight_bits": bits, "activation_bits": act}
        plan = type(plan)(plan.model_sha256, plan.groups, plan.layers, plan.activations, plan.cost_before,
                          plan.cost_after, metadata)
        return StrategyResult(plan, list(metadata.get("history", [])), engine=net, epochs_used=config.epochs)
