"""Batches and task losses, shared by every training loop of the engine.

Data: a :class:`plugin.data.Dataset` (shuffled per epoch with the seed) or any re-iterable
sequence of batches (a batch: a dict input name -> array, a tuple of arrays in the model's input
order optionally followed by labels, or one array). Targets: the original FP32 model's outputs
(distillation, the default: label-free) or the labels (``task_loss="cross_entropy"``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graph_passes.errors import DataError

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
    """Batches of a :class:`plugin.data.Dataset` (shuffled by ``seed``) or of a batch sequence.

    A per-sample Dataset (``Dataset.per_sample``: inputs that take no batch in dim 0) gives one
    sample per batch whatever ``batch_size`` says, each input as the model takes it."""
    for _indices, batch in indexed_batches(data, input_names, batch_size, seed, device, max_steps):
        yield batch


def indexed_batches(
    data: Any, input_names: Sequence[str], batch_size: int, seed: int, device: torch.device,
    max_steps: int | None = None,
) -> Iterator[tuple[np.ndarray | None, Batch]]:
    """:func:`iterate_batches` with each batch's sample indices into a Dataset (the same batches
    in the same order); None for a batch sequence."""
    if hasattr(data, "arrays") and hasattr(data, "batch_indices"):
        labels = getattr(data, "labels", None)
        per_sample = bool(getattr(data, "per_sample", False))
        feeds = getattr(data, "feeds", None) if per_sample else None
        source: Iterable[tuple[np.ndarray | None, Any]] = (
            (i, (feeds(i) if feeds is not None else {n: data.arrays[n][i] for n in input_names})
             | ({} if labels is None else {"labels": labels[i]}))
            for i in data.batch_indices(1 if per_sample else batch_size, shuffle=True, seed=seed)
        )
    else:
        source = ((None, batch) for batch in data)
    for step, (indices, batch) in enumerate(source):
        if max_steps is not None and step >= max_steps:
            return
        yield indices, _split_batch(batch, input_names, device)


def count_batches(data: Any, batch_size: int, max_steps: int | None) -> int | None:
    n = len(data) if hasattr(data, "__len__") else None
    if n is not None and hasattr(data, "batch_indices"):
        n = math.ceil(n / (1 if getattr(data, "per_sample", False) else batch_size))
    return n if max_steps is None or n is None else min(n, max_steps)


# ----------------------------------------------------------------------------- teacher targets

TEACHER_CACHE_ENV = "PRUNEQUANT_TEACHER_CACHE_MB"
TEACHER_CACHE_MB = 256


def teacher_cache_bytes() -> int:
    """The teacher cache's memory bound: ``$PRUNEQUANT_TEACHER_CACHE_MB`` MiB (0: no cache), by
    default 256 MiB, at most an eighth of the memory available now (``/proc/meminfo``)."""
    raw = os.environ.get(TEACHER_CACHE_ENV, "").strip()
    try:
        mib = float(raw) if raw else float(TEACHER_CACHE_MB)
    except ValueError:
        logger.warning("%s=%r is not a number of MiB; using %d", TEACHER_CACHE_ENV, raw, TEACHER_CACHE_MB)
        mib = float(TEACHER_CACHE_MB)
    limit = int(max(mib, 0.0) * (1 << 20))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limit = min(limit, int(line.split()[1]) * 1024 // 8)
                    break
    except OSError:
        pass
    return limit


class TeacherCache:
    """The fixed FP32 teacher's outputs per sample index of one Dataset, computed once.

    The data and the teacher do not change during a search, so from its second epoch on a
    batch's distillation targets are read back (one gather per output) instead of running the
    teacher's forward again. ``cache(indices, inputs)`` returns the teacher's outputs for the
    batch (as ``teacher(*inputs)`` structures them: a tensor or a tuple); ``indices`` None (a
    batch sequence, not a Dataset) computes them. Rows come from the batch in which a sample was
    first seen: the same numbers as a fresh forward up to float rounding where the batch's size
    differs (measured on the digits models: bit-identical for batches of 13 and 64 and any order;
    a few 1e-6 apart from a batch of one). Memory-bounded (``max_bytes``, default
    :func:`teacher_cache_bytes`): outputs that would not fit, or that have no batch dimension
    (dim 0 not the batch's size), are not cached and the teacher runs every step. A per-sample
    Dataset (one sample per batch, shapes may vary) keeps each sample's outputs as computed until
    the bound is reached."""

    def __init__(self, teacher: Callable[..., Any], n_samples: int, *, per_sample: bool = False,
                 max_bytes: int | None = None) -> None:
        self.teacher = teacher
        self.n_samples = int(n_samples)
        self.per_sample = per_sample
        self.max_bytes = teacher_cache_bytes() if max_bytes is None else int(max_bytes)
        self.enabled = self.max_bytes > 0 and self.n_samples > 0
        self.hits = self.misses = 0
        self.nbytes = 0
        self._store: list[Tensor] | None = None
        self._filled: np.ndarray | None = None
        self._single = True
        self._samples: dict[int, Any] = {}

    @classmethod
    def for_data(cls, teacher: Callable[..., Any], data: Any, max_bytes: int | None = None) -> TeacherCache:
        indexed = hasattr(data, "arrays") and hasattr(data, "batch_indices") and hasattr(data, "__len__")
        cache = cls(teacher, len(data) if indexed else 0, per_sample=bool(getattr(data, "per_sample", False)),
                    max_bytes=max_bytes)
        cache.enabled = cache.enabled and indexed
        return cache

    def __call__(self, indices: np.ndarray | None, inputs: Sequence[Tensor]) -> Any:
        if indices is None or not self.enabled:
            return self.teacher(*inputs)
        if self.per_sample:
            return self._per_sample(indices, inputs)
        if self._store is not None and bool(self._filled[indices].all()):
            self.hits += 1
            index = torch.as_tensor(indices, dtype=torch.long, device=self._store[0].device)
            rows = tuple(stored.index_select(0, index) for stored in self._store)
            return rows[0] if self._single else rows
        out = self.teacher(*inputs)
        self.misses += 1
        self._put(indices, out)
        return out

    def _per_sample(self, indices: np.ndarray, inputs: Sequence[Tensor]) -> Any:
        key = int(indices[0])
        if key in self._samples:
            self.hits += 1
            return self._samples[key]
        out = self.teacher(*inputs)
        self.misses += 1
        outs = _outputs(out)
        if all(isinstance(o, Tensor) for o in outs):
            size = sum(o.numel() * o.element_size() for o in outs)
            if self.nbytes + size <= self.max_bytes:
                self._samples[key] = out
                self.nbytes += size
        return out

    def _put(self, indices: np.ndarray, out: Any) -> None:
        outs = _outputs(out)
        if not outs or not all(isinstance(o, Tensor) and o.ndim >= 1 and o.shape[0] == len(indices) for o in outs):
            self._disable("the teacher's outputs have no batch dimension")
            return
        if self._store is None:
            size = self.n_samples * sum(o[0].numel() * o.element_size() for o in outs)
            if size > self.max_bytes:
                self._disable(f"{size / (1 << 20):.0f} MiB of outputs exceed the bound of "
                              f"{self.max_bytes / (1 << 20):.0f} MiB ({TEACHER_CACHE_ENV})")
                return
            self._store = [o.new_empty((self.n_samples, *o.shape[1:])) for o in outs]
            self._filled = np.zeros(self.n_samples, dtype=bool)
            self._single = not isinstance(out, (tuple, list))
            self.nbytes = size
        if any(o.shape[1:] != s.shape[1:] or o.dtype != s.dtype for o, s in zip(outs, self._store)) \
                or len(outs) != len(self._store):
            self._disable("the teacher's output shapes change between batches")
            return
        index = torch.as_tensor(indices, dtype=torch.long, device=self._store[0].device)
        for stored, o in zip(self._store, outs):
            stored.index_copy_(0, index, o.detach().to(stored.device))
        self._filled[indices] = True

    def _disable(self, why: str) -> None:
        logger.info("teacher outputs not cached: %s; the teacher runs every step", why)
        self.enabled = False
        self._store = self._filled = None
        self.nbytes = 0


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


__all__ = ["Batch", "TeacherCache", "count_batches", "indexed_batches", "iterate_batches", "task_loss",
           "teacher_cache_bytes"]
