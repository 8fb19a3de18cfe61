"""One self-contained HTML page for a ``NAME.report.json`` (``prunequant report``).

The page holds the before/after table (every cost model, file bytes, accuracy and every
output's fidelity to the original when the report has them), a picture of each layer's channels
(pruned and per bit-width, a stacked bar per layer), the strategy's history (per-epoch series
such as task loss and cost, or the trials and their Pareto front for a trial-based search), the
gate's per-output figures, and, when ``NAME.plan.json`` sits beside the report (or is given), the
plan's activation widths. Figures are PNGs drawn with matplotlib (Agg) and embedded as base64
data URIs: no external asset, no JavaScript.

Errors: a missing, unreadable, empty, non-JSON or non-report file is an ``InputFileError`` (exit
2: a file the user named that is not what it claims to be); a plan beside it that is not valid
JSON, not a plan, or belongs to another model is a ``PlanError`` (exit 12). The page is written
atomically (a temporary file in the same directory, then a rename) and never over an input.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from graph_passes.errors import InputFileError, OutputError, PlanError

logger = logging.getLogger(__name__)

#: a report or plan file larger than this is refused before it is read
MAX_JSON_BYTES = 64 * 1024 * 1024
#: cost models in table order; any other model in the report follows, sorted
COST_ORDER = ("size", "bops", "mpic", "mpic_energy", "ne16")
COST_LABELS = {"size": "size (weights; before = all 8-bit)", "bops": "BOPs", "mpic": "mpic latency (cycles)",
               "mpic_energy": "mpic energy (uJ)", "ne16": "ne16 latency (cycles)"}
#: history series drawn first, when present (others follow, in the order they appear)
SERIES_ORDER = ("task_loss", "loss", "cost", "score", "accuracy", "lam", "temperature")
MAX_SERIES = 6
BIT_COLOURS = {2: "#d95f02", 3: "#e6ab02", 4: "#7570b3", 5: "#66a61e", 6: "#a6761d", 8: "#1b9e77", 16: "#1f78b4"}
PRUNED_COLOUR = "#bbbbbb"


@dataclass
class ReportPage:
    """The rendered page and what it shows."""

    html: str
    figures: list[str] = field(default_factory=list)  # figure titles, one <img> each
    plan_path: str | None = None


# ----------------------------------------------------------------------------- reading


def plan_beside(report_path: str | os.PathLike) -> Path:
    """NAME.plan.json beside NAME.report.json (or beside NAME.json)."""
    path = Path(report_path)
    name = path.name
    stem = name[: -len(".report.json")] if name.endswith(".report.json") else path.stem
    return path.with_name(f"{stem}.plan.json")


def _read_json(path: Path, what: str, error: type[Exception]) -> Any:
    """JSON from ``path``: InputFileError when the file is missing or unreadable, ``error`` when
    its text is not JSON."""
    if not path.exists():
        raise InputFileError(f"{what} {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise InputFileError(f"{what} {str(path)!r} is not a regular file; pass a .json file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise error(f"{what} {str(path)!r} is empty; pass the file compress or export wrote")
        if size > MAX_JSON_BYTES:
            raise error(f"{what} {str(path)!r} is {size / 2**20:.0f} MiB, over the "
                        f"{MAX_JSON_BYTES // 2**20} MiB limit; is it really a prunequant file?")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}); pass the .json file "
                    "compress or export wrote") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                    f"{exc.colno}); pass the file compress or export wrote") from exc
    except RecursionError as exc:
        raise error(f"{what} {str(path)!r} is nested too deeply to be a prunequant file") from exc


def load_report(path: str | os.PathLike) -> dict:
    """A report written by compress/export; InputFileError (one line) when it is not one."""
    path = Path(path)
    report = _read_json(path, "report", InputFileError)
    if not isinstance(report, dict):
        raise InputFileError(f"report {str(path)!r} holds a JSON {type(report).__name__}, not a prunequant "
                             "report; pass the NAME.report.json that compress or export wrote")
    for key, kind in (("cost_before_8bit", dict), ("cost_after", dict), ("layers", dict)):
        if not isinstance(report.get(key), kind):
            raise InputFileError(f"report {str(path)!r} has no {key!r} object, so it is not a prunequant "
                                 "report; pass the NAME.report.json that compress or export wrote")
    return report


def load_sweep(path: str | os.PathLike) -> dict:
    """A sweep.json written by ``prunequant sweep``; InputFileError (one line) when it is not one."""
    path = Path(path)
    sweep = _read_json(path, "sweep", InputFileError)
    if not isinstance(sweep, dict) or not str(sweep.get("format", "")).startswith("prunequant-sweep/") \
            or not isinstance(sweep.get("records"), list):
        raise InputFileError(f"sweep {str(path)!r} is not a prunequant sweep (no \"format\": "
                             "\"prunequant-sweep/...\" with records); pass the sweep.json that `prunequant sweep` "
                             "wrote")
    return sweep


def load_plan(path: str | os.PathLike, report: Mapping[str, Any]) -> dict:
    """The plan JSON beside a report; PlanError when malformed or for another model."""
    path = Path(path)
    plan = _read_json(path, "plan", PlanError)
    if not isinstance(plan, dict) or plan.get("format") != "prunequant.plan":
        raise PlanError(f"plan {str(path)!r} is not a prunequant plan (no \"format\": \"prunequant.plan\"); "
                        "pass the NAME.plan.json written with the report, or --no-plan")
    want, have = report.get("plan_model_sha256"), plan.get("model_sha256")
    if want and have and want != have:
        raise PlanError(f"plan {str(path)!r} is for another model (sha256 {str(have)[:12]}..., the report's is "
                        f"{str(want)[:12]}...); pass the plan written with this report, or --no-plan")
    if not isinstance(plan.get("activations", {}), dict) or not isinstance(plan.get("layers", {}), dict):
        raise PlanError(f"plan {str(path)!r} has malformed 'layers' or 'activations'; pass the plan written "
                        "with this report, or --no-plan")
    return plan


# ----------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _pct(fraction: Any) -> str:
    return "-" if fraction is None else f"{100 * float(fraction):.2f}%"


def _cost_text(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "size":
        return f"{float(value) / 8:,.0f} B"
    return _num(float(value))


def _ratio(before: Any, after: Any) -> str:
    try:
        return f"{float(after) / float(before):.3f}" if float(before) else "-"
    except (TypeError, ValueError):
        return "-"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cost_names(report: Mapping[str, Any]) -> list[str]:
    names = [n for n in report["cost_before_8bit"] if n in report["cost_after"]]
    return [n for n in COST_ORDER if n in names] + sorted(n for n in names if n not in COST_ORDER)


def before_after_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, before, after, after / before) rows of the summary table."""
    before, after = report["cost_before_8bit"], report["cost_after"]
    rows = [(COST_LABELS.get(n, n), _cost_text(n, before[n]), _cost_text(n, after[n]), _ratio(before[n], after[n]))
            for n in _cost_names(report)]
    file = report.get("file") if isinstance(report.get("file"), dict) else {}
    if "bytes" in file:
        fp32 = file.get("fp32_weight_bytes")
        rows.append(("file bytes (before: FP32 weights)", "-" if fp32 is None else f"{fp32:,} B",
                     f"{file['bytes']:,} B", _ratio(fp32, file["bytes"]) if fp32 else "-"))
    quality = report.get("quality") if isinstance(report.get("quality"), dict) else {}
    if quality.get("accuracy_before") is not None or quality.get("accuracy_after") is not None:
        rows.append(("accuracy (held out)", _pct(quality.get("accuracy_before")),
                     _pct(quality.get("accuracy_after")), "-"))
    if quality.get("accuracy_after_ort_optimized") is not None:
        rows.append(("accuracy, onnxruntime fully optimised", "-", _pct(quality["accuracy_after_ort_optimized"]), "-"))
    if quality.get("top1_agreement_with_original") is not None:
        rows.append(("top-1 agreement with the original", "100.00%",
                     _pct(quality["top1_agreement_with_original"]), "-"))
    return rows


