"""All per-op knowledge of weight ops lives in graph_passes/op_rules/: one rule object per op.

* a static check: no module outside ``graph_passes/op_rules/`` compares (``==``, ``!=``, ``in``,
  ``not in``, ``match``) an ``.op_type`` against a weight op's name, or looks an ``.op_type`` up
  in a dispatch dict keyed by weight op names;
* the weight-layer facts the rules compute (axes, C_in/C_out, MACs, cost kind/kernel/spatial)
  pinned on small models of every weight op, against the formulas they replaced.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from graph_passes.channel_groups import analyse
from graph_passes.op_rules import find_rule, weight_rule, WeightOpRule
from graph_passes.qdq import weight_axis

from .graph_helpers import build, prepare

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("graph_passes", "plugin", "cost_models")
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}

# Where switching on a weight op's op_type is allowed (paths relative to the repository root).
ALLOWED = {
    # the rules themselves: this is where per-op knowledge belongs
    "graph_passes/op_rules/",
    # (plugin/bridge/ dispatches its torch converters through a registry keyed by op type, which
    # is its job; it does so through variables, which the checker does not flag, so it needs no
    # entry here. Add "plugin/bridge/" with that reason should a converter compare a node's
    # op_type with a weight op's name.)
}
# Files that may still switch on weight op types while they are being moved by the core refactor
# (issue 9), each with its reason. Empty: plugin/searchable.py, the last one (_layer_spec and
# _wrap_layer's ConvTranspose axis), is gone; plugin/space.py and plugin/engine/ read
# WeightLayer.cost_kind / cost_kernel / cost_spatial / weight_out_axis instead.
ALLOWLIST: dict[str, str] = {}


def _string_literals(node: ast.AST) -> set[str]:
    """Strings in a literal (a str, or a tuple/list/set/frozenset(...) of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset", "tuple"):
        return set().union(*(_string_literals(a) for a in node.args)) if node.args else set()
    return set()


def _is_op_type(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "op_type"


def _module_constants(tree: ast.Module) -> dict[str, set[str]]:
    """Module-level names bound to string literals (``WEIGHT_OPS = ("Conv", ...)``)."""
    out: dict[str, set[str]] = {}
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else (
            [stmt.target] if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else [])
        value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        for t in targets:
            if isinstance(t, ast.Name) and value is not None and _string_literals(value):
                out[t.id] = _string_literals(value)
    return out


def _dict_keys(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return set()


def _module_dicts(tree: ast.Module) -> dict[str, set[str]]:
    """Module-level names bound to dict literals with string keys (dispatch tables)."""
    out: dict[str, set[str]] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                if isinstance(t, ast.Name) and _dict_keys(stmt.value):
                    out[t.id] = _dict_keys(stmt.value)
    return out


def weight_op_switches(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, weight ops) of every comparison of an ``.op_type`` with weight-op names, and of
    every look-up by ``.op_type`` in a dict literal keyed by weight-op names."""
    tree = ast.parse(source, filename)
    constants = _module_constants(tree)
    tables = _module_dicts(tree)

    def table_keys(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Name):
            return tables.get(node.id, set())
        return _dict_keys(node)

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Name) and node.id in constants:
            return constants[node.id]
        return _string_literals(node)

    hits: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_op_type(o) for o in operands):
                found = set().union(*(names(o) for o in operands if not _is_op_type(o))) & WEIGHT_OPS
                if found:
                    hits.append((node.lineno, ",".join(sorted(found))))
        elif isinstance(node, ast.Subscript) and _is_op_type(node.slice):
            found = table_keys(node.value) & WEIGHT_OPS
            if found:
                hits.append((node.lineno, ",".join(sorted(found))))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and _is_op_type(node.args[0])):
            found = table_keys(node.func.value) & WEIGHT_OPS
            if found:
                hits.append((node.lineno, ",".join(sorted(found))))
        elif isinstance(node, ast.Match) and _is_op_type(node.subject):
            for case in node.cases:
                found = {p.value.value for p in ast.walk(case.pattern)
                         if isinstance(p, ast.MatchValue) and isinstance(p.value, ast.Constant)} & WEIGHT_OPS
                if found:
                    hits.append((case.pattern.lineno, ",".join(sorted(found))))
    return hits


def _scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def _allowed(rel: str) -> bool:
    return rel in ALLOWLIST or any(rel.startswith(prefix) for prefix in ALLOWED)


def test_no_module_outside_op_rules_switches_on_weight_op_types():
    offenders = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        if _allowed(rel):
            continue
        for line, ops in weight_op_switches(path.read_text(encoding="utf-8"), rel):
            offenders.append(f"{rel}:{line} switches on op_type {ops}")
    assert not offenders, ("per-op knowledge of weight ops belongs in graph_passes/op_rules/ "
                           "(ask weight_rule(node) / WeightLayer fields):\n" + "\n".join(offenders))


def test_allowlist_entries_exist():
    for rel in ALLOWLIST:
        assert (ROOT / rel).exists(), f"{rel} is gone: drop it from ALLOWLIST"


@pytest.mark.parametrize("src,expected", [
    ('if node.op_type == "Conv": pass', 1),
    ('if "Gemm" == layer.op_type: pass', 1),
    ('x = n.op_type in ("Gemm", "MatMul")', 1),
    ('x = n.op_type not in {"Relu", "ConvTranspose"}', 1),
    ('OPS = ("Conv", "Gemm")\nx = n.op_type in OPS', 1),
    ('match node.op_type:\n    case "MatMul":\n        pass', 1),
    ('FOLD = {"Conv": f, "Gemm": g}\nx = FOLD.get(node.op_type)', 1),
    ('FOLD = {"Conv": f}\nx = FOLD[node.op_type]', 1),
    ('x = {"Gemm": 1}.get(node.op_type, 0)', 1),
    ('T = {"Relu": f}\nx = T.get(node.op_type)', 0),
    ('x = n.op_type == "Identity"', 0),
    ('x = n.op_type in ("BatchNormalization", "Dropout")', 0),
    ('x = op_type == "Conv"', 0),  # a plain variable (the bridge's registries), not a node's op_type
])
def test_the_checker_itself(src, expected):
    assert len(weight_op_switches(src)) == expected


# --- the facts the rules compute --------------------------------------------------------------

def _one_layer(text: str, **shapes):
    model, analysis = prepare(build(text, **shapes))
    assert len(analysis.layers) == 1
    return analysis.layers[0]


def test_every_weight_op_has_one_rule_object_with_the_facet():
    for op in WEIGHT_OPS:
        rule = find_rule("", op, 21)
        assert isinstance(rule, WeightOpRule), op
        assert find_rule("", op, 11) is rule and find_rule("", op, None) is rule
    assert find_rule("", "Relu", None) is not None and not isinstance(find_rule("", "Relu", None), WeightOpRule)


def test_conv_facts():
    layer = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4,9,9] x) => (float[2,6,9,9] y) { y = Conv <pads=[1,1,1,1]> (x, w, b) }
    """, w=[6, 4, 3, 3], b=[6])
    assert (layer.weight_out_axis, layer.weight_in_axis) == (0, 1)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 1)
    assert layer.cost_kind == "conv" and not layer.is_depthwise and layer.is_conv
    assert layer.cost_kernel == (3, 3) and layer.cost_spatial == (9, 9)
    assert layer.macs == 2 * 6 * 9 * 9 * 4 * 9
    assert layer.params == 6 * 4 * 9 + 6


def test_depthwise_and_grouped_conv_facts():
    dw = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,4,8,8] y) { y = Conv <group=4, pads=[1,1,1,1]> (x, w) }
    """, w=[4, 1, 3, 3])
    assert dw.cost_kind == "depthwise" and dw.is_depthwise and dw.in_channels == 4
    grouped = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,6,8,8] y) { y = Conv <group=2, pads=[1,1,1,1]> (x, w) }
    """, w=[6, 2, 3, 3])
    assert grouped.cost_kind == "conv" and (grouped.in_channels, grouped.groups) == (4, 2)
    assert grouped.macs == 6 * 64 * 2 * 9


