"""The Adam optimiser of the search and of QAT: torch's fused implementation where it runs.

``torch.optim.Adam`` on CPU tensors defaults to its per-parameter loop: about ten small kernel
launches per parameter per step, a visible share of a step on the small networks people compress
(the digits ResNet-8's FP32 step is 5-6% faster with the fused kernel, its search step 3-5%:
``benchmarks/step_speed.py --ab-step25``). ``fused=True`` (torch >= 2.4 on CPU and CUDA) does the
same update in one kernel over every parameter: the same algorithm (Adam with L2 weight decay,
bias corrections), its results within float32 rounding of the loop (the kernel evaluates the
same expressions in another order: measured 2e-7 apart after 50 steps). Where the
fused kernel is not available (another device, a parameter of another dtype, an older torch),
the default implementation is used, so the choice never changes what is computed beyond
rounding.

The logits' SGD (with momentum) runs torch's ``foreach`` implementation: the same element-wise
operations as the per-parameter loop, batched over the parameters (the same values, bit for bit;
about half the time on the ~15 logit tensors of a small CNN's search).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: False: every optimiser here is torch's default (the per-parameter loop on CPU); tests, benchmarks.
FUSED = True

_FUSED_DEVICES = ("cpu", "cuda")


def _params(groups: Iterable[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for group in groups:
        if isinstance(group, dict):
            out.extend(group["params"])
        else:
            out.append(group)
    return out


def fusable(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam can step every one of ``params``: floating point (float32,
    float64, float16, bfloat16), all on one CPU or CUDA device."""
    devices = set()
    for p in params:
        if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return False
        devices.add((p.device.type, p.device.index))
    return len(devices) == 1 and next(iter(devices))[0] in _FUSED_DEVICES


def adam(groups: Iterable[Any], *, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam(groups, lr=lr)``, fused where :func:`fusable` (and :data:`FUSED`)."""
    groups = list(groups)
    if FUSED and fusable(_params(groups)):
        try:
            return torch.optim.Adam(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError) as exc:  # a torch without this device's kernel
            logger.debug("fused Adam unavailable (%s); using the default implementation", exc)
    return torch.optim.Adam(groups, lr=lr)


def sgd(groups: Iterable[Any], *, lr: float, momentum: float) -> torch.optim.SGD:
    """``torch.optim.SGD(groups, lr=lr, momentum=momentum)``, with ``foreach=True`` where every
    parameter is a floating-point CPU or CUDA tensor (and :data:`FUSED`): bit-identical results."""
    groups = list(groups)
    if FUSED and fusable(_params(groups)):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
