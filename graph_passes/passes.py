"""A minimal pass framework for ONNX rewrites and analyses.

A pass takes a ``ModelProto`` and returns a :class:`PassResult` (a new model and whether it
changed). Passes never mutate their input: they copy first. A :class:`PassSequence` is itself a
pass, so pipelines nest. Failures raise :class:`~graph_passes.errors.PassError` naming the pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import onnx

from .errors import PassError, PrunequantError

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


class Pass:
    """Base class: subclasses implement :meth:`run` on a private copy of the model."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, model: onnx.ModelProto) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        try:
            result = self.run(work)
        except PrunequantError:
            raise
        except Exception as exc:  # a bug or an unexpected model: name the pass, keep it one line
            logger.debug("pass %s failed", self.name, exc_info=True)
            raise PassError(self.name, f"{type(exc).__name__}: {exc}") from exc
        logger.info("pass %s: %s", self.name, "modified" if result.modified else "no change")
        return result


class PassSequence(Pass):
    """Run passes in order; modified if any of them modified the model."""

    def __init__(self, passes: Sequence[Pass], name: str | None = None) -> None:
        self.passes = list(passes)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or "PassSequence(" + ", ".join(p.name for p in self.passes) + ")"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(model)
            model, modified = result.model, modified or result.modified
        return PassResult(model, modified)
