"""The one gate every written model passes, and the per-output fidelity figures of the report.

:func:`gate` is called by every command that writes a model, *before* anything is written:

1. the onnx checker with ``full_check=True`` (strict shape inference);
2. onnxruntime sessions with graph optimisations OFF (the exact QDQ semantics) and
   ORT_ENABLE_ALL (the integer kernels a deployment gets); both must load and run the feeds;
3. for **every** output and both sessions: the shape equals the reference's, every value is
   finite (NaN / Inf never pass), and the agreement with the reference (the fake-quantized torch
   model's outputs on held-out inputs) is at least a threshold, measured as

   * SQNR in dB, ``10 * log10(sum(ref^2) / sum((got - ref)^2))`` over the whole output in float64:
     +inf when ``got == ref`` exactly. An all-zero reference has no signal: its SQNR is +inf when
     ``got`` is all zero too and -inf otherwise, and the gate then accepts it when
     ``max|got| <= zero_atol`` instead, as it does for a reference whose every value lies within
     ``zero_atol`` of zero (a probability map of ~1e-19 on random inputs: relative measures of
     such an output are rounding noise);
   * relative RMSE, ``sqrt(sum((got - ref)^2) / sum(ref^2))`` = ``10^(-SQNR/20)`` (reported, the
     gate checks the SQNR);
   * top-1 agreement (percent of rows whose argmax agree) for a classifier's output: a 2-D
     ``[N, C > 1]`` float output, or the outputs named by ``classifier``;
   * an integer or boolean output must agree element for element on ``min_top1`` percent of
     its elements (an argmax output of a classifier, say).

Thresholds. The QDQ model with optimisations off and the fake-quant torch model compute the same
function up to float rounding; a rounding difference that lands on a round-half-even tie moves
one value by one quantization step of that activation (a whole 1/3 of the range at 2 bits), and
the step propagates. ORT_ENABLE_ALL replaces 8-bit QDQ groups by integer kernels (QLinearConv,
QGemm) that requantize in the integer domain, which moves some activations by one step.
Measured (the plugin's ``compress`` on the samples, 2 search + 1 fine-tune epochs, the held-out
20%: 251 digits / 800 mnist1d samples; SQNR of the whole logits output, top-1 agreement)::

    model, budget / widths              off vs fake-quant         ENABLE_ALL vs fake-quant
    digits, default (size=0.35)         +inf dB, 100%             +inf dB, 100%
    digits, size=0.15                   +inf dB, 100%             +inf dB, 100%
    digits, W8A8 (weights 0,8; act 8)   +inf dB, 100%             56.1 dB, 100%
    mnist1d, default                    79.5 dB (a tie), 100%     79.5 dB, 100%
    mnist1d, size=0.15                  +inf dB, 100%             +inf dB, 100%
    mnist1d, W8A8                       74.8 dB (a tie), 100%     60.7 dB, 100%
    mnist1d, weights 0,4,8; act 4,8     +inf dB, 100%             +inf dB, 100%

(a model with any width below 8 bits is kept from onnxruntime's fusions, see ``graph_passes.qdq``,
so its ENABLE_ALL run equals the plain one; "a tie": max abs error 0.02 on logits of magnitude
~10, one quantization step somewhere). The defaults leave 35 dB of margin over these figures (a
tie on fewer samples or a deeper integer-kernel model costs more) while refusing real export
bugs (measured: the scale of ONE output channel doubled gives 17.6-26.8 dB in the first conv,
9.6-11.8 dB in the classifier, on the same three models): ``min_sqnr_db = 40`` (relative RMSE 1%) with
optimisations off, ``min_sqnr_db_optimized = 25`` (5.6%) with ORT_ENABLE_ALL; top-1 agreement
``min_top1 = 99`` percent off and ``min_top1_optimized = 97`` with ORT_ENABLE_ALL (with fewer
than 100 samples a single flipped sample fails the first: pass a lower bound for tiny sets).

:func:`fidelity` compares the written model's outputs with the *original* model's, output by
output (SQNR, relative RMSE, max abs error, top-1 for classifiers). It does not gate:
compression legitimately changes the outputs; it is what the report states for every output,
so a regression or detection model's report has a fidelity figure too.

Batching: a model whose inputs fix the batch dim (say to 1) is run in chunks of that size
(``batch=None`` detects it; give ``batch`` to force a chunk size).

Use (what ``compress`` / ``export`` do before writing)::

    from graph_passes.gate import fidelity, gate
    from graph_passes.ort_utils import run_model
    report = gate(exported, held_feeds, fake_quant_outputs,
                  classifier={exported.graph.output[0].name} if labels is not None else None)
    names = [o.name for o in exported.graph.output]
    figures = fidelity(run_model(exported, held_feeds), run_model(original, held_feeds), names)
    report_json["gate"] = report.to_json()
    report_json["fidelity"] = jsonable([dataclasses.asdict(f) for f in figures])

:func:`refusal_of` is a helper for tests: it runs the gate and returns the VerificationError it
raised (or fails when the gate passed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from .errors import VerificationError
from .ort_utils import make_session, run_batched, static_batch
from .validate import check_model

logger = logging.getLogger(__name__)

#: optimisations off vs the fake-quant reference (measured: +inf; with one tie 74.8-79.5 dB)
DEFAULT_MIN_SQNR_DB = 40.0
#: ORT_ENABLE_ALL (integer kernels) vs the fake-quant reference (measured: 56.1-60.7 dB at W8A8)
DEFAULT_MIN_SQNR_DB_OPTIMIZED = 25.0
#: top-1 agreement in percent, optimisations off (measured: 100%)
DEFAULT_MIN_TOP1 = 99.0
#: top-1 agreement in percent, ORT_ENABLE_ALL (measured: 100%)
DEFAULT_MIN_TOP1_OPTIMIZED = 97.0
#: an all-zero reference output passes when the model's output is at most this in magnitude
DEFAULT_ZERO_ATOL = 1e-6

PLAIN = "with optimisations off"
OPTIMIZED = "with ORT_ENABLE_ALL"


@dataclass
class OutputFidelity:
    """How close one output is to a reference output (float64 over the whole output).

    ``sqnr_db`` / ``rel_rmse`` / ``max_abs_error`` are None for a non-float output, whose
    ``element_agreement`` (percent of equal elements) is given instead; ``top1_agreement``
    (percent) only for a classifier output. ``note`` says why figures are missing."""

    name: str
    shape: list[int]
    sqnr_db: float | None = None
    rel_rmse: float | None = None
    max_abs_error: float | None = None
    top1_agreement: float | None = None
    element_agreement: float | None = None
    note: str | None = None


@dataclass
class GateReport:
    """The figures behind a passed gate: per output, the optimisations-off and the ORT_ENABLE_ALL
    run against the reference. ``dataclasses.asdict`` gives a dict; :meth:`to_json` one that
    strict JSON accepts (infinities as the strings "inf" / "-inf"). ``outputs`` holds the
    model's outputs of both runs (``"plain"``, ``"optimized"``), for a caller that needs them on
    the same inputs (not part of the JSON)."""

    samples: int
    batch: int | None           # chunk size the model was run in (None: all samples at once)
    seconds: float
    plain: list[OutputFidelity]
    optimized: list[OutputFidelity]
    thresholds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        data = asdict(replace(self, outputs={}))
        data.pop("outputs")
        return jsonable(data)


def gate(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    reference: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    *,
    names: Sequence[str] | None = None,
    classifier: bool | Collection[str] | None = None,
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB,
    min_sqnr_db_optimized: float = DEFAULT_MIN_SQNR_DB_OPTIMIZED,
    min_top1: float = DEFAULT_MIN_TOP1,
    min_top1_optimized: float = DEFAULT_MIN_TOP1_OPTIMIZED,
    zero_atol: float = DEFAULT_ZERO_ATOL,
    batch: int | None = None,
    what: str = "the exported model",
    per_sample: bool = False,
    whole: Collection[str] = (),
) -> GateReport:
    """Check ``model`` before it is written (see the module docstring); raise
    :class:`VerificationError` with one line naming the output, the check, the figure and the
    threshold on the first failure.

    ``feeds``: held-out inputs by input name, N samples each. ``reference``: the expected outputs
    on those feeds (the fake-quantized torch model's), in graph-output order or by output name.
    ``names``: how messages and the report call the outputs (default: the graph output names).
    ``classifier``: which outputs get the top-1 check: None detects (2-D float, C > 1), True all
    such outputs, False none, or a collection of output names (pass it when the task is known).
    ``batch``: run the model in chunks of this many samples; None: the inputs' static leading
    dim when it is not N (a model fixed to batch 1 runs sample by sample), else all at once.
    ``per_sample``: run one sample at a time, outputs joined per sample (see
    :func:`graph_passes.batch.run_samples`); ``whole``: inputs whose arrays stack whole inputs.
    """
    start = time.perf_counter()
    try:
        check_model(model, full_check=True, what=what)
    except VerificationError as exc:
        raise VerificationError(f"{str(exc).rstrip('.')}; nothing was written") from exc
    graph_names = [o.name for o in model.graph.output]
    labels = list(names) if names is not None else graph_names
    if len(labels) != len(graph_names):
        raise ValueError(f"{len(labels)} names for {len(graph_names)} outputs")
    ref = _reference_list(reference, graph_names, labels, what)
    for label, r in zip(labels, ref):
        if np.issubdtype(r.dtype, np.floating) and not np.all(np.isfinite(r)):
            raise VerificationError(
                f"the reference output {label!r} has NaN or Inf values; cannot verify {what}; "
                "nothing was written")
    sessions = {PLAIN: _session(model, False, what), OPTIMIZED: _session(model, True, what)}
    n = _samples(feeds)
    step = 1 if per_sample or whole else batch if batch is not None else static_batch(sessions[PLAIN], n)
    results = {level: _run(s, feeds, step, level, what, per_sample or bool(whole), whole)
               for level, s in sessions.items()}
    for level, outs in results.items():
        _check_structure(outs, ref, labels, level, what)
    wanted = _classifier_outputs(classifier, labels, ref)
    figures = {level: [_agreement(o, r, label, label in wanted)
                       for o, r, label in zip(outs, ref, labels)]
               for level, outs in results.items()}
    bounds = {PLAIN: (min_sqnr_db, min_top1), OPTIMIZED: (min_sqnr_db_optimized, min_top1_optimized)}
    for level, per_output in figures.items():
        for fig, out, r in zip(per_output, results[level], ref):
            _check_figures(fig, out, *bounds[level], zero_atol, level, what,
                           ref_peak=float(np.max(np.abs(r))) if np.size(r) else 0.0)
    report = GateReport(
        samples=n, batch=step, seconds=round(time.perf_counter() - start, 4),
        plain=figures[PLAIN], optimized=figures[OPTIMIZED],
        thresholds={"min_sqnr_db": min_sqnr_db, "min_sqnr_db_optimized": min_sqnr_db_optimized,
                    "min_top1": min_top1, "min_top1_optimized": min_top1_optimized,
                    "zero_atol": zero_atol},
        outputs={"plain": results[PLAIN], "optimized": results[OPTIMIZED]})
    logger.info("gate passed: %d outputs, %d samples, %.2f s; SQNR (off / all) %s", len(ref), n,
                report.seconds, ", ".join(f"{f.name} {_db(f.sqnr_db)} / {_db(g.sqnr_db)}"
                                          for f, g in zip(report.plain, report.optimized)))
    return report


def fidelity(
    got_outputs: Sequence[np.ndarray],
    original_outputs: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    classifier: bool | Collection[str] | None = None,
) -> list[OutputFidelity]:
    """Per output, how close the written model's outputs are to the original model's (SQNR dB,
    relative RMSE, max abs error, top-1 agreement for a classifier's output; element agreement
    for a non-float output). Never raises for a bad figure: this is reported, not gated.
    ``classifier`` as in :func:`gate`."""
    if not len(got_outputs) == len(original_outputs) == len(names):
        raise ValueError(f"{len(got_outputs)} outputs, {len(original_outputs)} original outputs, "
                         f"{len(names)} names")
    got = [np.asarray(g) for g in got_outputs]
    ref = [np.asarray(r) for r in original_outputs]
    wanted = _classifier_outputs(classifier, list(names), ref)
    result = []
    for g, r, name in zip(got, ref, names):
        if g.shape != r.shape:
            result.append(OutputFidelity(name, list(g.shape), note=f"shape {list(g.shape)} differs "
                                         f"from the original's {list(r.shape)}"))
        else:
            result.append(_agreement(g, r, name, name in wanted))
    return result


def sqnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (got - ref)^2)`` in float64: +inf when equal, -inf when the
    reference is all zero and ``got`` is not (and NaN when either holds NaN / Inf)."""
    signal, noise = _energies(got, ref)
    return _sqnr(signal, noise)


def refusal_of(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
               reference: Sequence[np.ndarray] | Mapping[str, np.ndarray],
               **options: object) -> VerificationError:
    """For tests of a deliberately broken export: the VerificationError the gate raises.
    Raises AssertionError when the gate passes the model."""
    try:
        gate(model, feeds, reference, **options)  # type: ignore[arg-type]
    except VerificationError as exc:
        return exc
    raise AssertionError("the gate passed a model it should refuse")


def _energies(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    return float(np.sum(r * r)), float(np.sum((g - r) ** 2))


def _sqnr(signal: float, noise: float) -> float:
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def _agreement(got: np.ndarray, ref: np.ndarray, name: str, classifier: bool) -> OutputFidelity:
    fig = OutputFidelity(name, list(ref.shape))
    if got.size == 0:
        fig.note = "empty output"
        return fig
    if not np.issubdtype(ref.dtype, np.floating):
        fig.element_agreement = float(np.mean(got == ref) * 100.0)
        return fig
    if not (np.all(np.isfinite(got)) and np.all(np.isfinite(ref))):
        fig.note = "NaN or Inf values"
        return fig
    signal, noise = _energies(got, ref)
    fig.sqnr_db = _sqnr(signal, noise)
    fig.rel_rmse = 0.0 if noise == 0.0 else (math.sqrt(noise / signal) if signal else float("inf"))
    fig.max_abs_error = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    if classifier and ref.ndim == 2:
        fig.top1_agreement = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)) * 100.0)
    return fig