def _fidelity_rows(outputs: Any) -> list[list[str]]:
    rows = []
    for out in outputs if isinstance(outputs, list) else []:
        if not isinstance(out, dict):
            continue
        top1 = out.get("top1_agreement")
        rows.append([str(out.get("name", "?")), "x".join(str(d) for d in out.get("shape") or []) or "-",
                     _db(out.get("sqnr_db")), _num(out.get("rel_rmse")), _num(out.get("max_abs_error")),
                     "-" if top1 is None else f"{float(top1):.2f}%"])
    return rows


def _db(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{float(value):.1f} dB" if math.isfinite(float(value)) else _num(float(value))


def _gate_rows(gate: Mapping[str, Any]) -> list[list[str]]:
    thresholds = gate.get("thresholds") if isinstance(gate.get("thresholds"), dict) else {}
    rows = []
    for mode, key_sqnr, key_top1 in (("plain", "min_sqnr_db", "min_top1"),
                                     ("optimized", "min_sqnr_db_optimized", "min_top1_optimized")):
        for out in gate.get(mode) or []:
            if not isinstance(out, dict):
                continue
            top1 = out.get("top1_agreement")
            rows.append([mode, str(out.get("name", "?")), _db(out.get("sqnr_db")),
                         _num(thresholds.get(key_sqnr)) + " dB" if thresholds.get(key_sqnr) is not None else "-",
                         "-" if top1 is None else f"{float(top1):.2f}%",
                         "-" if thresholds.get(key_top1) is None else f"{float(thresholds[key_top1]):.2f}%",
                         _num(out.get("max_abs_error"))])
    return rows


# ----------------------------------------------------------------------------- figures


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def layer_counts(report: Mapping[str, Any]) -> list[tuple[str, int, dict[int, int]]]:
    """(layer, pruned channels, {bits: channels}) per layer, in the report's order."""
    rows = []
    for name, entry in report["layers"].items():
        if not isinstance(entry, dict):
            continue
        before, after = int(entry.get("channels_before") or 0), int(entry.get("channels_after") or 0)
        bits = {int(k): int(v) for k, v in (entry.get("bits") or {}).items()} if isinstance(entry.get("bits"), dict) else {}
        rows.append((str(name), max(0, before - after), bits))
    return rows


def layers_figure(report: Mapping[str, Any]) -> str | None:
    """Horizontal stacked bar per layer: pruned channels, then kept channels per bit-width."""
    rows = layer_counts(report)
    if not rows:
        return None
    widths = sorted({b for _, _, bits in rows for b in bits})
    fig = _figure(8.5, min(40.0, 1.2 + 0.32 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    pruned = [p for _, p, _ in rows]
    ax.barh(y, pruned, left=left, color=PRUNED_COLOUR, label="pruned")
    left = [a + b for a, b in zip(left, pruned)]
    for width in widths:
        counts = [bits.get(width, 0) for _, _, bits in rows]
        ax.barh(y, counts, left=left, color=BIT_COLOURS.get(width, None), label=f"{width}-bit")
        left = [a + b for a, b in zip(left, counts)]
    ax.set_yticks(y)
    ax.set_yticklabels([_short(n) for n, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title("channels per layer: pruned and kept, by weight bit-width")
    ax.legend(loc="lower right", fontsize=7, ncol=len(widths) + 1)
    fig.subplots_adjust(left=0.34, right=0.97, top=1 - 0.45 / fig.get_figheight(),
                        bottom=0.55 / fig.get_figheight())
    return _png(fig)


def _trials(history: list[Any]) -> list[dict]:
    return [h for h in history if isinstance(h, dict) and h.get("kind") == "trial"
            and isinstance(h.get("score"), (int, float)) and isinstance(h.get("cost"), dict)]


def pareto_points(trials: list[dict], cost_model: str) -> list[tuple[float, float]]:
    """Non-dominated (cost, score) points: lower cost, higher score."""
    points = sorted((float(t["cost"][cost_model]), float(t["score"])) for t in trials
                    if isinstance(t["cost"].get(cost_model), (int, float)))
    front: list[tuple[float, float]] = []
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or score > front[-1][1]:
            front.append((cost, score))
    return front


def history_series(history: list[Any]) -> tuple[list[float], dict[str, list[float]]]:
    """(x, {name: values}) of the per-epoch numeric records of a history (records that describe
    an event, a stage or a trial are not series)."""
    records = [h for h in history if isinstance(h, dict) and not any(k in h for k in ("kind", "event", "stage"))]
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and key not in names:
                names.append(key)
    names = [n for n in SERIES_ORDER if n in names] + [n for n in names if n not in SERIES_ORDER]
    names = names[:MAX_SERIES]
    x = [float(r.get("epoch", r.get("step", i + 1))) for i, r in enumerate(records)]
    series = {n: [float(r[n]) if isinstance(r.get(n), (int, float)) else math.nan for r in records] for n in names}
    return x, series


def history_figure(report: Mapping[str, Any]) -> tuple[str | None, str]:
    """(PNG, title) of the strategy's history, or (None, why not)."""
    history = report.get("history")
    if not isinstance(history, list) or not history:
        return None, "the report holds no strategy history"
    trials = _trials(history)
    if trials:
        cost_model = next((h.get("cost_model") for h in history if isinstance(h, dict)
                           and h.get("kind") == "pareto_front" and h.get("cost_model")), None)
        cost_model = cost_model or (report.get("config") or {}).get("cost") or "size"
        if not any(cost_model in t["cost"] for t in trials):
            cost_model = next(iter(trials[0]["cost"]), "size")
        usable = [t for t in trials if isinstance(t["cost"].get(cost_model), (int, float))]
        front = pareto_points(usable, cost_model)
        fig = _figure(7.0, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        feasible = [t for t in usable if t.get("feasible") is not False]
        over = [t for t in usable if t.get("feasible") is False]
        ax.scatter([t["cost"][cost_model] for t in feasible], [t["score"] for t in feasible], s=14, alpha=0.6,
                   label=f"trials ({len(feasible)})")
        if over:
            ax.scatter([t["cost"][cost_model] for t in over], [t["score"] for t in over], s=14, alpha=0.5,
                       marker="x", color="grey", label=f"over budget ({len(over)})")
        ax.plot([c for c, _ in front], [s for _, s in front], "-o", color="C3", ms=4, label="Pareto front")
        ax.set_xlabel(f"{cost_model} (relative to the all-8-bit model)")
        ax.set_ylabel("held-out score")
        title = f"strategy history: {len(usable)} trials and their Pareto front"
        ax.set_title(title, fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        return _png(fig), title
    x, series = history_series(history)
    if not series:
        return None, "the strategy's history holds no per-epoch series"
    fig = _figure(8.0, 1.2 + 1.6 * len(series))
    axes = [fig.add_subplot(len(series), 1, i + 1) for i in range(len(series))]
    for ax, (name, values) in zip(axes, series.items()):
        ax.plot(x, values, "-o", ms=3)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        positive = [v for v in values if math.isfinite(v)]
        if positive and min(positive) > 0 and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
    axes[-1].set_xlabel("epoch")
    title = f"strategy history: {', '.join(series)} per epoch"
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig), title


# ----------------------------------------------------------------------------- the page


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%;height:auto}
.meta td{text-align:left}.note{color:#555;font-size:.9em}
"""


def _img(uri: str, title: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(title)}"><figcaption class="note">{html.escape(title)}' \
           "</figcaption></figure>"


def _runtime_rows(runtimes: Any) -> list[list[str]]:
    """Rows of report["runtimes"]: each runtime other than the gate's, as compared with it."""
    rows: list[list[str]] = []
    if not isinstance(runtimes, dict):
        return rows
    for name, entry in runtimes.items():
        if not isinstance(entry, dict) or entry.get("role") == "the gate":
            continue
        status = str(entry.get("status", "-"))
        agreement = entry.get("top1_agreement_with_onnxruntime")
        rows.append([name, str(entry.get("version", "-")), status, _num(entry.get("samples")),
                     _pct(agreement) if agreement is not None else "-", _num(entry.get("max_abs_diff")),
                     str(entry.get("reason", ""))])
    return rows


def _sweep_points(sweep: Mapping[str, Any], ratio: str) -> dict[str, list[tuple[float, float, str]]]:
    """Per strategy, (cost ratio, accuracy, job id) of every finished job of a sweep."""
    points: dict[str, list[tuple[float, float, str]]] = {}
    for record in sweep.get("records", []):
        if not isinstance(record, dict) or record.get("status") != "ok":
            continue
        x, y = record.get(ratio), record.get("accuracy")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            points.setdefault(str(record.get("strategy", "?")), []).append((float(x), float(y),
                                                                            str(record.get("job_id", ""))))
    return points


def sweep_figure(sweep: Mapping[str, Any]) -> str | None:
    """Accuracy vs size and vs energy (ratios to the 8-bit model) of a sweep's jobs, per strategy,
    with the sweep's overall Pareto front drawn through its points."""
    panels = [("size_ratio", "size / 8-bit size", "size"), ("energy_ratio", "energy / 8-bit energy", "energy")]
    panels = [p for p in panels if _sweep_points(sweep, p[0])]
    if not panels:
        return None
    fronts = sweep.get("fronts") if isinstance(sweep.get("fronts"), dict) else {}
    fig = _figure(5.2 * len(panels), 3.8)
    for i, (ratio, label, front_key) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        points = _sweep_points(sweep, ratio)
        by_id = {job: (x, y) for pts in points.values() for x, y, job in pts}
        for strategy in sorted(points):
            xs, ys, _ = zip(*points[strategy])
            ax.scatter(xs, [100 * y for y in ys], label=strategy, s=22)
        front = sorted(by_id[j] for j in fronts.get(front_key, []) if j in by_id)
        if front:
            ax.plot([x for x, _ in front], [100 * y for _, y in front], color="black", lw=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _sweep_section(sweep: Mapping[str, Any]) -> tuple[list[str], str | None]:
    parts = ["<h2>Sweep</h2>"]
    records = [r for r in sweep.get("records", []) if isinstance(r, dict)]
    ok = [r for r in records if r.get("status") == "ok"]
    prov = sweep.get("provenance") if isinstance(sweep.get("provenance"), dict) else {}
    parts.append(f'<p class="note">{len(ok)} of {len(records)} jobs finished; prunequant '
                 f'{html.escape(str(prov.get("prunequant", "-")))}, commit {html.escape(str(prov.get("commit", "-")))}, '
                 f'model sha256 {html.escape(str(prov.get("model_sha256", "-"))[:16])}...</p>')
    uri = sweep_figure(sweep)
    if uri:
        parts.append(_img(uri, "sweep: accuracy vs size and energy, per strategy, with the Pareto front"))
    fronts = sweep.get("fronts") if isinstance(sweep.get("fronts"), dict) else {}
    on_front = set(fronts.get("size", [])) | set(fronts.get("energy", []))
    rows = [(r.get("job_id", "-"), r.get("strategy", "-"), r.get("target") or "-", r.get("seed", "-"),
             _pct(r.get("accuracy")), _num(r.get("size_ratio")), _num(r.get("energy_ratio")),
             _num(r.get("wall_s")), "yes" if r.get("job_id") in on_front else "")
            for r in sorted(ok, key=lambda r: (str(r.get("strategy")), r.get("size_ratio") or 0))]
    if rows:
        parts.append(_table(["job", "strategy", "target", "seed", "accuracy", "size ratio", "energy ratio",
                             "wall s", "on a front"], rows))
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        parts.append(_table(["failed job", "error"], [(r.get("job_id", "-"), r.get("error", "-")) for r in failed]))
    return parts, ("sweep Pareto front" if uri else None)


def render(report: Mapping[str, Any], plan: Mapping[str, Any] | None = None, title: str | None = None,
           sweep: Mapping[str, Any] | None = None) -> ReportPage:
    """The HTML page of a report (and its plan, and the sweep it belongs to)."""
    figures: list[str] = []
    parts: list[str] = []
    name = str(report.get("model", "model"))
    title = title or f"prunequant report: {name}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    meta = [("model", name), ("strategy", report.get("strategy", "-")),
            ("cost model", config.get("cost", "-")), ("target", config.get("target") or "-"),
            ("lambda", config.get("lam") if config.get("lam") is not None else "-"),
            ("prunequant", (report.get("versions") or {}).get("prunequant", "-")),
            ("model sha256", report.get("plan_model_sha256", "-"))]
    parts.append(_table(["", ""], [(k, v) for k, v in meta], cls="meta"))

    parts.append("<h2>Before and after</h2>")
    parts.append(_table(["", "before", "after", "after / before"], before_after_rows(report)))
    quality = report.get("quality") if isinstance(report.get("quality"), dict) else {}
    fidelity = _fidelity_rows(quality.get("outputs_vs_original"))
    if fidelity:
        samples = quality.get("held_out_samples")
        parts.append(f"<h2>Every output vs the original model</h2><p class=\"note\">on {_num(samples)} held-out "
                     "inputs; SQNR is scale-sensitive (a classifier fine-tuned on labels keeps its top-1 but "
                     "rescales its logits)</p>")
        parts.append(_table(["output", "shape", "SQNR", "relative RMSE", "max abs error", "top-1 agreement"],
                            fidelity))

    parts.append("<h2>Channels and bit-widths per layer</h2>")
    uri = layers_figure(report)
    if uri:
        figures.append("channels per layer")
        parts.append(_img(uri, "channels per layer: pruned (grey) and kept, by weight bit-width"))
        rows = [(n, p, ", ".join(f"{bits[b]} x {b}-bit" for b in sorted(bits)) or "-")
                for n, p, bits in layer_counts(report)]
        parts.append(_table(["layer", "pruned", "kept"], rows))
    else:
        parts.append('<p class="note">the report lists no layers</p>')

    if plan is not None:
        acts = plan.get("activations") or {}
        rows = [(site, a.get("bits", "-"), _num(a.get("clip")), "signed" if a.get("signed") else "unsigned")
                for site, a in acts.items() if isinstance(a, dict)]
        if rows:
            parts.append("<h2>Activation bit-widths (from the plan)</h2>")
            parts.append(_table(["activation", "bits", "clip", "range"], rows))

    parts.append("<h2>Strategy history</h2>")
    uri, what = history_figure(report)
    if uri:
        figures.append(what)
        parts.append(_img(uri, what))
    else:
        parts.append(f'<p class="note">{html.escape(what)}</p>')

    gate = report.get("gate") if isinstance(report.get("gate"), dict) else {}
    gate_rows = _gate_rows(gate)
    parts.append("<h2>The gate</h2>")
    if gate_rows:
        parts.append(f'<p class="note">the written model vs the fake-quantized model on {_num(gate.get("samples"))} '
                     "held-out inputs, onnxruntime with optimisations off (plain) and fully on (optimized)</p>")
        parts.append(_table(["onnxruntime", "output", "SQNR", "min SQNR", "top-1 agreement", "min top-1",
                             "max abs error"], gate_rows))
    else:
        parts.append('<p class="note">the report holds no gate figures</p>')

    runtime_rows = _runtime_rows(report.get("runtimes"))
    if runtime_rows:
        parts.append("<h2>Other runtimes</h2>")
        parts.append('<p class="note">the written model in each runtime vs onnxruntime (the gate\'s runtime) on '
                     "the same held-out inputs</p>")
        parts.append(_table(["runtime", "version", "status", "samples", "top-1 agreement", "max abs diff",
                             "reason"], runtime_rows))

    if sweep is not None:
        sweep_parts, sweep_fig = _sweep_section(sweep)
        parts.extend(sweep_parts)
        if sweep_fig:
            figures.append(sweep_fig)

    body = "\n".join(parts)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
    return ReportPage(page, figures)


# ----------------------------------------------------------------------------- writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    from graph_passes.writing import check_output_path

    target = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}; choose another -o") from exc
        raise
    return target


def render_report_file(report_path: str | os.PathLike, output: str | os.PathLike,
                       plan_path: str | os.PathLike | None = None, use_plan: bool = True,
                       sweep_path: str | os.PathLike | None = None) -> ReportPage:
    """Read a report (and its plan, and a sweep's sweep.json), render it and write the page
    atomically to ``output``."""
    from graph_passes.writing import check_output_path

    report_file = Path(report_path)
    target = check_output_path(output)
    plan_file = Path(plan_path) if plan_path is not None else plan_beside(report_file)
    sources = [("report", report_file), ("plan", plan_file)]
    if sweep_path is not None:
        sources.append(("sweep", Path(sweep_path)))
    for what, source in sources:
        if _same_file(target, source):
            raise OutputError(f"the output {str(output)!r} is the {what} given as input; choose another -o")
    report = load_report(report_file)
    plan = None
    if use_plan and (plan_path is not None or plan_file.exists()):
        plan = load_plan(plan_file, report)
    sweep = load_sweep(sweep_path) if sweep_path is not None else None
    page = render(report, plan, sweep=sweep)
    page.plan_path = str(plan_file) if plan is not None else None
    write_text_atomic(target, page.html)
    logger.info("wrote %s (%d figures%s)", target, len(page.figures),
                f", plan {plan_file}" if plan is not None else "")
    return page


__all__ = ["ReportPage", "before_after_rows", "history_series", "layer_counts", "load_plan", "load_report", "load_sweep",
           "pareto_points", "plan_beside", "render", "render_report_file", "sweep_figure", "write_text_atomic"]
