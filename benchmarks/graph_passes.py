"""Benchmark: load + normalise + analyse time, on resnet50 and synthetic graphs of growing size.

    .ci/env python benchmarks/graph_passes.py            # full: 100 ... 5,000 nodes
    .ci/env python benchmarks/graph_passes.py --quick

Prints a table: nodes, load, normalise (without and with the onnxruntime parity check),
analyse (channel groups), and the growth factor per 10x nodes. resnet50 and vit_b_16 come from
the test corpus (torchvision, random weights, 1x3x32x32; vit_b_16 from both exporters, one
repetition: 346 MB of weights). The BERT-style encoders (hidden 64, 4 heads, MLP 256, random
weights, built with `transformers` and exported with torch.onnx's legacy exporter) grow in depth
to show that the attention rules keep the analysis linear in nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_passes.channel_groups import analyse  # noqa: E402
from graph_passes.loading import load_model  # noqa: E402
from graph_passes.normalise import normalise  # noqa: E402


def synthetic(n_nodes: int, residual: bool, channels: int = 8) -> onnx.ModelProto:
    """A chain of Conv+Relu (or residual Conv-Relu-Conv-Add-Relu) blocks with about n nodes."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x, i = "x", 0
    per_block = 5 if residual else 2
    for b in range(max(1, n_nodes // per_block)):
        def conv(inp: str, tag: str) -> str:
            w = f"w{b}{tag}"
            inits.append(numpy_helper.from_array(
                (rng.standard_normal([channels, channels, 1, 1]) * 0.3).astype(np.float32), w))
            out = f"c{b}{tag}"
            nodes.append(helper.make_node("Conv", [inp, w], [out], name=f"conv{b}{tag}"))
            return out
        if residual:
            h = conv(x, "a")
            nodes.append(helper.make_node("Relu", [h], [f"r{b}a"], name=f"relu{b}a"))
            h = conv(f"r{b}a", "b")
            nodes.append(helper.make_node("Add", [x, h], [f"s{b}"], name=f"add{b}"))
            nodes.append(helper.make_node("Relu", [f"s{b}"], [f"y{b}"], name=f"relu{b}"))
        else:
            h = conv(x, "a")
            nodes.append(helper.make_node("Relu", [h], [f"y{b}"], name=f"relu{b}"))
        x = f"y{b}"
        i += per_block
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _time(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(model: onnx.ModelProto, repeat: int) -> dict:
    t_load, loaded = _time(lambda: load_model(model), repeat)
    t_norm, result = _time(lambda: normalise(loaded, verify=False), repeat)
    t_verify, _ = _time(lambda: normalise(loaded, verify=True), 1)
    t_analyse, analysis = _time(lambda: analyse(result.model), repeat)
    return {
        "nodes": len(model.graph.node), "load": t_load, "normalise": t_norm,
        "normalise_verified": t_verify, "analyse": t_analyse,
        "total": t_load + t_norm + t_analyse, "groups": len(analysis.groups),
    }


def _row(name: str, m: dict) -> str:
    return (f"{name:<22} {m['nodes']:>6} {m['load']:>8.3f} {m['normalise']:>10.3f} "
            f"{m['normalise_verified']:>12.3f} {m['analyse']:>8.3f} {m['total']:>8.3f} {m['groups']:>7}")


def _growth(label: str, rows: list[dict]) -> None:
    first, last = rows[0], rows[-1]
    node_ratio = last["nodes"] / first["nodes"]
    time_ratio = last["analyse"] / first["analyse"]
    per10 = time_ratio ** (1 / np.log10(node_ratio))
    print(f"  {label}: {node_ratio:.1f}x nodes -> {time_ratio:.1f}x analyse time ({per10:.1f}x per 10x nodes)")


def transformers_rows(repeat: int, quick: bool) -> None:
    """vit_b_16 (both exporters) and BERT-style encoders of growing depth."""
    import tempfile

    try:
        from tests.corpus import get_model

        for exporter in ("legacy", "dynamo"):
            vit = onnx.load(get_model(f"vit_b_16-{exporter}").path)
            print(_row(f"vit_b_16 ({exporter})", measure(vit, 1)))
            del vit
    except Exception as exc:  # the corpus needs torch; report and go on
        print(f"vit_b_16: skipped ({type(exc).__name__}: {exc})")
    try:
        from tests.test_attention_groups import bert_encoder
    except Exception as exc:  # noqa: BLE001 - needs torch and transformers
        print(f"bert: skipped ({type(exc).__name__}: {exc})")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in ([2, 8] if quick else [2, 4, 8, 16]):
            path = bert_encoder(Path(tmp) / f"bert{layers}.onnx", layers=layers)
            m = measure(onnx.load(path), repeat)
            rows.append(m)
            print(_row(f"bert {layers} layers", m))
    _growth("bert", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, one repetition")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    sizes = [100, 1000] if args.quick else [100, 500, 1000, 2000, 5000]
    print(f"{'model':<22} {'nodes':>6} {'load s':>8} {'normalise s':>10} {'+verify s':>12} "
          f"{'analyse s':>8} {'total s':>8} {'groups':>7}")
    print("(total = load + normalise + analyse; '+verify' = normalise with the onnxruntime check)")
    try:
        from tests.corpus import get_model

        resnet = onnx.load(get_model("resnet50-legacy").path)
        print(_row("resnet50 (legacy)", measure(resnet, repeat)))
    except Exception as exc:  # the corpus needs torch; report and go on
        print(f"resnet50: skipped ({type(exc).__name__}: {exc})")
    transformers_rows(repeat, args.quick)
    for residual in (False, True):
        rows = []
        for n in sizes:
            m = measure(synthetic(n, residual), repeat)
            rows.append(m)
            print(_row(f"{'residual' if residual else 'chain'} {n}", m))
        first, last = rows[0], rows[-1]
        node_ratio = last["nodes"] / first["nodes"]
        time_ratio = last["total"] / first["total"]
        per10 = time_ratio ** (1 / np.log10(node_ratio))
        print(f"  {'residual' if residual else 'chain'}: {node_ratio:.0f}x nodes -> {time_ratio:.1f}x time "
              f"({per10:.1f}x per 10x nodes)")


if __name__ == "__main__":
    main()
