"""Training and evaluation of a fake-quantized model: batches, task losses, QAT, evaluation.

Data: a :class:`plugin.data.Dataset` (shuffled per epoch with the seed) or any re-iterable
sequence of batches (a batch: a dict input name -> array, a tuple of arrays in the model's input
order optionally followed by labels, or one array). Targets: the original FP32 model's outputs
(distillation, the default: label-free) or the labels (``task_loss="cross_entropy"``).

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from graph_passes.errors import DataError
from plugin.engine.config import TASK_LOSSES, SearchConfigError
from plugin.engine.quantizers import net_param_groups
from plugin.plan import CompressionPlan

if TYPE_CHECKING:
    from plugin.engine.fakequant import FakeQuantModel

logger = logging.getLogger(__name__)

Batch = tuple[tuple[Tensor, ...], "Tensor | None"]


# ----------------------------------------------------------------------------- data


def _as_tensor(value: Any, device: torch.device) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    return tensor.to(device)


def _split_batch(batch: Any, input_names: Sequence[str], device: torch.device) -> Batch:
    """One user batch -> (inputs in the model's order, labels or None)."""
    if isinstance(batch, Mapping):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise DataError(f"a batch has no array for model input(s) {missing}; keys: {sorted(batch)}")
        labels = batch.get("labels") if "labels" not in input_names else None
        inputs = tuple(_as_tensor(batch[n], device) for n in input_names)
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
        labels = items.pop() if len(items) == len(input_names) + 1 else None
        if len(items) != len(input_names):
            raise DataError(f"a batch holds {len(items)} arrays but the model has {len(input_names)} inputs")
        inputs = tuple(_as_tensor(v, device) for v in items)
    else:
        inputs, labels = (_as_tensor(batch, device),), None
    return inputs, None if labels is None else _as_tensor(labels, device).long()


def iterate_batches(
    data: Any, input_names: Sequence[str], batch_size: int, seed: int, device: torch.device,
    max_steps: int | None = None,
) -> Iterator[Batch]:
    """Batches of a :class:`plugin.data.Dataset` (shuffled by ``seed``) or of a batch sequence."""
    if hasattr(data, "arrays") and hasattr(data, "batch_indices"):
        labels = getattr(data, "labels", None)
        source: Iterable[Any] = (
            ({n: data.arrays[n][i] for n in input_names}
             | ({} if labels is None else {"labels": labels[i]}))
            for i in data.batch_indices(batch_size, shuffle=True, seed=seed)
        )
    else:
        source = data
    for step, batch in enumerate(source):
        if max_steps is not None and step >= max_steps:
            return
        yield _split_batch(batch, input_names, device)


def count_batches(data: Any, batch_size: int, max_steps: int | None) -> int | None:
    n = len(data) if hasattr(data, "__len__") else None
    if n is not None and hasattr(data, "batch_indices"):
        n = math.ceil(n / batch_size)
    return n if max_steps is None or n is None else min(n, max_steps)


# ----------------------------------------------------------------------------- loss


def _outputs(value: Any) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def task_loss(kind: str, student: Any, teacher: Any, labels: Tensor | None) -> Tensor:
    """Distillation (KL over axis 1 or MSE, summed over float outputs) or cross-entropy."""
    outs = _outputs(student)
    if kind == "cross_entropy":
        if labels is None:
            raise DataError("task_loss='cross_entropy' needs labels; pass labelled data or use distill_kl")
        return F.cross_entropy(outs[0], labels)
    total = outs[0].new_zeros(())
    for s, t in zip(outs, _outputs(teacher)):
        if not s.is_floating_point():
            continue
        if kind == "distill_kl" and s.ndim >= 2 and s.shape[1] > 1:
            log_t = F.log_softmax(t, dim=1)
            total = total + (log_t.exp() * (log_t - F.log_softmax(s, dim=1))).sum(dim=1).mean()
        else:
            total = total + F.mse_loss(s, t)
    return total


# ----------------------------------------------------------------------------- QAT


@dataclass
class FinetuneConfig:
    """QAT settings; the task loss is the search's (distillation by default)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    task_loss: str = "distill_kl"
    max_steps_per_epoch: int | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task_loss not in TASK_LOSSES:
            raise SearchConfigError(f"task_loss {self.task_loss!r} is unknown; use one of {', '.join(TASK_LOSSES)}")
        if int(self.epochs) < 0 or int(self.batch_size) < 1 or not float(self.lr) > 0:
            raise SearchConfigError(
                f"fine-tuning needs epochs >= 0, batch_size >= 1 and lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}")


@dataclass
class FinetuneResult:
    """``plan``: the frozen plan with the fine-tuned weight scales and activation clips."""

    plan: CompressionPlan
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def finetune(model: FakeQuantModel, plan: CompressionPlan, data: Any,
             config: FinetuneConfig | None = None) -> FinetuneResult:
    """Freeze ``plan`` into ``model`` and train its weights and clips (Adam)."""
    config = config or FinetuneConfig()
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    model.freeze(plan)
    optimiser = torch.optim.Adam(net_param_groups(model, config.weight_decay), lr=config.lr)
    start, losses = time.perf_counter(), []
    for epoch in range(config.epochs):
        losses.append(_epoch(model, data, config, optimiser, epoch, device))
        logger.info("fine-tune epoch %d/%d: task loss %.4f", epoch + 1, config.epochs, losses[-1])
    seconds = time.perf_counter() - start
    metadata = dict(plan.metadata)
    metadata["finetune"] = {"epochs": int(config.epochs), "lr": float(config.lr), "task_loss": config.task_loss,
                            "final_loss": _finite(losses[-1]) if losses else None}
    refreshed = model.frozen_plan(metadata=metadata, cost_models=list(plan.cost_after) or None)
    return FinetuneResult(refreshed, losses, seconds)


def _epoch(model: FakeQuantModel, data: Any, config: FinetuneConfig, optimiser: torch.optim.Optimizer,
           epoch: int, device: torch.device) -> float:
    batches = iterate_batches(data, model.input_names, config.batch_size, config.seed + 1000 + epoch,
                              device, config.max_steps_per_epoch)
    total = count_batches(data, config.batch_size, config.max_steps_per_epoch)
    bar = tqdm(batches, total=total, desc=f"fine-tune {epoch + 1}", leave=False, disable=not config.progress)
    losses = []
    for inputs, labels in bar:
        teacher = model.teacher_outputs(*inputs) if config.task_loss != "cross_entropy" else None
        loss = task_loss(config.task_loss, model(*inputs), teacher, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)) if losses else float("nan")


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