def test_conv1d_and_conv3d_pairs():
    c1 = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,10] x) => (float[1,5,8] y) { y = Conv(x, w) }
    """, w=[5, 3, 3])
    assert c1.cost_kernel == (1, 3) and c1.cost_spatial == (1, 8)
    c3 = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,2,4,4,4] x) => (float[1,3,2,2,2] y) { y = Conv(x, w) }
    """, w=[3, 2, 3, 3, 3])
    assert c3.cost_kernel == (1, 27) and c3.cost_spatial == (1, 8)


def test_conv_transpose_facts_use_the_input_spatial_size():
    layer = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,5,5] x) => (float[1,3,10,10] y) { y = ConvTranspose <strides=[2,2]> (x, w) }
    """, w=[4, 3, 2, 2])
    assert (layer.weight_out_axis, layer.weight_in_axis) == (1, 0)
    assert (layer.in_channels, layer.out_channels) == (4, 3)
    assert layer.cost_kind == "conv" and layer.cost_kernel == (2, 2) and layer.cost_spatial == (5, 5)
    assert layer.macs == 4 * 25 * 3 * 4


@pytest.mark.parametrize("trans_b,w_shape,axes", [(1, [5, 7], (0, 1)), (0, [7, 5], (1, 0))])
def test_gemm_facts(trans_b, w_shape, axes):
    layer = _one_layer(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,7] x) => (float[3,5] y) {{ y = Gemm <transB={trans_b}> (x, w, b) }}
    """, w=w_shape, b=[5])
    assert (layer.weight_out_axis, layer.weight_in_axis) == axes
    assert (layer.in_channels, layer.out_channels) == (7, 5)
    assert layer.cost_kind == "linear" and not layer.is_conv
    assert layer.cost_kernel == (1, 1) and layer.cost_spatial == (1, 1)
    assert layer.macs == 3 * 5 * 7


