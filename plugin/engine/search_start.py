"""Where the gradient search starts: the logits' initial distribution.

By default every weight logit column starts at ``alpha_b = b / max(b)`` (``SharedAlpha``): with
0/2/4/8 bits, theta about (0.17, 0.22, 0.28, 0.36) at temperature 1, so in expectation a sixth
of every group is pruned and a fifth sits at 2 bits from the first step. :func:`start_at_width`
starts near one uniform width instead (e.g. the widest uniform plan that meets a budget), so the
search refines a plan that is known to work.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plugin.engine.supernet import Supernet

logger = logging.getLogger(__name__)


@torch.no_grad()
def start_at_width(net: Supernet, bits: int, strength: float) -> int:
    """Raise every weight logit column's ``bits`` logit by ``strength`` (0/2/4/8 bits, strength
    2, temperature 1: theta of 4 bits 0.74 instead of 0.28). The start stays the FP32 function in
    expectation: the keep-mass rescale of the raw weights is undone and redone under the new
    logits. Returns how many logit groups have that width (activation sites are untouched)."""
    if strength <= 0:
        return 0
    net._rescale_initial(inverse=True)
    count = 0
    for alpha in net.alphas:
        if bits in alpha.precisions:
            alpha.alpha[alpha.precisions.index(bits)] += float(strength)
            count += 1
    net._rescale_initial()
    logger.info("search starts near %d bits (logit +%.3g in %d groups)", bits, strength, count)
    return count


def widest_width_within(net: Supernet, cost_model: str, absolute: float) -> int:
    """The widest non-zero weight width whose uniform plan costs at most ``absolute`` (the
    narrowest width when none does: the budget then needs pruning on top of it)."""
    widths = sorted({b for alpha in net.alphas for b in alpha.precisions if b > 0})
    sites = {s.tensor: s.quantizer.frozen_bits or s.quantizer.argmax_bits() for s in net.sites.values()}

    def cost(bits: int) -> float:
        layers = {name: (bits,) * len(entry.info.columns) for name, entry in net._layers.items()}
        return net.cost_of_plan(net.space.assemble(layers, sites), cost_model)

    fitting = [b for b in widths if cost(b) <= absolute]
    return max(fitting) if fitting else min(widths)
