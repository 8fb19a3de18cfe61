"""Compress every CNN of the test corpus with random inputs and a very short search: does the
whole pipeline (bridge, search, QAT, export, validation) hold on models we did not write?

    .ci/env python benchmarks/compress_corpus.py [--only NAME ...] [--json out.json]

Random inputs carry no task, so the figures say nothing about accuracy: only that a validated
QDQ model comes out (top-1 agreement with the fake-quantized torch model on held-out inputs),
with pruned channels gone and mixed bit-widths, and how long each phase takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_passes.errors import PrunequantError  # noqa: E402
from plugin.api import CompressConfig, compress  # noqa: E402
from tests import corpus  # noqa: E402


def _random_data(entry, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal([n, *shape[1:]]).astype(np.float32)
            for name, shape in entry.input_shapes.items()}


def run(name: str, samples: int, target: str) -> dict:
    entry = corpus.get_model(name)
    # random nets on random inputs have near-tied logits: agreement is reported, not enforced
    config = CompressConfig(target=target, epochs=1, finetune_epochs=1, batch_size=8, max_steps_per_epoch=4,
                            progress=False, held_out=0.25, min_top1_agreement=0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compress(str(entry.path), _random_data(entry, samples, 0), output=f"{tmp}/m.onnx",
                          config=config)
    report = result.report
    bits = Counter()
    for layer in report["layers"].values():
        bits.update({int(b): n for b, n in layer["bits"].items()})
    before = sum(v["channels_before"] for v in report["layers"].values())
    after = sum(v["channels_after"] for v in report["layers"].values())
    return {
        "model": name, "ok": True, "seconds": round(time.perf_counter() - start, 1),
        "channels": f"{after}/{before}", "bits": dict(sorted(bits.items())),
        "size_ratio": report["cost_after"]["size"] / report["cost_before_8bit"]["size"],
        "agreement": report["quality"]["fake_quant_top1_agreement"],
        "parity": report["quality"]["fake_quant_max_rel_error"],
        "file_bytes": report["file"]["bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--target", default="size=50%", help="budget the short search must meet")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    names = args.only or [n for n in corpus.CORPUS_NAMES if not n.startswith("light_") and "vit" not in n]
    print("| model | result | channels kept | weight bits (channels) | size vs 8-bit | top-1 agreement | max rel error | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        try:
            row = run(name, args.samples, args.target)
            print(f"| {name} | ok | {row['channels']} | {row['bits']} | {row['size_ratio']:.3f} | "
                  f"{100 * row['agreement']:.1f}% | {row['parity']:.1e} | {row['seconds']} |", flush=True)
        except PrunequantError as exc:
            row = {"model": name, "ok": False, "error": str(exc)}
            print(f"| {name} | FAILED: {str(exc)[:150]} | | | | | | |", flush=True)
        except Exception as exc:  # a bug: keep going, but say where
            row = {"model": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
            print(f"| {name} | BUG: {type(exc).__name__}: {str(exc)[:150]} | | | | | | |", flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