def _is_classifier_output(ref: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating)


def _classifier_outputs(classifier: bool | Collection[str] | None, labels: list[str],
                        ref: Sequence[np.ndarray]) -> set[str]:
    if classifier is None or classifier is True:
        return {label for label, r in zip(labels, ref) if _is_classifier_output(np.asarray(r))}
    if classifier is False:
        return set()
    unknown = sorted(set(classifier) - set(labels))
    if unknown:
        raise ValueError(f"classifier names {unknown} are not outputs ({labels})")
    return set(classifier)


def _check_figures(fig: OutputFidelity, out: np.ndarray, min_sqnr: float, min_top1: float,
                   zero_atol: float, level: str, what: str, ref_peak: float | None = None) -> None:
    where = f"{what} {level}: output {fig.name!r}"
    if fig.element_agreement is not None and fig.element_agreement < min_top1:
        raise VerificationError(
            f"{where} agrees with the reference on {fig.element_agreement:.2f}% of its elements "
            f"(< {min_top1:g}%); nothing was written")
    if fig.sqnr_db is not None and fig.sqnr_db < min_sqnr:
        zero_ref = fig.sqnr_db == float("-inf") or (ref_peak is not None and ref_peak <= zero_atol)
        if zero_ref:  # no signal above zero_atol in the reference: an absolute bound
            peak = float(np.max(np.abs(out))) if np.size(out) else 0.0
            if peak <= zero_atol:
                return
            said = ("the reference is all zero" if not ref_peak
                    else f"the reference is zero within {zero_atol:g} (peak {ref_peak:.3g})")
            raise VerificationError(f"{where}: {said}, the output reaches {peak:.3g} "
                                    f"(> {zero_atol:g}); nothing was written")
        raise VerificationError(
            f"{where} differs from the reference: SQNR {fig.sqnr_db:.1f} dB < {min_sqnr:g} dB "
            f"(relative RMSE {fig.rel_rmse:.3g}, max abs error {fig.max_abs_error:.3g}); "
            "nothing was written")
    if fig.top1_agreement is not None and fig.top1_agreement < min_top1:
        raise VerificationError(
            f"{where} agrees with the reference on top-1 for {fig.top1_agreement:.2f}% of the "
            f"samples (< {min_top1:g}%; SQNR {_db(fig.sqnr_db)}); nothing was written")


