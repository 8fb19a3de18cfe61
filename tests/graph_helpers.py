"""Small helpers for graph-pass tests: build models from ONNX text with random weights, run the
pipeline (load -> normalise -> analyse) and the pruning oracle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graph_passes.channel_groups import ChannelAnalysis, analyse
from graph_passes.loading import load_model
from graph_passes.normalise import normalise
from graph_passes.prune import check_pruning, repair_removal


def build(text: str, seed: int = 0, **shapes: list[int]) -> onnx.ModelProto:
    """Parse ONNX text; every keyword becomes a random float32 initializer of that shape.
    Names ending in ``_pos`` get positive values (for BN variances)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        value = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("_pos"):
            value = np.abs(value) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, ChannelAnalysis]:
    result = normalise(load_model(model), verify=True)
    return result.model, analyse(result.model)


def group_of(analysis: ChannelAnalysis, layer_name_or_tensor: str):
    """The group whose producers include the layer (node name) or that produces the tensor."""
    for g in analysis.groups:
        for m in g.members_of("producer"):
            if layer_name_or_tensor in (m.node, m.tensor):
                return g
    raise KeyError(layer_name_or_tensor)


def oracle(model: onnx.ModelProto, analysis: ChannelAnalysis, seed: int = 0, rtol: float = 1e-4) -> int:
    """Check the oracle for every prunable group: a random subset, then all but one channel.
    Returns how many groups were checked."""
    rng = np.random.default_rng(seed)
    checked = 0
    for group in analysis.prunable_groups:
        if group.size < 2:
            continue
        k = int(rng.integers(1, group.size))
        subsets = [rng.choice(group.size, k, replace=False).tolist(), list(range(1, group.size))]
        for subset in subsets:
            removal = repair_removal(analysis, {group.id: subset})
            err = check_pruning(model, analysis, removal)
            assert err <= rtol, f"group {group.id} subset {subset}: rel error {err:.2e}"
        checked += 1
    return checked


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def ir_for(opset: int) -> int:
    return {17: 8, 18: 8, 19: 9, 20: 9, 21: 10}.get(opset, 8)
