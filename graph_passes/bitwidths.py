"""The bit-widths prunequant can write: the one place they are defined.

The export path (``graph_passes.qdq``) packs weights as INT8 / INT4 (opset 21) / INT2 (opset 25)
and quantizes activations to UINT/INT 8, 4 or 2 bits. Every other module (plans, the search space,
the CLI's ``--weight-bits`` / ``--act-bits``) takes its allowed widths from here.
"""

from __future__ import annotations

#: weight widths a channel can be exported at (0, "pruned", is a search option, not a width)
WEIGHT_BITS: tuple[int, ...] = (2, 4, 8)
#: activation widths a site can be exported at
ACTIVATION_BITS: tuple[int, ...] = (2, 4, 8)
#: the precision of a weight channel that is removed
PRUNED = 0
#: the reference every relative cost is measured against (all weights and activations at 8 bits)
BASELINE_BITS = 8