def test_matmul_facts_count_positions():
    layer = _one_layer("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4,6,7] x) => (float[2,4,6,5] y) { y = MatMul(x, w) }
    """, w=[7, 5])
    assert (layer.weight_out_axis, layer.weight_in_axis) == (1, 0)
    assert (layer.in_channels, layer.out_channels) == (7, 5)
    assert layer.cost_kind == "linear" and layer.cost_spatial == (1, 24)
    assert layer.macs == 2 * 24 * 5 * 7


def test_a_3d_matmul_weight_is_no_layer():
    model, analysis = prepare(build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,5] y) { y = MatMul(x, w) }
    """, w=[2, 4, 5]))
    assert analysis.layers == []


def test_qdq_weight_axis_and_zeroing_agree_with_the_layer():
    model, analysis = prepare(build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,3] y) {
          t = Conv <group=2, pads=[1,1,1,1]> (x, w1)
          u = GlobalAveragePool(t)
          v = Flatten(u)
          y = Gemm <transB=1> (v, w2)
        }
    """, w1=[6, 2, 3, 3], w2=[3, 6]))
    for layer in analysis.layers:
        node = analysis.graph.nodes[layer.name]
        assert weight_axis(node) == layer.weight_out_axis
        rule = weight_rule(node)
        w = analysis.graph.constant(layer.weight)
        zeroed = rule.zero_input_channels(w, node, layer.groups, np.array([1]))
        assert not np.shares_memory(zeroed, w)
        if layer.cost_kind == "linear":
            assert np.all(zeroed[:, 1] == 0) and np.all(zeroed[:, 0] == w[:, 0])
        else:  # input channel 1 is slice 1 of group 0 (output channels 0..2)
            assert np.all(zeroed[:3, 1] == 0) and np.all(zeroed[3:, 1] == w[3:, 1])


def _old_flat_pair(dims) -> tuple[int, ...]:
    """plugin/searchable._flat_pair before the move (a 1-d size stays 1-tuple; LayerSpec pads it)."""
    dims = [int(d) for d in dims]
    if not dims:
        return (1, 1)
    return tuple(dims) if len(dims) <= 2 else (1, int(np.prod(dims)))


def _pad(pair: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *pair) if len(pair) == 1 else pair


@pytest.mark.parametrize("sample,shape", [("digits", "input=1x1x8x8"), ("mnist1d", None)])
def test_the_samples_layers_match_the_old_formulas(sample, shape):
    """WeightLayer's cost fields == what plugin/searchable._layer_spec derived from op_type."""
    from graph_passes.prepare import prepare_model

    prepared = prepare_model(str(ROOT / "samples" / sample / "model.onnx"), [shape] if shape else [],
                             verify=False)
    analysis = prepared.analysis
    assert analysis.layers
    for layer in analysis.layers:
        out_shape = analysis.graph.shape(layer.output) or []
        if layer.op_type in ("Gemm", "MatMul"):
            positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
            old = ("linear", (1, 1), (1, positions))
        else:
            spatial = (analysis.graph.shape(layer.input) or [])[2:] if layer.op_type == "ConvTranspose" \
                else out_shape[2:]
            depthwise = layer.op_type == "Conv" and layer.groups > 1 and layer.groups == layer.in_channels
            old = ("depthwise" if depthwise else "conv", _pad(_old_flat_pair(layer.kernel)),
                   _pad(_old_flat_pair(spatial)))
        assert (layer.cost_kind, layer.cost_kernel, layer.cost_spatial) == old, layer.name
        batch = out_shape[0] if out_shape else 1
        per_sample = layer.out_channels * (layer.in_channels // layer.groups) \
            * int(np.prod(layer.cost_kernel)) * int(np.prod(layer.cost_spatial))
        assert per_sample * batch == layer.macs, layer.name
