"""Validate an exported model before it is written: checker, onnxruntime at two levels, parity.

:func:`validate_model` runs the onnx checker (``full_check=True``: types and shapes too), builds
onnxruntime CPU sessions with graph optimisations OFF and with ORT_ENABLE_ALL, runs both on the
same feeds and checks they agree; with ``reference_outputs`` (e.g. the fake-quantised torch
model's outputs) it checks the OFF session against them too, and for classifiers the top-1
agreement. Every failure is a :class:`~graph_passes.errors.VerificationError` with one line.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import VerificationError
from .ort_utils import compare_outputs, fits_in_protobuf, make_session, random_feeds

logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """The numbers behind a passed validation."""

    n_outputs: int
    n_samples: int
    max_rel_error_optimized: float          # ORT_ENABLE_ALL vs optimisations off
    max_rel_error_reference: float | None   # optimisations off vs reference_outputs
    top1_agreement: float | None            # percent, first output, argmax over the last axis
    seconds: float


def validate_model(
    model: onnx.ModelProto,
    *,
    reference_outputs: Sequence[np.ndarray] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-4,
    rtol_optimized: float = 1e-2,
    check_top1: bool = False,
    min_top1_agreement: float = 100.0,
) -> ValidationReport:
    """Check ``model`` (see the module docstring); raise VerificationError on the first failure.

    ``rtol`` bounds the relative error (max abs difference over the output's max magnitude)
    of the optimisations-off run against ``reference_outputs`` (an exact emulation agrees to
    float rounding). ``rtol_optimized`` bounds ORT_ENABLE_ALL against optimisations off: the
    integer kernels onnxruntime fuses 8-bit QDQ groups into (QLinearConv, QGemm, ...)
    requantize in the integer domain, which moves some activations by one quantization step
    (measured: 0.4% on the digits sample, all 8-bit). With ``check_top1``
    the top-1 agreement with the reference must be at least ``min_top1_agreement`` percent.
    """
    start = time.perf_counter()
    _check(model)
    plain = _session(model, optimize=False)
    feeds = dict(feeds) if feeds is not None else random_feeds(plain)
    off = _run(plain, feeds, "with optimisations off")
    full = _run(_session(model, optimize=True), feeds, "with ORT_ENABLE_ALL")
    opt_err = compare_outputs(full, off)
    if not opt_err.ok(rtol_optimized):
        raise VerificationError(
            f"onnxruntime with ORT_ENABLE_ALL and with optimisations off disagree on output "
            f"{opt_err.worst_output}: relative error {opt_err.max_rel_error:.3g} > "
            f"{rtol_optimized:g}; an "
            "onnxruntime graph fusion changes the results of this model")
    ref_err, top1 = None, None
    if reference_outputs is not None:
        ref_err, top1 = _against_reference(off, list(reference_outputs), rtol, check_top1,
                                           min_top1_agreement)
    report = ValidationReport(len(off), _batch(feeds), opt_err.max_rel_error, ref_err, top1,
                              time.perf_counter() - start)
    logger.info("validate_model: %s", report)
    return report


def _check(model: onnx.ModelProto) -> None:
    check_model(model, full_check=True, what="the exported model")


def check_model(model: onnx.ModelProto, full_check: bool = False, what: str = "the model") -> None:
    """The onnx checker, also for models over 2 GB (through a temporary external-data copy)."""
    try:
        if fits_in_protobuf(model):
            onnx.checker.check_model(model, full_check=full_check)
            return
        with tempfile.TemporaryDirectory(prefix="prunequant-check-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            work = onnx.ModelProto()
            work.CopyFrom(model)
            onnx.save_model(work, path, save_as_external_data=True, location="model.data")
            onnx.checker.check_model(path, full_check=full_check)
    except Exception as exc:
        raise VerificationError(f"{what} fails the onnx checker: {_line(exc)}") from exc


def _session(model: onnx.ModelProto, optimize: bool):
    level = "ORT_ENABLE_ALL" if optimize else "optimisations off"
    try:
        return make_session(model, optimize=optimize)
    except Exception as exc:
        raise VerificationError(
            f"onnxruntime cannot load the exported model ({level}): {_line(exc)}") from exc


def _run(session, feeds: Mapping[str, np.ndarray], level: str) -> list[np.ndarray]:
    try:
        return session.run(None, dict(feeds))
    except Exception as exc:
        raise VerificationError(
            f"onnxruntime fails to run the exported model {level}: {_line(exc)}") from exc


def _against_reference(off: list[np.ndarray], ref: list[np.ndarray], rtol: float,
                       check_top1: bool, min_top1: float) -> tuple[float, float | None]:
    try:
        cmp = compare_outputs(off, ref)
    except ValueError as exc:
        raise VerificationError(f"the exported model and the reference differ: {exc}") from exc
    top1 = top1_agreement(off[0], ref[0]) if check_top1 else None
    if top1 is not None and top1 < min_top1:
        raise VerificationError(
            f"the exported model agrees with the reference on top-1 for {top1:.2f}% of the "
            f"samples (< {min_top1:g}%); max relative error {cmp.max_rel_error:.3g}")
    if not cmp.ok(rtol):
        raise VerificationError(
            f"the exported model differs from the reference on output {cmp.worst_output}: "
            f"relative error {cmp.max_rel_error:.3g} > {rtol:g}")
    return cmp.max_rel_error, top1


def top1_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Percent of rows (all axes but the last) whose argmax over the last axis agree."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or got.ndim == 0:
        raise VerificationError(f"cannot compare top-1 of shapes {got.shape} and {ref.shape}")
    return float(np.mean(got.argmax(axis=-1) == ref.argmax(axis=-1)) * 100.0)


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
