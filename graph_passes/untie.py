"""Give every weight layer its own weight and bias initializers.

Exporters share initializers between layers: torch's legacy exporter deduplicates identical
tensors (all-zero biases of squeeze-excitation convs, say), and tied weights are shared on
purpose. Each weight layer is trained, pruned and quantized on its own, so each gets its own
copy; what the model computes does not change.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from .op_rules import weight_rule

logger = logging.getLogger(__name__)


def untie_weight_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(model, copies made). The input model is not modified."""
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(i for node in model.graph.node for i in node.input if i in inits)
    shared = {name for name, n in uses.items() if n > 1}
    if not shared:
        return model, 0
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    taken = set(inits) | {o for node in work.graph.node for o in node.output}
    copies = 0
    seen: set[str] = set()
    for index, node in enumerate(work.graph.node):
        if weight_rule(node) is None:
            continue
        for slot in (1, 2):
            if len(node.input) <= slot or node.input[slot] not in shared:
                continue
            name = node.input[slot]
            if name not in seen:  # the first weight layer keeps the original
                seen.add(name)
                continue
            new = f"{name}__{node.name or index}"
            while new in taken:
                new += "_"
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = new
            work.graph.initializer.append(tensor)
            taken.add(new)
            node.input[slot] = new
            copies += 1
    logger.info("gave %d weight layer(s) their own copy of a shared initializer", copies)
    return work, copies
