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

``--compare-permute`` also exports every plan with the mixed-width groups left in their channel
order (``plugin.export.PERMUTE_BY_WIDTH`` off: one DequantizeLinear per width, Concat, Gather),
a row ``NAME (gather)`` beside each row of the default (channels reordered by width: Concat, no
Gather). ``--latency`` times the mixed plan's three layouts in onnxruntime (ENABLE_ALL, one
thread, batch 1 and 32, interleaved rounds, process CPU time per batch): ``gather``, ``concat``
(the default) and ``split`` (each mixed Conv split into one Conv per width, outputs
concatenated: the alternative layout, built here from the ``concat`` model, not exported by
prunequant). ``--no-permute`` exports the Gather layout only.
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


def split_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ``split`` layout: each Conv reading ``Concat(DQ_a, DQ_b, ...)`` on axis 0 becomes one
    Conv per part (the part's bias slice) and a Concat of their outputs on axis 1. A part below
    8 bits reads its DequantizeLinear through the no-op Reshape guard (``graph_passes.qdq``)."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    zeros = "split_zero_shape"
    g.initializer.append(numpy_helper.from_array(np.zeros(4, np.int64), zeros))
    new_nodes, drop = [], set()
    k = 0
    for n in list(g.node):
        cat = producer.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if cat is None or cat.op_type != "Concat" or not all(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in cat.input):
            continue
        bias = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
        offset, outs = 0, []
        for part in cat.input:
            dq = producer[part]
            rows = inits[dq.input[0]].dims[0]
            w = part
            if inits[dq.input[0]].data_type != TensorProto.INT8:
                w = f"split_guard_{k}"
                new_nodes.append(helper.make_node("Reshape", [part, zeros], [w], name=w))
            inputs = [n.input[0], w]
            if bias is not None:
                b = f"split_bias_{k}"
                g.initializer.append(numpy_helper.from_array(bias[offset:offset + rows], b))
                inputs.append(b)
            y = f"split_out_{k}"
            new_nodes.append(helper.make_node("Conv", inputs, [y], name=y, **{a.name: helper.get_attribute_value(a)
                                                                             for a in n.attribute}))
            outs.append(y)
            offset += rows
            k += 1
        new_nodes.append(helper.make_node("Concat", outs, [n.output[0]], name=f"split_cat_{k}", axis=1))
        drop |= {id(n), id(cat)}
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep + new_nodes)
    from graph_passes.qdq import topological_sort

    topological_sort(g)
    used = {i for n in g.node for i in n.input}
    alive = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)
    del taken
    return out


