"""`prunequant inspect`: load, normalise, analyse (and optionally bridge) a model; write nothing."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import onnx

from graph_passes.errors import PrunequantError
from graph_passes.prepare import PreparedModel, prepare_model
from graph_passes.shapes import static_input_shapes

from .inspect_report import InspectReport

logger = logging.getLogger(__name__)


def _bridge_summary(model: onnx.ModelProto) -> dict:
    """Convert to torch and measure parity; failures are reported, not raised."""
    try:
        from .bridge import check_parity, convert  # torch is imported only here

        bridged = convert(model)
        error = check_parity(model, bridged)
        return {"ok": True, "max_rel_error": error}
    except PrunequantError as exc:
        return {"ok": False, "error": str(exc)}


def build_inspect_report(source: str, input_shapes: Sequence[str], verify: bool = True,
                         bridge: bool = True, input_values: Sequence[str] = (),
                         inexact_hidden_width: bool = False) -> InspectReport:
    """``inexact_hidden_width``: inexact groups count as prunable (the report states the
    coverage of exact groups alone and with the inexact ones either way)."""
    prepared = prepare_model(source, input_shapes, verify=verify, input_values=input_values,
                             inexact_hidden_width=inexact_hidden_width)
    stats = prepared.normalised.stats
    normalisation = dataclasses.asdict(stats) if stats is not None else {}
    normalisation["max_rel_error"] = prepared.normalised.max_rel_error
    normalisation["dequantized"] = prepared.dequantized.summary() if prepared.dequantized is not None else None
    opset = next((o.version for o in prepared.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return InspectReport(
        model=os.fspath(source),
        opset=opset,
        inputs=static_input_shapes(prepared.model),
        normalisation=normalisation,
        analysis=prepared.analysis,
        bridge=_bridge_summary(prepared.model) if bridge else None,
    )
