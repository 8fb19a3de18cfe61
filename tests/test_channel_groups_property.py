"""Property test: on random small CNN graphs built from the supported op families, the pruning
oracle holds for every prunable group (random subsets and all-but-one)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from .graph_helpers import oracle, prepare

BLOCKS = ["conv", "residual", "concat", "depthwise", "grouped", "scale", "pool", "slice", "bn", "unary"]


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, shape, positive: bool = False) -> str:
        value = self.rng.standard_normal(shape).astype(np.float32) * 0.5
        if positive:
            value = np.abs(value) + 0.5
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        w = self.const([cout, cin // group, k, k])
        b = self.const([cout])
        return self.node("Conv", [x, w, b], pads=[k // 2] * 4, group=group)

    def apply(self, block: str, x: str, c: int, width: int) -> tuple[str, int]:
        if block == "conv":
            return self.node("Relu", [self.conv(x, c, width)]), width
        if block == "residual":
            return self.node("Add", [x, self.conv(x, c, c)]), c
        if block == "concat":
            return self.node("Concat", [x, self.conv(x, c, width)], axis=1), c + width
        if block == "depthwise":
            return self.conv(x, c, c, group=c), c
        if block == "grouped" and c % 2 == 0:
            return self.conv(x, c, c, group=2), c
        if block == "scale":
            return self.node("Mul", [x, self.const([c, 1, 1])]), c
        if block == "pool":
            return self.node("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c
        if block == "slice" and c >= 3:
            starts, ends, axes = (self.name("s") for _ in range(3))
            for name, v in ((starts, [1]), (ends, [c]), (axes, [1])):
                self.inits.append(numpy_helper.from_array(np.array(v, np.int64), name))
            return self.node("Slice", [x, starts, ends, axes]), c - 1
        if block == "bn":
            params = [self.const([c]), self.const([c]), self.const([c]), self.const([c], positive=True)]
            return self.node("BatchNormalization", [x, *params]), c
        if block == "unary":
            return self.node("Sigmoid", [x]), c
        return x, c

    def model(self, blocks: list[tuple[str, int]]) -> onnx.ModelProto:
        x, c = self.conv("x", 3, 4), 4
        for block, width in blocks:
            x, c = self.apply(block, x, c, width)
        pooled = self.node("GlobalAveragePool", [x])
        flat = self.node("Flatten", [pooled])
        w, b = self.const([5, c]), self.const([5])
        self.nodes.append(helper.make_node("Gemm", [flat, w, b], ["y"], transB=1, name="head"))
        graph = helper.make_graph(
            self.nodes, "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(2, 6)), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_oracle_holds_on_random_graphs(blocks, seed):
    model, analysis = prepare(_Builder(seed).model(blocks))
    oracle(model, analysis, seed=seed)
    # the first conv always feeds something prunable unless a graph output or wall intervenes
    assert analysis.groups
