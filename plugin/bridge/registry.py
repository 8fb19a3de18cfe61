"""Where the bridge's converters meet onnx2torch's registry.

onnx2torch looks a converter up by the exact ``since_version`` of the op's schema in the model's
opset. We add converters in two ways:

* a version onnx2torch does not know is registered for good with ``add_converter``
  (harmless to other users: it only adds entries);
* a version onnx2torch already converts, but wrongly or untrainably, gets an *override* that
  is active only inside :func:`active_overrides`, so plain ``onnx2torch.convert`` is unchanged.

Inside :func:`active_overrides` every converter is wrapped so that a failure names the node.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from onnx import defs
from onnx2torch.node_converters import registry as o2t_registry
from onnx2torch.node_converters.registry import OperationDescription, TConverter, add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult

from graph_passes.errors import ConversionError, PrunequantError
from plugin.bridge._common import node_label

logger = logging.getLogger(__name__)

_OVERRIDES: dict[OperationDescription, TConverter] = {}
_ADDED: set[OperationDescription] = set()
_ORIGINALS: dict[OperationDescription, TConverter] = {}


def _table() -> dict[OperationDescription, TConverter]:
    return o2t_registry._CONVERTER_REGISTRY  # pylint: disable=protected-access


def register(op_type: str, *versions: int) -> Callable[[TConverter], TConverter]:
    """Decorator: our converter for ``op_type`` at each schema version in ``versions``."""

    def deco(converter: TConverter) -> TConverter:
        for version in versions:
            key = OperationDescription(domain="", operation_type=op_type, version=version)
            if key in _OVERRIDES or key in _ADDED:
                raise ValueError(f"bridge converter {key} registered twice")
            if key in _table():
                _ORIGINALS[key] = _table()[key]
                _OVERRIDES[key] = converter
            else:
                add_converter(op_type, version)(converter)
                _ADDED.add(key)
        return converter

    return deco


def lookup(op_type: str, version: int, domain: str = "") -> TConverter | None:
    """The converter the bridge uses for a schema version (overrides first), or None."""
    key = OperationDescription(domain=domain, operation_type=op_type, version=version)
    return _OVERRIDES.get(key) or _table().get(key)


def lookup_original(op_type: str, version: int) -> TConverter:
    """onnx2torch's own converter for a version we override (to delegate the cases it handles)."""
    key = OperationDescription(domain="", operation_type=op_type, version=version)
    return _ORIGINALS.get(key) or _table()[key]


def resolve_version(op_type: str, opset: int, domain: str = "") -> int:
    """The schema ``since_version`` an op has in a model importing ``opset`` for its domain."""
    try:
        return defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except (RuntimeError, defs.SchemaError):
        return opset


def is_overridden(op_type: str, version: int) -> bool:
    return OperationDescription("", op_type, version) in _OVERRIDES


def _annotated(converter: TConverter) -> TConverter:
    def wrapped(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        try:
            return converter(node, graph)
        except PrunequantError:
            raise
        except Exception as exc:  # onnx2torch raises bare NotImplementedError/KeyError/...
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise ConversionError(
                f"node {node_label(node)} cannot be converted to torch: {detail}"
            ) from exc

    return wrapped


@contextlib.contextmanager
def active_overrides() -> Iterator[None]:
    """Swap our overrides into onnx2torch's registry (all converters annotated) and restore."""
    table = _table()
    saved = dict(table)
    try:
        table.update(_OVERRIDES)
        for key, converter in list(table.items()):
            table[key] = _annotated(converter)
        yield
    finally:
        table.clear()
        table.update(saved)
