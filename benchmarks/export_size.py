"""Where the bytes of an exported file go: packed weights, scales/zero points/indices, graph.

For each model (the digits sample, and ResNet-8 trained on digits from ``bench_networks``) a
plan compressed to a low budget (``--target``, default ``size=10%``) is searched once and saved
under ``--plans`` (reused when it exists, so the same plans can be exported by two commits),
then applied with ``plugin.api.apply_plan`` (the export and the gate, on the task's test split).
A third row, ``digits-sample-mixed``, exports a made-up plan with all three widths in every
layer (the mixed-width path). The file is split into

* packed weights: the integer payload of the DequantizeLinear weight initializers,
* scales / zero points / indices: the payload of every Q/DQ scale and zero point, and of the
  Gather indices and Reshape shapes on a weight's path,
* float tensors kept: the payload of every other initializer (biases, unquantized weights),
* graph: everything else (nodes, names, tensor headers, opsets, metadata),

beside the original model's graph bytes (its file minus its initializers' payload). The target
(issue 15): file <= 1.25 x (packed + scales + float kept + the original graph). Each exported
model is also run by onnxruntime at every graph optimisation level on the test inputs.

    python benchmarks/export_size.py --plans /tmp/export-plans --out benchmarks/results/export-size-cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"] + [str(ROOT / "benchmarks")]

import provenance  # noqa: E402

QDQ = ("QuantizeLinear", "DequantizeLinear")
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT2: 2, TensorProto.UINT2: 2}


def payload(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values as stored (packed for 4/2-bit types)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    bits = _BITS.get(t.data_type)
    if bits:
        return (n * bits + 7) // 8
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def breakdown(model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    weight_path: set[str] = set()  # outputs of the DQ/Concat/Gather/Reshape chain of a weight
    packed, qparams = set(), set()
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            packed.add(n.input[0])
            weight_path.add(n.output[0])
        if n.op_type in QDQ:
            qparams.update(i for i in n.input[1:] if i in inits)
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if n.op_type in ("Concat", "Gather", "Reshape", "Slice") and n.input and n.input[0] in weight_path:
                if n.output[0] not in weight_path:
                    weight_path.add(n.output[0])
                    changed = True
                qparams.update(i for i in n.input[1:] if i in inits)
    del producer
    nbytes = len(model.SerializeToString())
    p = sum(payload(inits[k]) for k in packed)
    s = sum(payload(inits[k]) for k in qparams - packed)
    f = sum(payload(t) for name, t in inits.items() if name not in packed and name not in qparams)
    return {"file": nbytes, "packed_weights": p, "scales_zp_index": s, "float_kept": f,
            "graph": nbytes - p - s - f, "nodes": len(g.node), "initializers": len(g.initializer),
            "ops": dict(sorted(_count(n.op_type for n in g.node).items()))}


def original_graph(model: onnx.ModelProto) -> dict:
    nbytes = len(model.SerializeToString())
    init = sum(payload(t) for t in model.graph.initializer)
    return {"file": nbytes, "initializer_payload": init, "graph": nbytes - init, "nodes": len(model.graph.node)}


def _count(items):
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def run_levels(model: onnx.ModelProto, x: np.ndarray) -> dict:
    """Outputs at every onnxruntime optimisation level vs ORT_DISABLE_ALL (max |diff|, top-1)."""
    import onnxruntime as ort

    name = model.graph.input[0].name
    data = model.SerializeToString()
    out, ref = {}, None
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.log_severity_level = 3
        y = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        if ref is None:
            ref = y
        out[level] = {"max_abs_diff": float(np.abs(y - ref).max()),
                      "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean())}
    return out


def models(work: Path) -> list[tuple[str, Path, Path, Path]]:
    """(name, model, train npz, test npz)."""
    import bench_networks as bn
    from bench_tasks import load_task

    out = [("digits-sample", ROOT / "samples/digits/model.onnx", ROOT / "samples/digits/train.npz",
            ROOT / "samples/digits/test.npz")]
    task = load_task("digits", bn.CACHE)
    path, _ = bn.get_model(task, "resnet8", 1.0, 40, 0)
    train, test = work / "digits_train.npz", work / "digits_test.npz"
    np.savez(train, input=task.x_train, labels=task.y_train)
    np.savez(test, input=task.x_test, labels=task.y_test)
    out.append(("digits-resnet8", path, train, test))
    out.append(("digits-sample-mixed", out[0][1], out[0][2], out[0][3]))
    return out


def mixed_plan(model: Path, path: Path) -> None:
    """A plan with every width in every layer (channel c at (8, 4, 2)[c % 3], activations 8 bits,
    nothing pruned): the mixed-width export path (one DequantizeLinear per width, Concat, Gather)."""
    from graph_passes.digest import model_digest
    from graph_passes.prepare import prepare_model
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(model))
    space = SearchSpace(prepared.analysis, Precisions((8, 4, 2, 0), (8, 4, 2)),
                        model_sha256=model_digest(prepared.original))
    bits = {name: [(8, 4, 2)[c % 3] for c in range(len(info.columns))] for name, info in space.layers.items()}
    space.plan(layer_bits=bits, site_bits=8).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=Path, required=True, help="folder of the searched plans (made when missing)")
    ap.add_argument("--out", type=Path, help="write results.json and results.md here")
    ap.add_argument("--label", default="", help="a name for this run in the output (e.g. before, after)")
    ap.add_argument("--target", default="size=10%")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)

    import onnx as _onnx

    from plugin.api import CompressConfig, apply_plan, compress

    args.plans.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, train, test in models(Path(tmp)):
            plan = args.plans / f"{name}.plan.json"
            if name.endswith("-mixed") and not plan.exists():
                mixed_plan(model, plan)
            elif not plan.exists():
                cfg = CompressConfig(target=args.target, epochs=args.epochs, finetune_epochs=0, progress=False,
                                     seed=0, compare_runtimes=False)
                res = compress(str(model), str(train), config=cfg)
                res.plan.save(plan)
            start = time.perf_counter()
            applied = apply_plan(str(model), plan, data=str(test), progress=False)
            seconds = time.perf_counter() - start
            b = breakdown(applied.model)
            o = original_graph(_onnx.load(str(model)))
            base = b["packed_weights"] + b["scales_zp_index"] + b["float_kept"] + o["graph"]
            x = np.load(test)["input"]
            rows.append({"model": name, "plan": plan.name, "plan_sha256": provenance.file_sha256(plan),
                         **b, "original": o, "target_bytes": int(1.25 * base), "ratio_to_base": b["file"] / base,
                         "meets_target": b["file"] <= 1.25 * base,
                         "file_over_packed_plus_scales": b["file"] / (b["packed_weights"] + b["scales_zp_index"]),
                         "gate": "passed",  # apply_plan raises when the gate refuses
                         "ort_levels": run_levels(applied.model, x), "export_seconds": seconds})
    lines = [f"export size ({args.label or 'run'}), plans searched at {args.target}", "",
             "| model | file B | packed weights | scales/zp/index | float kept | graph | original graph | "
             "file / (packed+scales+float+orig graph) | nodes (orig) | meets <= 1.25 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['file']:,} | {r['packed_weights']:,} | {r['scales_zp_index']:,} | "
                     f"{r['float_kept']:,} | {r['graph']:,} | {r['original']['graph']:,} | "
                     f"{r['ratio_to_base']:.2f} | {r['nodes']} ({r['original']['nodes']}) | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    for r in rows:
        worst = max(v["max_abs_diff"] for v in r["ort_levels"].values())
        agree = min(v["top1_agreement"] for v in r["ort_levels"].values())
        lines.append(f"\n{r['model']}: ops {r['ops']}; every ORT level vs DISABLE_ALL: max |diff| {worst:.3g}, "
                     f"top-1 agreement >= {100 * agree:.1f}%")
    text = "\n".join(lines)
    print(text)
    if args.out:
        record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                  "versions": provenance.versions(), "target": args.target, "rows": rows}
        provenance.write_results(args.out, args.label, record, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
