"""The ONNX-only prologue every command starts with: load, verify, normalise, analyse.

Torch-free: ``prunequant inspect`` and the dry run of the export path need nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import onnx

from .batch import generalise_batch_reshapes
from .channel_groups import ChannelAnalysis, analyse
from .dequantize import DequantizeResult, dequantize, require_weight_layers
from .errors import DataError, ModelLoadError, VerificationError
from .feeds import annotate_input_ranges, parse_input_values, pin_input_values
from .loading import check_runnable, load_model
from .normalise import NormaliseResult, normalise
from .ort_utils import compare_outputs, make_session, random_feeds
from .shapes import parse_input_shapes
from .untie import untie_weight_initializers

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedModel:
    """A loaded, verified, normalised and analysed model: the start of every command."""

    source: str
    original: onnx.ModelProto
    normalised: NormaliseResult
    analysis: ChannelAnalysis
    dequantized: DequantizeResult | None = None  # an already-quantized original, rewritten to float

    @property
    def model(self) -> onnx.ModelProto:
        return self.normalised.model


def prepare_model(source: str | onnx.ModelProto, input_shapes: Sequence[str] | dict = (),
                  verify: bool = True, batch: int | None = 1,
                  input_values: Sequence[str] | Mapping[str, str] = (),
                  inexact_hidden_width: bool = False) -> PreparedModel:
    """Load safely, check onnxruntime can run it, normalise (verified), analyse.

    ``inexact_hidden_width``: the analysis makes inexact groups (a transformer's residual hidden
    width through LayerNorm / RMSNorm, ``graph_passes.op_rules.norms``) prunable.

    A dynamic leading (batch) dim is taken as ``batch``; other symbolic dims need
    ``input_shapes`` (texts like "input=1x3x224x224" or a dict). ``input_values`` ("sr=16000"
    texts or a dict) make those inputs constants of the model (graph_passes.feeds)."""
    shapes = input_shapes if isinstance(input_shapes, dict) else parse_input_shapes(input_shapes)
    original = load_model(source, shapes or None, batch=batch)
    if input_values:
        original = pin_input_values(original, input_values)
        annotate_input_ranges(original)
    if verify:
        try:
            check_runnable(original)
        except ModelLoadError as exc:
            if not input_values:
                raise
            raise DataError(f"onnxruntime cannot run the model with --input-value "
                            f"{' '.join(f'{k}={v}' for k, v in parse_input_values(input_values).items())}: "
                            f"{exc}; give values the model accepts") from None
    # integer weights behind integer ops: back to float (verified), else one line naming the ops
    dequantized = dequantize(original, verify=verify)
    floating = dequantized.model if dequantized is not None else original
    result = normalise(floating, verify=verify)
    # Reshape targets that spell out the batch size: make them batch-agnostic (same results)
    result.model, rewritten = generalise_batch_reshapes(result.model)
    if rewritten:
        logger.info("%d Reshape target(s) now copy the batch dim from their input", rewritten)
        if verify:
            _check_same(floating, result)
    result.model, _ = untie_weight_initializers(result.model)
    analysis = analyse(result.model, inexact_hidden_width=inexact_hidden_width)
    require_weight_layers(result.model, len(analysis.layers))
    label = source if isinstance(source, str) else "<model>"
    return PreparedModel(label, original, result, analysis, dequantized)


def _check_same(original: onnx.ModelProto, result: NormaliseResult) -> None:
    reference = make_session(original)
    feeds = random_feeds(reference, seed=1)
    err = compare_outputs(make_session(result.model).run(None, feeds), reference.run(None, feeds))
    if not err.ok(1e-4):
        raise VerificationError(f"making Reshape targets batch-agnostic changed output {err.worst_output} "
                                f"by {err.max_rel_error:.2e}; pin the batch with --input-shape instead")


__all__ = ["PreparedModel", "prepare_model"]
