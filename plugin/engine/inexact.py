"""Inexact groups in the fake-quantized engine: statistics over the kept hidden channels only.

A frozen plan zeroes a pruned channel's weights and gates its bias; for exact groups that is
what structural pruning computes. A pruned channel of an *inexact* group (the residual hidden
width, ``graph_passes.op_rules.norms``) still takes part in the LayerNorm / mean statistics of
the torch module (it is zero, or a position-embedding constant, not absent), so the engine would
train, and the gate would compare with, a different function from the exported model. This
module installs forward hooks on the bridged modules of those nodes
(``ChannelAnalysis.inexact_nodes``) that compute over the kept channels only, exactly as the
pruned ONNX model does:

* ``LayerNormalization`` (``nn.LayerNorm``): mean and variance over the kept channels; the
  removed positions output zero (their consumers are masked by the activation sites anyway);
* ``ReduceMean`` over the channel axis: the sum over the kept channels / their count.

* an embedding ``Gather``: the table's pruned columns are set to zero in the engine's raw table
  and kept there (their gradient is masked), so its per-row INT8 scales are those of the kept
  columns, as in the exported table (the pruned columns' values are gone from the engine).
Torch is imported here; ``install_inexact_masks(engine, plan)`` is called once the plan is
frozen for QAT (``plugin.api``); a plan that keeps every inexact channel removes the hooks.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graph_passes.channel_groups import ChannelAnalysis
from graph_passes.errors import PlanError

logger = logging.getLogger(__name__)

_HANDLES = "_prunequant_inexact_hooks"


def removed_atoms(analysis: ChannelAnalysis, plan: Any) -> np.ndarray:
    """Bool per atom: the plan removes it (its group channel is not kept)."""
    removed = np.zeros(analysis.atoms.count, dtype=bool)
    for group_id, group_plan in plan.groups.items():
        group = analysis.group(group_id)
        kept = set(int(c) for c in group_plan.kept)
        for c in range(group.size):
            if c not in kept:
                removed[group.channel_atoms[c]] = True
    return removed


def _layer_norm_hook(keep: Tensor):
    def hook(module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        m = keep.to(device=x.device, dtype=x.dtype)
        k = m.sum()
        mean = (x * m).sum(-1, keepdim=True) / k
        centred = (x - mean) * m
        var = (centred * centred).sum(-1, keepdim=True) / k
        y = centred / torch.sqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y * m

    return hook


def _mean_hook(keep: Tensor, axis: int):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        shape = [1] * x.dim()
        shape[axis] = -1
        m = keep.to(device=x.device, dtype=x.dtype).reshape(shape)
        total = (x * m).sum(dim=axis, keepdim=True) / m.sum()
        return total.reshape(output.shape)

    return hook


def _zero_columns(net: nn.Module, qualified: str, keep: Tensor):
    """Zero the pruned columns of a (parametrized) table and keep them zero; the hook handle."""
    owner, _, attr = qualified.rpartition(".")
    module = net.get_submodule(owner) if owner else net
    parametrizations = getattr(module, "parametrizations", None)
    raw = parametrizations[attr].original if parametrizations is not None and attr in parametrizations \
        else getattr(module, attr)
    if raw.dim() != 2 or raw.shape[1] != keep.shape[0]:
        raise PlanError(f"embedding table {qualified!r}: shape {tuple(raw.shape)} does not match "
                        f"{keep.shape[0]} hidden channels")
    mask = keep.to(device=raw.device, dtype=raw.dtype)
    with torch.no_grad():
        raw.mul_(mask)
    return raw.register_hook(lambda grad: grad * mask) if raw.requires_grad else None


def install_inexact_masks(engine: Any, plan: Any) -> int:
    """Hook the engine's norm / mean modules of inexact groups for ``plan``; returns how many.

    ``engine``: a FakeQuantModel (or Supernet) with ``.net``, ``.bridged`` and ``.space``."""
    analysis: ChannelAnalysis = engine.space.analysis
    net: nn.Module = engine.net
    for handle in getattr(net, _HANDLES, []):
        handle.remove()
    handles: list = []
    object.__setattr__(net, _HANDLES, handles)
    if not analysis.inexact_nodes:
        return 0
    removed = removed_atoms(analysis, plan)
    graph = analysis.graph
    for node_name, tensor in analysis.inexact_nodes:
        layout = analysis.layouts.get(tensor)
        if layout is None:
            continue
        keep_np = ~removed[layout.atoms]
        if keep_np.all():
            continue
        node = graph.nodes[node_name]
        module_name = engine.bridged.node_map.get(node_name)
        module = net.get_submodule(module_name) if module_name else None
        keep = torch.as_tensor(keep_np)
        if node.op_type == "LayerNormalization" and isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(_layer_norm_hook(keep)))
        elif node.op_type == "ReduceMean" and module is not None:
            handles.append(module.register_forward_hook(_mean_hook(keep, layout.axis)))
        elif node.op_type == "Gather" and engine.bridged.param_map.get(node.input[0]):
            handle = _zero_columns(net, engine.bridged.param_map[node.input[0]], keep)
            if handle is not None:
                handles.append(handle)
        else:
            raise PlanError(f"{node.op_type} node '{node_name}': the torch engine cannot restrict its statistics "
                            "to the kept hidden channels; compress without --inexact-hidden-width")
    logger.info("inexact groups: %d norm/mean module(s) and table(s) restricted to the kept channels", len(handles))
    return len(handles)


__all__ = ["install_inexact_masks", "removed_atoms"]
