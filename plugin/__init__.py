"""prunequant's user-facing plugin: CLI, torch engine, search strategies, export.

    import plugin
    result = plugin.compress("model.onnx", "calib.npz", output="small.onnx",
                             config=plugin.CompressConfig(target="size=25%"))

Importing this package does not import torch; ``compress`` does when it is called. The API lives
in :mod:`plugin.api` (``compress``, ``apply_plan``, ``evaluate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .api import ApplyResult, CompressConfig, CompressResult

__all__ = ["ApplyResult", "CompressConfig", "CompressResult", "apply_plan", "compress"]


def compress(model: Any, data: Any, **kwargs: Any) -> "CompressResult":
    """Compress a model; see :func:`plugin.api.compress`."""
    from .api import compress as _compress

    return _compress(model, data, **kwargs)


def apply_plan(model: Any, plan: Any, **kwargs: Any) -> "ApplyResult":
    """Apply a saved plan; see :func:`plugin.api.apply_plan`."""
    from .api import apply_plan as _apply_plan

    return _apply_plan(model, plan, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("CompressConfig", "CompressResult", "ApplyResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'plugin' has no attribute {name!r}")
