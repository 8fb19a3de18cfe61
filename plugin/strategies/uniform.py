"""``--strategy uniform``: uniform quantization-aware training, no search and no pruning.

Every weight at the one non-zero ``--weight-bits`` width and every activation at the widest
``--act-bits`` width (``--strategy uniform --weight-bits 8 --act-bits 8`` is W8A8 QAT).

QAT starts from the calibrated post-training point and never ends below it: the activation clips
are calibrated on the training split (:meth:`FakeQuantModel.calibrate`), the uniform plan is
frozen (weight scales from the weights), that post-training model is scored on the held-out
split, and the search's epochs train it (:func:`plugin.engine.training.finetune`) keeping the
best state on the held-out split (the start counts as epoch 0). The learning rate suits the
width (:func:`plugin.engine.training.qat_lr`: 8-bit weights move little from the float ones).
The shared QAT then runs ``--finetune-epochs`` more from that state, so the training budget
matches the other strategies'.
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
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "lr": StrategyOption("lr", float, 0.0, "QAT learning rate of the search epochs (0: by the weight width, "
                             "plugin.engine.training.qat_lr)"),
        "keep_best": StrategyOption("keep_best", bool, True, "end the search epochs on their best held-out state "
                                    "(the calibrated post-training model counts as epoch 0)"),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        from plugin.engine.training import FinetuneConfig, finetune, qat_lr

        widths = problem.settings.precisions.weight_widths
        if len(widths) != 1:
            raise ConfigError(f"--strategy uniform needs one weight width, got --weight-bits "
                              f"{','.join(map(str, problem.settings.precisions.weights))}; e.g. --weight-bits 8")
        bits, act = widths[0], max(problem.settings.precisions.activations)
        lr = float(options.get("lr", 0.0) or 0.0)
        if lr < 0:
            raise ConfigError(f"--strategy uniform: lr must be > 0 (or 0 for the width's default), got {lr}")
        lr = lr or qat_lr(bits)
        config = problem.search_config(weight_precisions=(bits,), act_bits=(act,), lam=0.0)
        model = problem.fake_quant(config)
        model.calibrate(problem.train, config.batch_size)  # clips from the FP32 teacher's activations
        space = model.space
        plan = space.uniform_plan(bits, act, metadata={"strategy": "uniform", "weight_bits": bits,
                                                       "activation_bits": act})
        keep_best = bool(options.get("keep_best", True))
        held = problem.held_out if keep_best and problem.held_out is not None and len(problem.held_out) else None
        s = problem.settings
        result = finetune(model, plan, problem.train, FinetuneConfig(
            epochs=config.epochs, batch_size=config.batch_size, lr=lr, task_loss=s.task_loss,
            max_steps_per_epoch=s.max_steps_per_epoch, device=str(s.device), seed=s.seed, progress=s.progress,
            keep_best=keep_best, schedule=s.qat_schedule), validation=held)
        history = [{"stage": "uniform-qat", "epochs": int(config.epochs), "lr": lr, "keep_best": keep_best,
                    "best_epoch": result.best_epoch, "validation": result.validation,
                    "epoch_losses": [float(x) for x in result.epoch_losses]}]
        metadata = {**result.plan.metadata, "strategy": "uniform", "weight_bits": bits, "activation_bits": act,
                    "history": history}
        out = type(result.plan)(result.plan.model_sha256, result.plan.groups, result.plan.layers,
                                result.plan.activations, result.plan.cost_before, result.plan.cost_after, metadata)
        return StrategyResult(out, history, engine=model, epochs_used=config.epochs)
