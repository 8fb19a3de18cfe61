"""Resize 11/13/18/19 as separable per-axis interpolation matrices.

Each resized axis gets a dense [out, in] matrix built in numpy with the formulas of the ONNX
reference implementation (coordinate transforms, nearest modes, linear/cubic kernels,
antialias, exclude_outside); the torch module multiplies by it (nearest: index_select), so
every mode is exact and differentiable. Overrides onnx2torch's 11/13 converter, which maps
every mode onto ``F.interpolate`` and only *warns* when the result differs.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import const_input, dynamic_mapping, full_mapping, input_name, result, unsupported

logger = logging.getLogger(__name__)

_TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


@dataclass(frozen=True)
class ResizeConfig:
    mode: str
    transform: str
    nearest_mode: str
    cubic_a: float
    exclude_outside: bool
    antialias: bool
    policy: str
    axes: tuple[int, ...] | None


def _x_original(cfg: ResizeConfig, out: int, size: int, scale: float) -> np.ndarray:
    """Source coordinate of every output index, in float32 with the output's integer length,
    as onnxruntime computes it (the ONNX reference uses float64 and ``scale * size``)."""
    f32 = np.float32
    y, s = np.arange(out, dtype=f32), f32(scale)
    half = f32(0.5)
    if cfg.transform == "align_corners":
        return np.zeros(out, f32) if out == 1 else y * f32(size - 1) / f32(out - 1)
    if cfg.transform == "asymmetric":
        return y / s
    if cfg.transform == "pytorch_half_pixel":
        return np.full(out, -half, f32) if out == 1 else (y + half) / s - half
    offset = f32(0.0)
    if cfg.transform == "half_pixel_symmetric":
        offset = f32(size) / 2 * (1 - f32(out) / (s * f32(size)))
    return offset + (y + half) / s - half


def _coeffs(cfg: ResizeConfig, ratio: float, scale: float) -> np.ndarray:
    if cfg.mode == "nearest":
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        pick_right = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5,
                      "floor": False, "ceil": True}[cfg.nearest_mode]
        return np.array([0.0, 1.0]) if pick_right else np.array([1.0, 0.0])
    support = 1 if cfg.mode == "linear" else 2
    s = min(scale, 1.0) if cfg.antialias else 1.0
    start = int(np.floor(-support / s) + 1)
    taps = (np.arange(start, 1 - start + 1) - ratio) * s if cfg.antialias else (
        np.arange(1 - support, support + 1) - ratio)
    if cfg.mode == "linear":
        weights = np.clip(1 - np.abs(taps), 0, 1)
    else:
        t, a = np.abs(taps), cfg.cubic_a
        weights = np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                           np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))
    return weights / weights.sum() if cfg.antialias else weights


@functools.lru_cache(maxsize=256)
def axis_matrix(cfg: ResizeConfig, size: int, out: int, scale: float) -> np.ndarray:
    """[out, size] matrix: output samples as weighted sums of input samples along one axis."""
    x_ori = _x_original(cfg, out, size, scale).astype(np.float64)
    x_int = np.floor(x_ori)
    ratios = np.where(x_ori == x_int, 1.0, x_ori - x_int)
    coeffs = np.stack([_coeffs(cfg, float(r), scale) for r in ratios])
    n = coeffs.shape[1]
    pad = int(np.ceil(n / 2))
    padded = x_ori + pad
    base = np.floor(padded)
    frac = padded - base
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    index = (base + offset).astype(np.int64)[:, None] + np.arange(n)[None, :] - pad
    if cfg.exclude_outside:
        coeffs = np.where((index < 0) | (index >= size), 0.0, coeffs)
        sums = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(sums == 0, 1.0, sums)
    matrix = np.zeros((out, size))
    rows = np.repeat(np.arange(out), n)
    np.add.at(matrix, (rows, np.clip(index, 0, size - 1).reshape(-1)), coeffs.reshape(-1))
    return matrix


def _plan(cfg: ResizeConfig, shape: list[int], scales: list[float] | None,
          sizes: list[int] | None) -> list[tuple[int, int, float]]:
    """(axis, output size, scale) for every axis that is resized."""
    rank = len(shape)
    axes = [a + rank if a < 0 else a for a in (cfg.axes or range(rank))]
    if sizes:
        factors = [sizes[i] / shape[a] for i, a in enumerate(axes)]
        outs = list(sizes)
        if cfg.policy != "stretch":
            pick = min(factors) if cfg.policy == "not_larger" else max(factors)
            factors = [pick] * len(axes)
            outs = [int(pick * shape[a] + 0.5) for a in axes]
    else:
        factors = list(scales)
        outs = [int(math.floor(f * shape[a])) for f, a in zip(factors, axes)]
    return [(a, o, f) for a, o, f in zip(axes, outs, factors)
            if not (math.isclose(f, 1.0) and o == shape[a])]


def _values(value) -> list[float] | None:
    if value is None:
        return None
    flat = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else list(np.asarray(value).reshape(-1))
    return flat or None


class OnnxResize(nn.Module):
    """ONNX Resize with fixed or runtime scales/sizes (roi unused outside tf_crop_and_resize)."""

    def __init__(self, cfg: ResizeConfig, scales: list[float] | None, sizes: list[int] | None) -> None:
        super().__init__()
        self.cfg, self.scales, self.sizes = cfg, scales, sizes

    def forward(self, x: torch.Tensor, roi=None, scales=None, sizes=None) -> torch.Tensor:  # noqa: D102
        del roi
        scale_list = _values(scales) if scales is not None else self.scales
        size_list = _values(sizes) if sizes is not None else self.sizes
        size_list = None if size_list is None else [int(s) for s in size_list]
        for axis, out, factor in _plan(self.cfg, list(x.shape), scale_list, size_list):
            matrix = axis_matrix(self.cfg, x.shape[axis], out, float(factor))
            if self.cfg.mode == "nearest":
                index = torch.as_tensor(matrix.argmax(axis=1), device=x.device)
                x = torch.index_select(x, axis, index)
            else:
                weights = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
                x = torch.movedim(torch.movedim(x, axis, -1) @ weights.T, -1, axis)
        return x


def _config(node: OnnxNode) -> ResizeConfig:
    attrs = node.attributes
    cfg = ResizeConfig(
        mode=attrs.get("mode", "nearest"),
        transform=attrs.get("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=attrs.get("nearest_mode", "round_prefer_floor"),
        cubic_a=float(attrs.get("cubic_coeff_a", -0.75)),
        exclude_outside=bool(attrs.get("exclude_outside", 0)),
        antialias=bool(attrs.get("antialias", 0)),
        policy=attrs.get("keep_aspect_ratio_policy", "stretch"),
        axes=tuple(attrs["axes"]) if "axes" in attrs else None,
    )
    if cfg.mode not in ("nearest", "linear", "cubic"):
        raise unsupported(node, f"Resize mode={cfg.mode!r}")
    if cfg.transform not in _TRANSFORMS:
        raise unsupported(node, f"coordinate_transformation_mode={cfg.transform!r}")
    if cfg.mode == "nearest" and (cfg.nearest_mode not in _NEAREST or cfg.antialias):
        raise unsupported(node, f"nearest_mode={cfg.nearest_mode!r} antialias={cfg.antialias}")
    if cfg.policy not in ("stretch", "not_larger", "not_smaller"):
        raise unsupported(node, f"keep_aspect_ratio_policy={cfg.policy!r}")
    return cfg


def convert_resize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    cfg = _config(node)
    scales, sizes = _values(const_input(node, graph, 2)), _values(const_input(node, graph, 3))
    dynamic = any(input_name(node, i) is not None and const_input(node, graph, i) is None
                  for i in (2, 3))
    if not dynamic and scales is None and sizes is None:
        raise unsupported(node, "Resize without scales or sizes")
    if dynamic:
        return result(OnnxResize(cfg, None, None), full_mapping(node))
    sizes = None if sizes is None else [int(s) for s in sizes]
    return result(OnnxResize(cfg, scales, sizes), dynamic_mapping(node, 1))


registry.register("Resize", 11, 13, 18, 19)(convert_resize)
