"""Parity between the ONNX model in onnxruntime and its torch bridge, with fault location.

When the outputs differ, every node is re-checked *in isolation*: an fx interpreter runs the
torch module but feeds each node the onnxruntime values of its inputs, so errors upstream do
not accumulate and the first node whose own output is wrong is the one reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import torch
from torch import fx

from graph_passes.errors import ConversionError
from graph_passes.ort_utils import compare_outputs, make_session, random_feeds, run
from plugin.bridge.convert import BridgedModel, _graph_inputs

logger = logging.getLogger(__name__)


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _torch_outputs(bridged: BridgedModel, model: onnx.ModelProto,
                   feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    args = [torch.from_numpy(np.asarray(feeds[name])) for name in _graph_inputs(model)]
    with torch.no_grad():
        out = bridged.module(*args)
    outs = list(out) if len(model.graph.output) > 1 else [out]
    return [_to_numpy(o) for o in outs]


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return compare_outputs([got], [ref]).max_rel_error


class _IsolatingInterpreter(fx.Interpreter):
    """Runs each call_module node on reference inputs; records its own relative error."""

    def __init__(self, module: fx.GraphModule, reference: dict[str, np.ndarray]) -> None:
        super().__init__(module)
        self.reference = reference
        self.errors: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op != "call_module":
            return out
        names = self.module.get_submodule(n.target).onnx_mapping.outputs
        got = list(out) if len(names) > 1 else [out]
        refs = [self.reference.get(name) for name in names]
        errors = [_rel_error(_to_numpy(g), r) for g, r, name in zip(got, refs, names)
                  if name and r is not None]
        self.errors[n.target] = max(errors, default=0.0)
        if any(r is None for r, name in zip(refs, names) if name):
            return out
        subst = [torch.from_numpy(np.array(r)) if name else g for g, r, name in zip(got, refs, names)]
        return tuple(subst) if len(names) > 1 else subst[0]


def _reference_values(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every intermediate value, from onnxruntime with all node outputs exposed."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for name in node.output:
            if name and name not in present:
                exposed.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    names = [o.name for o in exposed.graph.output]
    return dict(zip(names, run(exposed, feeds)))


def locate_divergence(model: onnx.ModelProto, bridged: BridgedModel,
                      feeds: Mapping[str, np.ndarray], rtol: float) -> tuple[str, str, float]:
    """(ONNX node name, op type, isolated relative error) of the first node that is wrong.

    Falls back to the node with the largest isolated error when none exceeds ``rtol``.
    """
    reference = _reference_values(model, feeds)
    interp = _IsolatingInterpreter(bridged.module, reference)
    args = [torch.from_numpy(np.asarray(feeds[name])) for name in _graph_inputs(model)]
    with torch.no_grad():
        interp.run(*args)
    ops = {n.name or f"{n.op_type}_{i}": n.op_type for i, n in enumerate(model.graph.node)}
    worst = ("", "", -1.0)
    for onnx_name, module_name in bridged.node_map.items():
        error = interp.errors.get(module_name, 0.0)
        if error > rtol:
            return onnx_name, ops.get(onnx_name, "?"), error
        if error > worst[2]:
            worst = (onnx_name, ops.get(onnx_name, "?"), error)
    return worst


def check_parity(model: onnx.ModelProto, bridged: BridgedModel,
                 feeds: Mapping[str, np.ndarray] | None = None, rtol: float = 1e-4) -> float:
    """Max relative error (max|torch - ort| / max|ort|, worst output); raises when > ``rtol``.

    ``feeds`` default to random inputs of each input's dtype and (static) shape. On failure the
    ConversionError names the first diverging ONNX node, its op type and its own error.
    """
    session = make_session(model)
    feeds = dict(feeds) if feeds is not None else random_feeds(session)
    ref = run(session, feeds)
    got = _torch_outputs(bridged, model, feeds)
    comparison = compare_outputs(got, ref)
    if comparison.ok(rtol):
        logger.info("parity ok: max relative error %.3g (rtol %g)", comparison.max_rel_error, rtol)
        return comparison.max_rel_error
    # an output near zero turns float32 rounding into a large relative error: accept what the
    # ONNX model's own noise floor (onnxruntime optimised vs not) explains (graph_passes.normalise)
    from graph_passes.normalise import NOISE_FACTOR, noise_floor

    floor = noise_floor(model, feeds, ref)
    if comparison.ok(NOISE_FACTOR * floor):
        logger.info("parity ok: max relative error %.3g is float rounding (the model's own noise floor %.3g)",
                    comparison.max_rel_error, floor)
        return comparison.max_rel_error
    output = model.graph.output[comparison.worst_output].name
    node, op_type, error = locate_divergence(model, bridged, feeds, rtol)
    where = (f"first diverging node {node!r} ({op_type}) has relative error {error:.3g} on its own"
             if error > rtol else
             f"no single node exceeds it (largest: {node!r} ({op_type}) {error:.3g}); errors accumulate, "
             "raise rtol for very deep models")
    raise ConversionError(
        f"torch bridge parity failed: relative error {comparison.max_rel_error:.3g} > {rtol:g} "
        f"on output {output!r}; {where}"
    )
