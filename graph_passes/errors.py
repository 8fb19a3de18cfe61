"""The prunequant exception hierarchy.

Every error a user can cause derives from :class:`PrunequantError`; its message is written for
the user (what is wrong, and what to do) and fits on one line. The CLI prints the message and
exits with ``exit_code``. The hierarchy lives in ``graph_passes`` because it is the lowest layer:
``cost_models`` and ``plugin`` import it from here, so nothing imports upwards.
"""

from __future__ import annotations


class PrunequantError(Exception):
    """Root of all errors prunequant raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class InputFileError(PrunequantError):
    """A file the user named is missing, unreadable, empty or not what it claims to be."""

    exit_code = 2


class ModelLoadError(PrunequantError):
    """The model cannot be parsed, fails the checker, or uses an opset we cannot handle."""

    exit_code = 3


class ExternalDataError(ModelLoadError):
    """External tensor data is missing or points outside the model's directory."""


class InputShapeError(PrunequantError):
    """Input shapes are symbolic and not pinned, or a pinned shape is malformed."""

    exit_code = 4


class UnsupportedModelError(PrunequantError):
    """The model uses something prunequant cannot run or verify (e.g. a custom-domain op)."""

    exit_code = 5


class PassError(PrunequantError):
    """A graph pass failed; the message names the pass."""

    exit_code = 6

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name


class VerificationError(PrunequantError):
    """A rewritten model does not compute what the original computes (parity check failed)."""

    exit_code = 7


class PruningError(PrunequantError):
    """A pruning request is invalid (unknown group, blocked group, all channels removed...)."""

    exit_code = 8


class ConversionError(PrunequantError):
    """The ONNX -> torch bridge cannot convert or reproduce the model."""

    exit_code = 9


class DataError(PrunequantError):
    """Calibration/training data does not match the model's inputs, or labels do not match."""

    exit_code = 10


class CostModelError(PrunequantError):
    """Unknown cost model, a malformed budget, or a budget no plan can meet."""

    exit_code = 11


class PlanError(PrunequantError):
    """A compression plan is malformed, from another model, or cannot be applied."""

    exit_code = 12


class OutputError(PrunequantError):
    """The output location cannot be written."""

    exit_code = 13


class ConfigError(PrunequantError):
    """Options that contradict each other or are out of range (e.g. --lambda with --target)."""

    exit_code = 14


class SweepJobsFailed(PrunequantError):
    """Some jobs of a sweep failed; each one's error is in the sweep's records (the others ran)."""

    exit_code = 15
