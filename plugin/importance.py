"""Channel importance, torch-free: which channels of a group a strategy keeps.

Any strategy can turn "keep 60% of group g" into channel indices: :func:`channel_importance`
scores every channel of every channel group, :func:`keep_indices` keeps the highest-scoring ones.

Criteria (``criterion``):

* ``"l1"`` (default): for each producer layer of the group, the mean |W| of the channel's output
  filter divided by the layer's mean (so layers of different scale weigh alike), summed over the
  group's producers (BatchNorm is already folded into the convs: the network-slimming criterion).
* ``"l2"``: the same with the filter's root mean square.

A channel tied to no producer (e.g. a group fed only by constants) scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from graph_passes.errors import PlanError
from plugin.space import SearchSpace

CRITERIA = ("l1", "l2")


def channel_importance(space: SearchSpace, weights: Mapping[str, np.ndarray] | None = None,
                       criterion: str = "l1") -> dict[str, np.ndarray]:
    """Per channel group (id -> array of its size), the channels' importance (higher = keep)."""
    if criterion not in CRITERIA:
        raise PlanError(f"unknown importance criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    units = {u.group_id: u for u in space.map.units.values() if u.group_id is not None}
    scores = {gid: np.zeros(u.size, dtype=np.float64) for gid, u in units.items()}
    by_alpha: dict[int, list] = {}
    for unit in units.values():
        by_alpha.setdefault(unit.alpha_index, []).append(unit)
    for info in space.layers.values():
        layer = info.layer
        w = weights.get(layer.weight) if weights is not None else None
        if w is None:
            w = space.analysis.graph.constant(layer.weight)
        if w is None:
            continue
        flat = np.moveaxis(np.asarray(w, dtype=np.float64), layer.weight_out_axis, 0).reshape(w.shape[layer.weight_out_axis], -1)
        norms = np.abs(flat).mean(axis=1) if criterion == "l1" else np.sqrt((flat ** 2).mean(axis=1))
        mean = float(norms.mean()) if norms.size else 0.0
        if not math.isfinite(mean) or mean <= 0:
            continue
        rel = norms / mean
        for channel, column in enumerate(info.columns):
            for unit in by_alpha.get(info.alpha_index, []):
                if unit.offset <= column < unit.offset + unit.size:
                    scores[unit.group_id][column - unit.offset] += rel[channel]
    return scores


def keep_indices(scores: np.ndarray, ratio: float, minimum: int = 1) -> list[int]:
    """The ``round(ratio * n)`` (at least ``minimum``) highest-scoring channels, in index order;
    ties go to the lower index."""
    n = len(scores)
    if not 0.0 <= ratio <= 1.0:
        raise PlanError(f"keep ratio must be in [0, 1], got {ratio}")
    count = min(n, max(minimum, int(round(ratio * n))))
    order = np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64)))
    return sorted(int(i) for i in order[:count])


__all__ = ["CRITERIA", "channel_importance", "keep_indices"]
