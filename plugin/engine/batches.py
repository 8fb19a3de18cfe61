"""Batches and task losses, shared by every training loop of the engine.

Data: a :class:`plugin.data.Dataset` (shuffled per epoch with the seed) or any re-iterable
sequence of batches (a batch: a dict input name -> array, a tuple of arrays in the model's input
order optionally followed by labels, or one array). Targets: the original FP32 model's outputs
(distillation, the default: label-free) or the labels (``task_loss="cross_entropy"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graph_passes.errors import DataError

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
    """Batches of a :class:`plugin.data.Dataset` (shuffled by ``seed``) or of a batch sequence.

    A per-sample Dataset (``Dataset.per_sample``: inputs that take no batch in dim 0) gives one
    sample per batch whatever ``batch_size`` says, each input as the model takes it."""
    if hasattr(data, "arrays") and hasattr(data, "batch_indices"):
        labels = getattr(data, "labels", None)
        per_sample = bool(getattr(data, "per_sample", False))
        feeds = getattr(data, "feeds", None) if per_sample else None
        source: Iterable[Any] = (
            ((feeds(i) if feeds is not None else {n: data.arrays[n][i] for n in input_names})
             | ({} if labels is None else {"labels": labels[i]}))
            for i in data.batch_indices(1 if per_sample else batch_size, shuffle=True, seed=seed)
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
        n = math.ceil(n / (1 if getattr(data, "per_sample", False) else batch_size))
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


__all__ = ["Batch", "count_batches", "iterate_batches", "task_loss"]
