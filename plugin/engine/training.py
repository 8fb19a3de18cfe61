"""Training and evaluation of a fake-quantized model: QAT with a frozen plan, evaluation.
Batches and task losses: :mod:`plugin.engine.batches`.

QAT (:func:`finetune`): the plan is frozen into the model with ``freeze``: fixed bits per output
channel, pruned channels zero (their raw weights and biases are zeroed and get no gradient, so
Adam keeps them at exactly zero), activation bits fixed, and pruned positions masked at every
consumer input, which is what the structurally pruned model computes. Works on any
:class:`plugin.engine.fakequant.FakeQuantModel` (the DNAS supernet is one).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from plugin.engine.batches import TeacherCache, count_batches, indexed_batches, iterate_batches, task_loss
from plugin.engine.config import QAT_SCHEDULES, TASK_LOSSES, SearchConfigError
from plugin.engine.optimisers import adam
from plugin.engine.quantizers import net_param_groups
from plugin.plan import CompressionPlan

if TYPE_CHECKING:
    from plugin.engine.fakequant import FakeQuantModel

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- QAT


#: QAT learning rate (Adam) by the narrowest weight width of a plan. 8-bit weights sit within half a
#: step (0.4% of the channel's range) of the float ones, so the float optimum is already a good
#: quantized one and large steps only drift from it (the compress training data is a small subset,
#: often one the FP32 model was trained on). Measured, uniform QAT 12 + 6 epochs, test accuracy:
#: W8A8 digits/ResNet-8 99.63% at 1e-4 vs 98.89% at 1e-3 (FP32 99.63%), MNIST-1D/DS-CNN 99.13% vs
#: 98.57% (FP32 99.13%); W4A8 digits 99.63% at 3e-4 vs 99.07%, MNIST-1D 98.93% vs 98.07%.
#: 2-bit weights keep the default (not measured lower).
QAT_LR = {8: 1e-4, 4: 3e-4}
QAT_LR_DEFAULT = 1e-3


def qat_lr(bits: int) -> float:
    """The QAT learning rate for weights of ``bits`` (``QAT_LR``, else ``QAT_LR_DEFAULT``)."""
    return QAT_LR.get(int(bits), QAT_LR_DEFAULT)


def plan_qat_lr(plan: CompressionPlan) -> float:
    """The QAT learning rate of a plan: ``qat_lr`` of its narrowest weight width when nothing is
    pruned; ``QAT_LR_DEFAULT`` when channels are pruned (the rest must recover from their loss)."""
    widths = {int(b) for lp in plan.layers.values() for b in lp.bits}
    if not widths or 0 in widths:
        return QAT_LR_DEFAULT
    return qat_lr(min(widths))


@dataclass
class FinetuneConfig:
    """QAT settings; the task loss is the search's (distillation by default)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: by the plan's widths (plan_qat_lr)
    weight_decay: float = 1e-4
    task_loss: str = "distill_kl"
    max_steps_per_epoch: int | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    keep_best: bool = True  # with validation data: end on the best epoch (the start counts as epoch 0)
    #: the learning rate over the run: "constant", or "cosine" (from ``lr`` down to 0 at the last step)
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in QAT_SCHEDULES:
            raise SearchConfigError(f"QAT schedule {self.schedule!r} is unknown; use one of {', '.join(QAT_SCHEDULES)}")
        if self.task_loss not in TASK_LOSSES:
            raise SearchConfigError(f"task_loss {self.task_loss!r} is unknown; use one of {', '.join(TASK_LOSSES)}")
        if int(self.epochs) < 0 or int(self.batch_size) < 1 or (self.lr is not None and not float(self.lr) > 0):
            raise SearchConfigError(
                f"fine-tuning needs epochs >= 0, batch_size >= 1 and lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}")


@dataclass
class FinetuneResult:
    """``plan``: the frozen plan with the fine-tuned weight scales and activation clips.
    ``validation``: per epoch (0 = the frozen plan before any QAT step) the validation figures;
    ``best_epoch``: the epoch the model ends on."""

    plan: CompressionPlan
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    validation: list[dict[str, float | None]] = field(default_factory=list)
    best_epoch: int | None = None


