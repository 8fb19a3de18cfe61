"""The per-op rule registry, keyed by (domain, op_type) with opset ranges.

One rule object holds all knowledge of an op family: how channels flow through it
(:meth:`OpRule.propagate`), how to rewrite it when channels are removed
(:meth:`OpRule.prune`) and, for weight ops, the weight-layer facts
(:class:`~graph_passes.op_rules.weights.WeightOpRule`). An op without a registered rule blocks every channel it touches; there is
no other place in the code base that switches on op types.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import onnx

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import ModelGraph
    from .context import PropagationContext, PruneContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProductFacts:
    """An activation x activation product (Q K^T, attention x V): the inputs that are its two
    operands (each gets an activation quantization site) and its shape per sample: ``batch``
    the batched dims after the first (heads, ...), each an ``[m, k] x [k, n]`` product."""

    operands: tuple[int, int]
    batch: tuple[int, ...]
    m: int
    k: int
    n: int

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample: ``prod(batch) * m * k * n``."""
        return math.prod(self.batch) * self.m * self.k * self.n


@dataclass(frozen=True)
class EmbeddingFacts:
    """A look-up of rows of a constant float table (an embedding): ``table`` the initializer,
    ``rows`` x ``dim`` its shape; quantized per row (one scale per row)."""

    table: str
    rows: int
    dim: int


class OpRule:
    """Base rule: subclasses override :meth:`propagate`, and :meth:`prune` when they own constants.

    Quantization facets (default: none): :meth:`activation_product` for an op that multiplies two
    run-time activations, :meth:`embedding_table` for an op that looks rows up in a constant table.
    """

    def activation_product(self, node: onnx.NodeProto, graph: "ModelGraph") -> ProductFacts | None:
        """The node's facts when it multiplies two activations (shapes static), else None."""
        return None

    def embedding_table(self, node: onnx.NodeProto, graph: "ModelGraph") -> EmbeddingFacts | None:
        """The node's facts when it gathers whole rows of a constant float table, else None."""
        return None

    def propagate(self, name: str, node: onnx.NodeProto, ctx: "PropagationContext") -> None:
        raise NotImplementedError

    def prune(self, name: str, node: onnx.NodeProto, ctx: "PruneContext") -> None:
        """Rewrite the node's constants/attributes for the removed channels (default: nothing)."""


@dataclass(frozen=True)
class _Entry:
    first: int
    last: int | None
    rule: OpRule


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def register(*op_types: str, versions: tuple[int, int | None] = (1, None), domain: str = "",
             extends: bool = False):
    """Class decorator: instantiate the rule and register it for ``op_types`` in an opset range.

    ``extends``: the rule subclasses the one already registered for the same range and takes
    its place (op_rules/attention.py extends MatMul to activation x activation products)."""

    def deco(cls: type[OpRule]) -> type[OpRule]:
        rule = cls()
        for op in op_types:
            entries = _REGISTRY.setdefault((domain, op), [])
            if extends:
                same = [e for e in entries if (e.first, e.last) == versions]
                if len(same) != 1 or not isinstance(rule, type(same[0].rule)):
                    raise TypeError(f"{cls.__name__} must extend the one rule registered for {op} {versions}")
                entries.remove(same[0])
            entries.append(_Entry(versions[0], versions[1], rule))
        return cls

    return deco


def find_rule(domain: str, op_type: str, opset: int | None) -> OpRule | None:
    """The rule for ``op_type`` at ``opset`` (None: the rule of the newest opset range)."""
    domain = "" if domain == "ai.onnx" else domain
    entries = _REGISTRY.get((domain, op_type), [])
    if opset is None:
        open_ended = [e for e in entries if e.last is None]
        return open_ended[-1].rule if open_ended else (entries[-1].rule if entries else None)
    for entry in entries:
        if entry.first <= opset and (entry.last is None or opset <= entry.last):
            return entry.rule
    return None


def registered_ops() -> list[str]:
    return sorted(op for (_, op) in _REGISTRY)


RuleFactory = Callable[[], OpRule]