def latency(variants: dict[str, onnx.ModelProto], x: np.ndarray, batches=(1, 32), rounds: int = 15) -> dict:
    """Per variant and batch: median over ``rounds`` interleaved rounds of the process CPU time
    and the wall time of one run (ms), onnxruntime ENABLE_ALL with one intra-op thread."""
    import os

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for k, m in variants.items()}
    name = next(iter(variants.values())).graph.input[0].name
    out: dict = {"load_average_before": list(os.getloadavg())}
    for batch in batches:
        feed = {name: np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))}
        runs = max(5, 400 // batch)
        cpu = {k: [] for k in sessions}
        wall = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(10):
                s.run(None, feed)
        for _ in range(rounds):
            for k, s in sessions.items():
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(runs):
                    s.run(None, feed)
                cpu[k].append((time.process_time() - c0) / runs * 1e3)
                wall[k].append((time.perf_counter() - w0) / runs * 1e3)
        out[f"batch{batch}"] = {k: {"cpu_ms": float(np.median(cpu[k])), "wall_ms": float(np.median(wall[k])),
                                    "runs_per_round": runs, "rounds": rounds} for k in sessions}
    out["load_average_after"] = list(os.getloadavg())
    return out


def permute_check(paths: list[Path], seed: int = 0) -> list[dict]:
    """The permutation pass alone on real models: a quarter of every prunable group's channels
    removed at random (repaired), every exact prunable group's kept channels in a random order,
    the permuted float model against the pruned one on random inputs (onnxruntime, relative
    error of the worst output), and what was refused and why."""
    from collections import Counter

    from graph_passes.ort_utils import compare_outputs, make_session, random_feeds
    from graph_passes.permute import permute_groups
    from graph_passes.prepare import prepare_model
    from graph_passes.prune import prune_channels, repair_removal

    rows = []
    for path in paths:
        start = time.perf_counter()
        prepared = prepare_model(str(path))
        analysis = prepared.analysis
        rng = np.random.default_rng(seed)
        groups = [g for g in analysis.prunable_groups if g.size > 1]
        removal = {g.id: rng.choice(g.size, g.size // 4, replace=False).tolist() for g in groups if g.size >= 4}
        removal = repair_removal(analysis, {k: v for k, v in removal.items() if v})
        pruned = prune_channels(prepared.model, analysis, removal)
        orders = {g.id: rng.permutation([c for c in range(g.size) if c not in set(removal.get(g.id, []))]).tolist()
                  for g in groups}
        result = permute_groups(pruned, analysis, removal, orders)
        session = make_session(pruned)
        feeds = random_feeds(session)
        err = compare_outputs(make_session(result.model).run(None, feeds), session.run(None, feeds)).max_rel_error
        reasons = Counter(why.split("'")[0] + (why.split("'")[2] if why.count("'") >= 2 else "")
                          for why in result.refused.values())
        rows.append({"model": path.stem, "groups": len(groups), "permuted": len(result.permuted),
                     "refused": len(result.refused), "refusals": dict(reasons), "max_rel_error": err,
                     "seconds": time.perf_counter() - start})
    return rows


def _levels_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: x})[0]


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
    ap.add_argument("--no-permute", action="store_true", help="export the Gather layout only")
    ap.add_argument("--compare-permute", action="store_true", help="a (gather) row beside each row")
    ap.add_argument("--latency", action="store_true", help="time the mixed plan's layouts in onnxruntime")
    ap.add_argument("--permute-check", type=Path, nargs="+", metavar="MODEL.onnx",
                    help="only check the permutation pass on these models (results-LABEL: a table)")
    args = ap.parse_args(argv)
    if args.permute_check:
        checked = permute_check(args.permute_check)
        lines = [f"permutation check ({args.label or 'run'}): random removal + random order of every exact "
                 "prunable group, permuted vs pruned float model on random inputs", "",
                 "| model | prunable groups | permuted | refused (why) | max rel error |", "|---|---|---|---|---|"]
        for r in checked:
            why = ", ".join(f"{k.strip()}: {v}" for k, v in r["refusals"].items()) or "-"
            lines.append(f"| {r['model']} | {r['groups']} | {r['permuted']} | {r['refused']} ({why}) | "
                         f"{r['max_rel_error']:.2e} |")
        text = "\n".join(lines)
        print(text)
        if args.out:
            provenance.write_results(args.out, args.label, {"label": args.label, "command": provenance.command_line(),
                                                            "commit": provenance.commit(),
                                                            "versions": provenance.versions(), "rows": checked}, text)
        return 0

    import onnx as _onnx

    import plugin.export as export_module
    from plugin.api import CompressConfig, apply_plan, compress

    default_permute = not args.no_permute
    layouts = [(default_permute, "")] + ([(False, " (gather)")] if args.compare_permute and default_permute else [])
    timing = None

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
            x = np.load(test)["input"]
            applied_models = {}
            for permute, suffix in layouts:
                export_module.PERMUTE_BY_WIDTH = permute
                try:
                    start = time.perf_counter()
                    applied = apply_plan(str(model), plan, data=str(test), progress=False)
                    seconds = time.perf_counter() - start
                finally:
                    export_module.PERMUTE_BY_WIDTH = True
                applied_models[permute] = applied.model
                b = breakdown(applied.model)
                o = original_graph(_onnx.load(str(model)))
                base = b["packed_weights"] + b["scales_zp_index"] + b["float_kept"] + o["graph"]
                rows.append({"model": name + suffix, "plan": plan.name, "plan_sha256": provenance.file_sha256(plan),
                             "permute_by_width": permute,
                             **b, "original": o, "target_bytes": int(1.25 * base), "ratio_to_base": b["file"] / base,
                             "meets_target": b["file"] <= 1.25 * base,
                             "file_over_packed_plus_scales": b["file"] / (b["packed_weights"] + b["scales_zp_index"]),
                             "gate": "passed",  # apply_plan raises when the gate refuses
                             "ort_levels": run_levels(applied.model, x), "export_seconds": seconds})
            if args.latency and name.endswith("-mixed") and True in applied_models and False in applied_models:
                split = split_convs(applied_models[True])
                variants = {"gather": applied_models[False], "concat": applied_models[True], "split": split}
                timing = {"model": name, "nodes": {k: len(m.graph.node) for k, m in variants.items()},
                          "bytes": {k: len(m.SerializeToString()) for k, m in variants.items()},
                          "split_ort_levels": run_levels(split, x),
                          "split_vs_concat_max_abs_diff": float(np.abs(
                              _levels_output(split, x) - _levels_output(applied_models[True], x)).max()),
                          **latency(variants, x)}
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
    if timing is not None:
        lines += ["", f"{timing['model']}: onnxruntime ENABLE_ALL, 1 thread, median of {timing['batch1']['gather']['rounds']} "
                  f"interleaved rounds (load average {timing['load_average_before'][0]:.2f} before, "
                  f"{timing['load_average_after'][0]:.2f} after)", "",
                  "| layout | nodes | file B | batch 1 CPU ms | batch 1 wall ms | batch 32 CPU ms | batch 32 wall ms |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("gather", "concat", "split"):
            lines.append(f"| {k} | {timing['nodes'][k]} | {timing['bytes'][k]:,} | {timing['batch1'][k]['cpu_ms']:.3f} | "
                         f"{timing['batch1'][k]['wall_ms']:.3f} | {timing['batch32'][k]['cpu_ms']:.3f} | "
                         f"{timing['batch32'][k]['wall_ms']:.3f} |")
        worst = max(v["max_abs_diff"] for v in timing["split_ort_levels"].values())
        lines.append(f"\nsplit layout: every ORT level vs DISABLE_ALL max |diff| {worst:.3g}; vs concat "
                     f"max |diff| {timing['split_vs_concat_max_abs_diff']:.3g}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                  "versions": provenance.versions(), "target": args.target, "rows": rows, "latency": timing}
        provenance.write_results(args.out, args.label, record, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
