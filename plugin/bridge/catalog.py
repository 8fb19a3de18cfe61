"""Registers every bridge converter once, and reports a model's op coverage before converting."""

from __future__ import annotations

import importlib
import logging
from collections import Counter

import onnx

from graph_passes.errors import ConversionError
from plugin.bridge import registry

logger = logging.getLogger(__name__)

_OP_MODULES = ("ops_layers", "ops_norm", "ops_reduce", "ops_shape", "ops_pool", "ops_resize", "ops_recurrent",
               "ops_misc", "ops_control", "ops_attention_ms")
_state: dict = {"registered": False, "opsets": {}}


def ensure_registered() -> None:
    """Import the converter modules (they register on import) and the alias table, once."""
    if _state["registered"]:
        return
    for name in _OP_MODULES:
        importlib.import_module(f"plugin.bridge.{name}")
    from plugin.bridge.aliases import register_aliases

    register_aliases()
    _state["registered"] = True


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    return opsets


def coverage(model: onnx.ModelProto) -> list[tuple[str, int, int, bool]]:
    """(op, schema version, node count, supported) for every op the model's main graph uses.

    Custom-domain ops are listed as ``domain::op``.
    """
    ensure_registered()
    opsets = _opsets(model)
    counts: Counter[tuple[str, str]] = Counter((n.domain, n.op_type) for n in model.graph.node)
    rows = []
    for (domain, op_type), count in sorted(counts.items()):
        key = "" if domain == "ai.onnx" else domain
        version = registry.resolve_version(op_type, opsets.get(key, 0), key)
        supported = registry.lookup(op_type, version, key) is not None
        label = op_type if not key else f"{key}::{op_type}"
        rows.append((label, version, count, supported))
    return rows


def current_opsets() -> dict[str, int]:
    """The opsets of the model whose coverage was checked last (the one being converted): the
    control-flow converters give a subgraph's model the same opsets."""
    return dict(_state["opsets"])


def check_coverage(model: onnx.ModelProto) -> None:
    """Raise one-line ConversionError listing every unsupported (op, version, count)."""
    _state["opsets"] = _opsets(model)
    missing = [row for row in coverage(model) if not row[3]]
    if missing:
        listed = ", ".join(f"{op}-{version} x{count}" for op, version, count, _ in missing)
        raise ConversionError(
            f"model {model.graph.name or '<unnamed>'!r} uses ops the torch bridge cannot "
            f"convert: {listed}; add converters in plugin/bridge or rewrite these nodes"
        )