def finetune(model: FakeQuantModel, plan: CompressionPlan, data: Any,
             config: FinetuneConfig | None = None, validation: Any = None) -> FinetuneResult:
    """Freeze ``plan`` into ``model`` and train its weights and clips (Adam).

    With ``validation`` data and ``keep_best``, QAT never ends below its starting point: the frozen
    (calibrated, searched) model is scored before the first step and after every epoch by
    :func:`validation_score` (with labels: accuracy, then cross-entropy; without: the distillation
    loss against the FP32 original), and the best state is restored at the end.
    """
    config = config or FinetuneConfig()
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    model.freeze(plan)
    lr = float(config.lr) if config.lr is not None else plan_qat_lr(plan)
    optimiser = adam(net_param_groups(model, config.weight_decay), lr=lr)
    scheduler = _scheduler(optimiser, config, data)
    start, losses, figures = time.perf_counter(), [], []
    track = validation is not None and config.keep_best
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor]] | None = None

    def observe(epoch: int) -> None:
        nonlocal best
        figure = validation_score(model, validation, config.batch_size, teacher=val_teachers)
        figures.append({"epoch": epoch, **figure})
        # with labels: accuracy, then the labels' cross-entropy (the training objective); without:
        # the distillation loss against the FP32 original
        key = ((figure["accuracy"], -figure["label_loss"]) if figure["accuracy"] is not None
               else (0.0, -figure["distill_loss"]))
        if best is None or key > best[0]:
            best = (key, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})

    # the FP32 teacher and the data are fixed: its outputs are computed once per sample
    teachers = TeacherCache.for_data(model.teacher_outputs, data)
    val_teachers = TeacherCache.for_data(model.teacher_outputs, validation) if track else None
    if track:
        observe(0)
    for epoch in range(config.epochs):
        losses.append(_epoch(model, data, config, optimiser, epoch, device, teachers, scheduler))
        logger.info("fine-tune epoch %d/%d: task loss %.4f", epoch + 1, config.epochs, losses[-1])
        if track:
            observe(epoch + 1)
    best_epoch = None
    if best is not None:
        best_epoch = best[1]
        if best_epoch != config.epochs:
            model.load_state_dict(best[2])
            logger.info("fine-tune: ending on epoch %d of %d (best on validation data)", best_epoch, config.epochs)
    seconds = time.perf_counter() - start
    metadata = dict(plan.metadata)
    metadata["finetune"] = {"epochs": int(config.epochs), "lr": lr, "schedule": config.schedule,
                            "task_loss": config.task_loss,
                            "final_loss": _finite(losses[-1]) if losses else None, "best_epoch": best_epoch,
                            "validation": figures}
    refreshed = model.frozen_plan(metadata=metadata, cost_models=list(plan.cost_after) or None)
    return FinetuneResult(refreshed, losses, seconds, figures, best_epoch)


@torch.no_grad()
def validation_score(model: FakeQuantModel, data: Any, batch_size: int = 256,
                     teacher: TeacherCache | None = None) -> dict[str, float | None]:
    """``accuracy`` and ``label_loss`` (top-1 and cross-entropy of the first output against the
    labels; None without labels) and ``distill_loss`` (the distillation loss against the FP32
    original: KL for class outputs, MSE otherwise), averaged over the samples of ``data``.
    ``teacher``: a :class:`~plugin.engine.batches.TeacherCache` of ``data`` reused across calls."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    correct = count = 0
    loss_sum = label_sum = 0.0
    has_labels = False
    for indices, (inputs, labels) in indexed_batches(data, model.input_names, batch_size, 0, device):
        out = model(*inputs)
        reference = teacher(indices, inputs) if teacher is not None else model.teacher_outputs(*inputs)
        n = int(inputs[0].shape[0])
        loss_sum += float(task_loss("distill_kl", out, reference, None)) * n
        count += n
        first = out[0] if isinstance(out, (tuple, list)) else out
        if labels is not None and first.ndim == 2:
            has_labels = True
            correct += int((first.argmax(dim=1) == labels).sum())
            label_sum += float(task_loss("cross_entropy", out, None, labels)) * n
    model.train(was_training)
    return {"accuracy": correct / max(count, 1) if has_labels else None,
            "label_loss": label_sum / max(count, 1) if has_labels else None,
            "distill_loss": loss_sum / max(count, 1)}


def _epoch(model: FakeQuantModel, data: Any, config: FinetuneConfig, optimiser: torch.optim.Optimizer,
           epoch: int, device: torch.device, teachers: TeacherCache | None = None,
           scheduler: Any = None) -> float:
    batches = indexed_batches(data, model.input_names, config.batch_size, config.seed + 1000 + epoch,
                              device, config.max_steps_per_epoch)
    total = count_batches(data, config.batch_size, config.max_steps_per_epoch)
    bar = tqdm(batches, total=total, desc=f"fine-tune {epoch + 1}", leave=False, disable=not config.progress)
    losses = []
    for indices, (inputs, labels) in bar:
        teacher = None
        if config.task_loss != "cross_entropy":
            teacher = teachers(indices, inputs) if teachers is not None else model.teacher_outputs(*inputs)
        loss = task_loss(config.task_loss, model(*inputs), teacher, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)) if losses else float("nan")


def _scheduler(optimiser: torch.optim.Optimizer, config: FinetuneConfig, data: Any) -> Any:
    """The per-step learning-rate schedule of ``config.schedule`` (None: constant). Cosine runs
    from the optimiser's rate at the first step to 0 after the last one (``epochs`` x the batches
    per epoch; data of unknown length: constant, with a warning)."""
    if config.schedule == "constant" or int(config.epochs) == 0:
        return None
    per_epoch = count_batches(data, config.batch_size, config.max_steps_per_epoch)
    if not per_epoch:
        logger.warning("fine-tune: the data's length is unknown, so the cosine schedule cannot be laid out; "
                       "the learning rate stays constant")
        return None
    total = max(1, int(config.epochs) * int(per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@torch.no_grad()
def evaluate(model: FakeQuantModel, data: Any, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (when the data has labels) and top-1 agreement with the FP32 teacher."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = agree = count = 0
    has_labels = False
    for inputs, labels in iterate_batches(data, model.input_names, batch_size, 0, device):
        out = model(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        teacher = model.teacher_outputs(*inputs)
        teacher = teacher[0] if isinstance(teacher, (tuple, list)) else teacher
        pred = out.argmax(dim=1)
        agree += int((pred == teacher.argmax(dim=1)).sum())
        if labels is not None:
            has_labels = True
            correct += int((pred == labels).sum())
        count += pred.numel()
    metrics = {"agreement": agree / max(count, 1), "samples": float(count)}
    if has_labels:
        metrics["accuracy"] = correct / max(count, 1)
    return metrics