def _check_structure(outs: list[np.ndarray], ref: list[np.ndarray], labels: list[str],
                     level: str, what: str) -> None:
    if len(outs) != len(ref):
        raise VerificationError(f"{what} {level} has {len(outs)} outputs, the reference "
                                f"{len(ref)}; nothing was written")
    for out, r, label in zip(outs, ref, labels):
        if out.shape != r.shape:
            raise VerificationError(
                f"{what} {level}: output {label!r} has shape {list(out.shape)}, the reference "
                f"{list(r.shape)}; nothing was written")
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            bad = int(np.count_nonzero(~np.isfinite(out)))
            raise VerificationError(
                f"{what} {level}: output {label!r} has {bad} NaN or Inf value(s) of {out.size}; "
                "nothing was written")


def _reference_list(reference: Sequence[np.ndarray] | Mapping[str, np.ndarray],
                    graph_names: list[str], labels: list[str], what: str) -> list[np.ndarray]:
    if isinstance(reference, Mapping):
        missing = [n for n in graph_names if n not in reference]
        if missing:
            raise ValueError(f"the reference has no output {missing[0]!r}")
        return [np.asarray(reference[n]) for n in graph_names]
    ref = [reference] if isinstance(reference, np.ndarray) else [np.asarray(r) for r in reference]
    if len(ref) != len(graph_names):
        raise VerificationError(f"{what} has {len(graph_names)} outputs ({', '.join(labels)}), "
                                f"the reference {len(ref)}; nothing was written")
    return ref


