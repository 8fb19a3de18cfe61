"""Seconds per stage of the corpus benchmark's short compress (benchmarks/pypi_corpus.py), one
model per process:

    .ci/env python benchmarks/pypi_corpus_stages.py --only KEY ... [--timeout 900] [--out PATH]

The same steps as ``pypi_corpus.run_one`` (analyse, bridge + parity, ``compress`` with
epochs=1 finetune_epochs=1 batch_size=8 max_steps_per_epoch=2 on 16 random inputs,
--target size=50%), with timers wrapped around the library functions of each stage (inclusive
seconds, summed over calls; nothing in the library is changed): wall seconds and CPU seconds of
the process (all threads; on a shared machine the CPU seconds are the steadier figure):

    analyse        prepare_model in the benchmark (load, check, normalise, analyse)
    bridge         convert + check_parity in the benchmark
    prepare        compress's own prepare
    dry_run        the dry run of the export path
    search         the strategy (of which: engine_bridge = convert + parity of the supernet,
                   calibrate, search_epochs = the budget controller's epochs)
    qat            the fine-tune
    export         write back + export_plan + restore batch + torch reference + gate + fidelity
                   (of which: export_plan, torch_reference, gate_checker, gate_session_off,
                   gate_session_all, gate_run, fidelity_runs = the report's onnxruntime runs)
    report         the report's costing

Writes PATH.json and PATH.md (default benchmarks/results/pypi-corpus-stages-cpu) with the
commit and library versions; ``--label`` names the column set (before / after a fix) and
``--merge`` keeps the other labels' rows.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

#: (label, module, attribute[, class]) wrapped with a timer inside compress
PATCHES = [
    ("prepare", "plugin.api", "_prepare_with_data", None),
    ("dry_run", "graph_passes.dry_run", "dry_run_export", None),
    ("search", "plugin.strategies.gradient", "search", "GradientStrategy"),
    ("qat", "plugin.engine.training", "finetune", None),
    ("export", "plugin.api", "_export_and_gate", None),
    ("gate", "graph_passes.gate", "gate", None),
    ("engine_bridge", "plugin.engine.fakequant", "convert", None),
    ("engine_bridge", "plugin.engine.fakequant", "check_parity", None),
    ("calibrate", "plugin.engine.fakequant", "calibrate", "FakeQuantModel"),
    ("search_epochs", "plugin.engine.supernet", "run_epoch", "SearchRunner"),
    ("export_plan", "plugin.export", "export_plan", None),
    ("torch_reference", "plugin.api", "_torch_outputs", None),
    ("fidelity_runs", "plugin.api", "_ort_outputs", None),
    ("gate_checker", "graph_passes.gate", "check_model", None),
    ("gate_run", "graph_passes.gate", "_run", None),
    ("report", "plugin.api", "_report", None),
]
COLUMNS = ["analyse", "bridge", "prepare", "dry_run", "data", "search", "engine_bridge", "calibrate",
           "search_epochs", "qat", "export", "export_plan", "torch_reference", "gate", "gate_checker",
           "gate_session_off", "gate_session_all", "gate_run", "fidelity_runs", "report", "total"]


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class _Clock:
    """Wall and CPU seconds (this process, every thread: onnxruntime's pool included) per label."""

    def __init__(self, progress: Path | None = None) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.progress = progress  # rewritten after every timed call: a run stopped at the timeout still tells

    def snapshot(self) -> dict:
        return {"seconds": {k: round(v, 2) for k, v in self.wall.items()},
                "cpu_seconds": {k: round(v, 2) for k, v in self.cpu.items()}, "calls": dict(self.calls)}

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[label] += time.perf_counter() - wall
            self.cpu[label] += time.process_time() - cpu
            self.calls[label] += 1
            if self.progress is not None:
                self.progress.write_text(json.dumps(self.snapshot()))


def _install_timers(clock: _Clock) -> None:
    def timed(label, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with clock(label):
                return fn(*args, **kwargs)
        return wrapper

    for label, module_name, attr, cls in PATCHES:
        owner = importlib.import_module(module_name)
        if cls is not None:
            owner = getattr(owner, cls)
        setattr(owner, attr, timed(label, getattr(owner, attr)))
    gate_module = importlib.import_module("graph_passes.gate")
    session = gate_module._session

    @functools.wraps(session)
    def timed_session(model, optimize, *args, **kwargs):
        with clock("gate_session_all" if optimize else "gate_session_off"):
            return session(model, optimize, *args, **kwargs)
    gate_module._session = timed_session


def run_one(key: str, progress: Path | None = None) -> dict:
    import os

    from benchmarks.pypi_corpus import SAMPLES, TARGET, _random_data
    from graph_passes.errors import PrunequantError
    from graph_passes.feeds import pin_input_values
    from graph_passes.loading import load_model
    from graph_passes.prepare import prepare_model
    from graph_passes.shapes import parse_input_shapes
    from plugin.api import CompressConfig, compress
    from plugin.bridge import check_parity, convert
    from tests import pypi_corpus as pc

    entry = pc.BY_KEY[key]
    path = pc.fetch(entry)
    values = dict(v.split("=", 1) for v in entry.input_values)
    clock = _Clock(progress)
    row: dict = {"key": key}
    total = clock("total")
    total.__enter__()
    try:
        with clock("analyse"):
            prepared = prepare_model(str(path), entry.input_shapes, input_values=values)
        with clock("bridge"):
            check_parity(prepared.model, convert(prepared.model))
        _install_timers(clock)
        config = CompressConfig(target=TARGET, epochs=1, finetune_epochs=1, batch_size=8, max_steps_per_epoch=2,
                                progress=False, held_out=0.25, min_top1_agreement=0.0, seed=0,
                                input_shapes=parse_input_shapes(entry.input_shapes))
        source = (pin_input_values(load_model(str(path), config.input_shapes or None, batch=1), values)
                  if values else str(path))
        data = _random_data(prepared.model, SAMPLES)
        del prepared
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.onnx")
            result = compress(source, data, output=out, config=config)
            row["size_ratio"] = round(os.path.getsize(out) / path.stat().st_size, 3)
        row["outcome"] = "ok"
    except PrunequantError as exc:
        row["outcome"] = f"{type(exc).__name__}: {_line(exc)}"
    finally:
        total.__exit__(None, None, None)
    row.update(clock.snapshot())
    return row


def _child(key: str, profile: Path | None, progress: Path | None) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # as benchmarks/pypi_corpus.py
        if profile is None:
            row = run_one(key, progress)
        else:  # cProfile of the whole run (pstats file per model)
            import cProfile

            profiler = cProfile.Profile()
            row = profiler.runcall(run_one, key, progress)
            profile.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(profile / f"{key}.prof"))
    except Exception as exc:  # a bug: the row says where
        row = {"key": key, "outcome": f"BUG {type(exc).__name__}: {_line(exc)}",
               "traceback": traceback.format_exc()[-3000:]}
    print("@@ROW " + json.dumps(row, default=str), flush=True)  # noqa: T201


def to_markdown(rows: list[dict], field: str = "seconds") -> str:
    shown = [c for c in COLUMNS if any(c in r.get(field, {}) for r in rows)]
    lines = ["| model | run | " + " | ".join(shown) + " | outcome |", "|---|---|" + "---|" * len(shown) + "---|"]
    for r in rows:
        s = r.get(field, {})
        cells = [f"{s[c]:.1f}" if c in s else "" for c in shown]
        outcome = r.get("outcome", r.get("timeout", ""))
        if r.get("calls", {}).get("search_epochs"):
            outcome = f"{r['calls']['search_epochs']} search epochs; {outcome}"
        if r.get("size_ratio") is not None:
            outcome += f" ({r['size_ratio']:.2f}x)"
        lines.append(f"| {r['key']} | {r.get('label', '')} | " + " | ".join(cells) + f" | {outcome[:160]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", required=False)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--label", default="")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other labels / models")
    parser.add_argument("--profile", type=Path, help="also write a cProfile file per model into this folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "pypi-corpus-stages-cpu")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.profile, args.progress)
        return
    from benchmarks.provenance import commit, versions
    from tests import pypi_corpus as pc

    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="pq-stages-"))
    for key in args.only or [m.key for m in pc.MODELS]:
        progress = scratch / f"{key}.json"
        start = time.perf_counter()
        try:
            extra = ["--profile", str(args.profile)] if args.profile else []
            proc = subprocess.run([sys.executable, __file__, "--child", key, "--progress", str(progress), *extra],
                                  capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@ROW ")]
            row = json.loads(found[-1][6:]) if found else {
                "key": key, "outcome": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:  # the stages timed so far (the search: epochs in calls)
            row = {"key": key, "outcome": f"not finished in {args.timeout} s (the stages timed until then)",
                   **(json.loads(progress.read_text()) if progress.is_file() else {})}
        row.update(label=args.label, wall=round(time.perf_counter() - start, 1), commit=commit())
        rows.append(row)
        print(f"{key} [{args.label}]: {json.dumps(row.get('seconds'))} {row.get('outcome')}", flush=True)  # noqa: T201
    if args.merge and args.out.with_suffix(".json").is_file():
        fresh = {(r["key"], r["label"]): r for r in rows}
        previous = json.loads(args.out.with_suffix(".json").read_text())["rows"]
        rows = [fresh.pop((r["key"], r.get("label", "")), r) for r in previous] + list(fresh.values())
    result = {"command": " ".join(["benchmarks/pypi_corpus_stages.py", *sys.argv[1:]]), "commit": commit(),
              "versions": versions(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    md = ("CPU seconds (process time, all threads):\n\n" + to_markdown(rows, "cpu_seconds")
          + "\n\nWall seconds:\n\n" + to_markdown(rows))
    args.out.with_suffix(".md").write_text(
        f"`{result['command']}`; commit {result['commit']}; versions {json.dumps(result['versions'])}\n\n{md}\n")
    print(md)  # noqa: T201


if __name__ == "__main__":
    main()
