"""Arithmetic that works the same on python floats, numpy arrays and torch tensors.

Cost formulas are written once with these helpers, so the same code gives a float for a report
and a differentiable tensor during the search. torch is never imported here: a value is a tensor
only if torch is already loaded (``sys.modules``) and the value is an instance of
``torch.Tensor``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

#: A cost value: a python float (plain inputs) or a 0-d torch tensor (search inputs).
Scalar = Union[float, "torch.Tensor"]  # noqa: F821  (torch is imported lazily, if at all)


def is_tensor(value: Any) -> bool:
    """True if ``value`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def floor_ste(value: Scalar) -> Scalar:
    """``floor(value)``; on tensors the gradient is the identity (straight-through)."""
    if is_tensor(value):
        return value + (value.floor() - value).detach()
    return float(math.floor(value))


def ceil_ste(value: Scalar) -> Scalar:
    """``ceil(value)``; on tensors the gradient is the identity (straight-through)."""
    if is_tensor(value):
        return value + (value.ceil() - value).detach()
    return float(math.ceil(value))


def positive_step(value: Scalar) -> Scalar:
    """1 where ``value > 0`` else 0, without a gradient (no host sync on tensors)."""
    if is_tensor(value):
        return (value > 0).to(value.dtype)
    return 1.0 if value > 0 else 0.0


def channel_mass(theta: Any) -> list[Scalar]:
    """Per precision j, ``sum_c theta[j, c]``: the expected number of channels at precision j."""
    if is_tensor(theta):
        return list(theta.sum(dim=1).unbind(0))
    return [float(v) for v in np.asarray(theta, dtype=np.float64).sum(axis=1)]


def probabilities(theta: Any) -> list[Scalar]:
    """The entries of a 1-d probability vector, as floats or 0-d tensors (gradient kept)."""
    if is_tensor(theta):
        return list(theta.unbind(0))
    return [float(v) for v in np.asarray(theta, dtype=np.float64).ravel()]


def weighted_sum(weights: Sequence[float], values: Sequence[Scalar]) -> Scalar:
    """``sum_i weights[i] * values[i]``, skipping zero weights; 0.0 when nothing is left."""
    total: Scalar = 0.0
    for weight, value in zip(weights, values):
        if weight:
            total = total + weight * value
    return total


def finish(value: Scalar) -> Scalar:
    """Return tensors unchanged and everything else as a python float."""
    return value if is_tensor(value) else float(value)


def minimum(a: Scalar, b: Scalar) -> Scalar:
    """``min(a, b)``; on tensors ``torch.minimum`` (gradient through the smaller one)."""
    if is_tensor(a) or is_tensor(b):
        torch = sys.modules["torch"]
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return float(min(a, b))
