"""Op versions whose semantics equal an older, already-converted version.

Every entry was checked against ``onnx.defs.get_schema(op, v)`` and the ONNX changelog: the
inputs, outputs and attributes are unchanged and only type constraints grew (or a new
attribute only matters for types torch has no kernels for, which is guarded). Versions that
changed meaning (Pad 18/19, Split 18, Resize 18/19, Reduce* 18, AveragePool 19) have their own
converters and are *not* here. ``tests/test_bridge_ops.py`` re-checks every entry's schema.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult

from plugin.bridge import registry
from plugin.bridge._common import unsupported

logger = logging.getLogger(__name__)

_BF16 = "adds bfloat16 only"
_F8 = "adds float8 types only"
_I4 = "adds int4/uint4 (and float8) types only"
_F4 = "adds float4e2m1 only"
_E8M0 = "adds float8e8m0 only"
_I2 = "adds int2/uint2 only"


@dataclass(frozen=True)
class Alias:
    """``op`` at the aliased version is converted by the converter of ``target``."""

    target: int
    reason: str
    # attribute -> values we accept; other values change semantics, so they are refused
    allowed: dict[str, tuple] = field(default_factory=dict)


def _chain(op: str, first_target: int, steps: dict[int, str]) -> dict[tuple[str, int], Alias]:
    return {(op, v): Alias(first_target, why) for v, why in steps.items()}


_TYPE_CHAIN = {19: _F8, 21: _I4, 23: _F4, 24: _E8M0, 25: _I2}

ALIASES: dict[tuple[str, int], Alias] = {
    **{(op, 22): Alias(7, _BF16) for op in ("Acos", "Asin", "Atan", "Cos", "Sin", "Tan")},
    ("Elu", 22): Alias(6, _BF16),
    ("Selu", 22): Alias(6, _BF16),
    ("HardSigmoid", 22): Alias(6, _BF16),
    ("HardSwish", 22): Alias(14, _BF16),
    ("Softplus", 22): Alias(1, _BF16),
    ("Softsign", 22): Alias(1, _BF16),
    ("Round", 22): Alias(11, _BF16),
    ("EyeLike", 22): Alias(9, _BF16),
    ("GlobalAveragePool", 22): Alias(1, _BF16),
    ("InstanceNormalization", 22): Alias(6, _BF16),
    ("RoiAlign", 22): Alias(16, _BF16),
    ("Conv", 22): Alias(11, _BF16),
    ("ConvTranspose", 22): Alias(11, _BF16),
    ("MaxPool", 22): Alias(12, _BF16),
    ("AveragePool", 22): Alias(19, _BF16),
    ("TopK", 24): Alias(11, _BF16),
    ("Dropout", 22): Alias(13, "adds bfloat16/float8 types only"),
    ("IsInf", 20): Alias(10, "adds bfloat16/float16/float8 input types only"),
    ("IsNaN", 20): Alias(13, _F8),
    ("Equal", 19): Alias(13, "adds string only (torch has no string tensors anyway)"),
    ("ReduceMax", 20): Alias(18, "adds bool only"),
    ("ReduceMin", 20): Alias(18, "adds bool only"),
    ("ScatterND", 18): Alias(
        16, "adds reduction='max'/'min' only; those are refused", {"reduction": ("none", "add", "mul")}
    ),
    ("ConstantOfShape", 20): Alias(9, "adds bfloat16 and float8 types only"),
    **{("ConstantOfShape", v): Alias(9, why) for v, why in _TYPE_CHAIN.items() if v > 20},
    **{(op, v): Alias(t, why) for op, t in (("Constant", 13), ("Identity", 16), ("Shape", 15))
       for v, why in _TYPE_CHAIN.items()},
    **{(op, v): Alias(t, why) for op, t in (("Flatten", 13), ("Transpose", 13), ("Unsqueeze", 13))
       for v, why in _TYPE_CHAIN.items() if v >= 21},
    **{("Squeeze", v): Alias(21, why) for v, why in _TYPE_CHAIN.items() if v >= 23},
    # saturate (19) only applies to float8 targets and round_mode (24) only to float8e8m0;
    # onnx2torch's Cast refuses those target types, so the defaults are all that can reach it.
    ("Cast", 19): Alias(13, "adds float8 types and 'saturate' (float8 targets only)"),
    ("Cast", 21): Alias(13, _I4),
    ("Cast", 23): Alias(13, _F4),
    ("Cast", 24): Alias(13, "adds float8e8m0 and 'round_mode' (float8e8m0 targets only)"),
    ("Cast", 25): Alias(13, _I2),
}


def _alias_converter(op_type: str, alias: Alias):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for attr, allowed in alias.allowed.items():
            if attr in node.attributes and node.attributes[attr] not in allowed:
                raise unsupported(node, f"{attr}={node.attributes[attr]!r}")
        target = registry.lookup(op_type, alias.target)
        if target is None:
            raise unsupported(node, f"{op_type}-{alias.target} (alias target missing)")
        return target(node, graph)

    return convert


def register_aliases() -> None:
    for (op_type, version), alias in ALIASES.items():
        registry.register(op_type, version)(_alias_converter(op_type, alias))
        logger.debug("alias %s-%d -> %d: %s", op_type, version, alias.target, alias.reason)
