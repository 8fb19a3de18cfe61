"""ONNX -> torch.fx conversion with initializer and node name maps."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx2torch
from onnx2torch.onnx_graph import OnnxGraph, ValueType
import torch
from torch import fx, nn

from graph_passes.errors import ConversionError, PrunequantError
from plugin.bridge import registry
from plugin.bridge._common import BINDINGS_ATTR, ParamBinding
from plugin.bridge.catalog import check_coverage, ensure_registered

logger = logging.getLogger(__name__)

_INITIALIZERS = "initializers"


@dataclass
class BridgedModel:
    """A converted model.

    ``param_map``: ONNX initializer name -> qualified torch parameter/buffer name.
    ``node_map``: ONNX node name (``<op>_<index>`` for unnamed nodes) -> torch submodule name.
    ``layouts``: initializer name -> how the torch tensor maps back to the ONNX layout.
    """

    module: fx.GraphModule
    param_map: dict[str, str]
    node_map: dict[str, str]
    layouts: dict[str, ParamBinding] = field(default_factory=dict)


def _named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique, non-empty name and no initializer is an input."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    inits = {i.name for i in named.graph.initializer}
    kept = [i for i in named.graph.input if i.name not in inits]
    del named.graph.input[:]
    named.graph.input.extend(kept)
    used = {n.name for n in named.graph.node if n.name}
    for index, node in enumerate(named.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)
    return named


def _value_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """ONNX value name -> fx node producing it (adding getitem nodes for multi-output ops)."""
    values: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        outputs = gm.get_submodule(node.target).onnx_mapping.outputs
        if len(outputs) == 1:
            values[outputs[0]] = node
            continue
        with gm.graph.inserting_after(node):
            for index, name in enumerate(outputs):
                if name:
                    values[name] = gm.graph.call_function(operator.getitem, (node, index))
    return values


def _fix_outputs(gm: fx.GraphModule, model: onnx.ModelProto) -> None:
    """Make the module return exactly the ONNX graph outputs, in order.

    onnx2torch returns one entry per *producing node*, so a multi-output node (Split) feeding
    the outputs returns a tuple in place of its values.
    """
    values = _value_nodes(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = _graph_inputs(model)
    values.update(dict(zip(inputs, placeholders)))
    try:
        outs = [values[o.name] for o in model.graph.output]
    except KeyError as exc:
        raise ConversionError(f"graph output {exc} is not produced by a node or an input") from exc
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    output_node.args = (outs[0] if len(outs) == 1 else tuple(outs),)
    gm.recompile()


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _node_map(named: onnx.ModelProto) -> dict[str, str]:
    o2t_names = list(OnnxGraph(named.graph).nodes)
    return {node.name: o2t for node, o2t in zip(named.graph.node, o2t_names)}


def _buffer_map(gm: fx.GraphModule, named: onnx.ModelProto) -> dict[str, list[str]]:
    """Initializer -> qualified names of the buffers onnx2torch made from it, in its order."""
    graph = OnnxGraph(named.graph)
    container = gm.get_submodule(_INITIALIZERS) if hasattr(gm, _INITIALIZERS) else nn.Module()
    found: dict[str, list[str]] = {}
    count = 0
    for unique_name in graph.nodes:
        module = gm.get_submodule(unique_name)
        for value in module.onnx_mapping.inputs:
            if graph.value_type(value) != ValueType.GRAPH_INITIALIZER:
                continue
            buffer_name = f"onnx_initializer_{count}"
            count += 1
            buffer = getattr(container, buffer_name, None)
            expected = graph.initializers[value].to_numpy()
            if buffer is None or not np.array_equal(buffer.numpy(), expected, equal_nan=True):
                raise ConversionError(f"internal: buffer for initializer {value!r} not found")
            found.setdefault(value, []).append(f"{_INITIALIZERS}.{buffer_name}")
    return found


def _tensor_at(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """The parameter or buffer at a qualified name (shared parameters included)."""
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def _share_tensor(gm: fx.GraphModule, target: str, source: str) -> None:
    """Make the tensor at ``target`` the same object as the one at ``source`` (tied weights)."""
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name)
    tensor = _tensor_at(gm, source)
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attr, tensor)
    else:
        owner.register_buffer(attr, tensor)


def _collect_maps(gm: fx.GraphModule, named: onnx.ModelProto, node_map: dict[str, str]):
    param_map: dict[str, str] = {}
    layouts: dict[str, ParamBinding] = {}
    for module_name in node_map.values():
        for binding in getattr(gm.get_submodule(module_name), BINDINGS_ATTR, ()):
            qualified = f"{module_name}.{binding.attr}"
            first = layouts.get(binding.initializer)
            if first is None:
                param_map[binding.initializer] = qualified
                layouts[binding.initializer] = binding
            elif first.transpose != binding.transpose:
                raise ConversionError(
                    f"initializer {binding.initializer!r} is used with two layouts "
                    f"({param_map[binding.initializer]} and {qualified}); untie it before bridging"
                )
            else:
                _share_tensor(gm, qualified, param_map[binding.initializer])
    for init, buffers in _buffer_map(gm, named).items():
        if init in param_map:
            # The initializer is a trained parameter of one node and a plain constant of others
            # (exporters merge equal tensors: a LayerNorm's zero bias read by bias Adds too).
            # write_back stores the trained value once, so every reader must see that value
            # during training as well: the constants become the parameter itself.
            binding = layouts[init]
            param = _tensor_at(gm, param_map[init])
            for duplicate in buffers:
                if binding.transpose or tuple(gm.get_buffer(duplicate).shape) != tuple(param.shape):
                    raise ConversionError(
                        f"initializer {init!r} is both a layer's parameter ({param_map[init]}) and, in "
                        "another layout, a constant of other nodes; untie it before bridging")
                _share_tensor(gm, duplicate, param_map[init])
            continue
        for duplicate in buffers[1:]:
            _share_tensor(gm, duplicate, buffers[0])
        param_map.setdefault(init, buffers[0])
    return param_map, layouts


def convert(model: onnx.ModelProto) -> BridgedModel:
    """Convert an ONNX model to an fx GraphModule (eval mode) with name maps.

    Raises ConversionError listing every unsupported op (checked before converting) or naming
    the node whose converter failed. Run :func:`check_parity` before using the result.
    """
    ensure_registered()
    check_coverage(model)
    named = _named_copy(model)
    with registry.active_overrides():
        try:
            gm = onnx2torch.convert(named, attach_onnx_mapping=True)
        except PrunequantError:
            raise
        except Exception as exc:
            raise ConversionError(f"onnx2torch failed: {' '.join(str(exc).split())}") from exc
    gm.eval()
    _fix_outputs(gm, named)
    node_map = _node_map(named)
    param_map, layouts = _collect_maps(gm, named, node_map)
    logger.info("bridged %d nodes, %d initializers mapped (%d as parameters)",
                len(node_map), len(param_map), len(layouts))
    return BridgedModel(module=gm, param_map=param_map, node_map=node_map, layouts=layouts)