def _session(model: onnx.ModelProto, optimize: bool, what: str) -> ort.InferenceSession:
    level = OPTIMIZED if optimize else PLAIN
    try:
        return make_session(model, optimize=optimize)
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load {what} {level}: {_line(exc)}; "
                                "nothing was written") from exc


def _run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], batch: int | None,
         level: str, what: str, per_sample: bool = False, whole: Collection[str] = ()) -> list[np.ndarray]:
    from .batch import run_samples

    try:
        return run_samples(session, feeds, whole) if per_sample else run_batched(session, feeds, batch)
    except Exception as exc:
        raise VerificationError(f"onnxruntime fails to run {what} {level}: {_line(exc)}; "
                                "nothing was written") from exc


def _samples(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else 1


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"


def jsonable(value: object) -> object:
    """``value`` (dicts, lists, floats...) with +-inf / NaN as the strings "inf", "-inf", "nan",
    which strict JSON accepts: e.g. ``jsonable([dataclasses.asdict(f) for f in fidelity(...)])``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return " ".join(first.split())[:300] or type(exc).__name__


__all__ = ["DEFAULT_MIN_SQNR_DB", "DEFAULT_MIN_SQNR_DB_OPTIMIZED", "DEFAULT_MIN_TOP1",
           "DEFAULT_MIN_TOP1_OPTIMIZED", "GateReport", "OutputFidelity", "fidelity", "gate",
           "jsonable", "refusal_of", "sqnr_db"]
