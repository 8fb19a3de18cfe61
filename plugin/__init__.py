"""prunequant's user-facing plugin: CLI, torch bridge, quantizers, search, export.

    import plugin
    result = plugin.compress("model.onnx", "calib.npz", output="small.onnx",
                             config=plugin.CompressConfig(target="size=0.25"))

Importing this package does not import torch; ``compress`` does when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CompressConfig, CompressResult

__all__ = ["CompressConfig", "CompressResult", "compress"]


def compress(model: Any, data: Any, **kwargs: Any) -> "CompressResult":
    """Compress a model with the joint search; see :func:`plugin.pipeline.compress`."""
    from .pipeline import compress as _compress

    return _compress(model, data, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("CompressConfig", "CompressResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'plugin' has no attribute {name!r}")
