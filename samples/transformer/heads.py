"""Count the attention heads left in an exported ``transformer`` sample (plain or QDQ ONNX).

Per block: the heads of the Q, K and V splits (the H entry of each ``Reshape`` to
[-1, S, H, Dh]), the width of the merge ``Reshape`` back to [-1, S, H * Dh], and the input
columns of the output projection's weight (read through a DequantizeLinear when quantized).

    python samples/transformer/heads.py OUT.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TOKENS, HEAD_DIM = 8, 8


def head_counts(model: onnx.ModelProto | str | Path) -> list[dict[str, object]]:
    """One entry per block, in graph order: ``{"split_heads": [hq, hk, hv], "merge_width": w,
    "out_proj_columns": c}``; ``heads`` = hq when the three agree and ``w == c == hq * Dh``."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def const(name: str) -> np.ndarray | None:
        tensor = inits.get(name) if name in inits else consts.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def weight_rows(name: str) -> int | None:
        """dim 0 of a MatMul's constant B, through DequantizeLinear and a copying Reshape."""
        value = const(name)
        if value is not None:
            return int(value.shape[0])
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            value = const(node.input[0])
            return None if value is None else int(value.shape[0])
        if node is not None and node.op_type == "Reshape":  # low-bit weights: DQ then Reshape [0, 0]
            target = const(node.input[1])
            if target is not None and target.size and (target == 0).all():
                return weight_rows(node.input[0])
            return int(target[0]) if target is not None and target.size and target[0] > 0 else None
        return None

    def downstream_matmul(name: str) -> onnx.NodeProto | None:
        """The MatMul that reads ``name`` (through QuantizeLinear, DequantizeLinear, Clip)."""
        for node in consumers.get(name, []):
            if node.op_type == "MatMul" and node.input[0] == name:
                return node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
                found = downstream_matmul(node.output[0])
                if found is not None:
                    return found
        return None

    blocks: list[dict[str, object]] = []
    splits: list[int] = []
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        target = const(node.input[1])
        if target is None:
            continue
        if target.size == 4 and int(target[1]) == TOKENS and int(target[3]) == HEAD_DIM:
            splits.append(int(target[2]))
        elif target.size == 3 and int(target[1]) == TOKENS and splits:
            out_proj = downstream_matmul(node.output[0])
            columns = weight_rows(out_proj.input[1]) if out_proj is not None else None
            entry: dict[str, object] = {"split_heads": splits, "merge_width": int(target[2]),
                                        "out_proj_columns": columns}
            consistent = len(set(splits)) == 1 and columns == int(target[2]) == splits[0] * HEAD_DIM
            entry["heads"] = splits[0] if consistent else None
            blocks.append(entry)
            splits = []
    return blocks


if __name__ == "__main__":
    for i, block in enumerate(head_counts(sys.argv[1])):
        print(f"block {i}: {block}")
