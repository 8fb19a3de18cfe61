"""Attention heads as exact channel groups (issue 12).

A head group is the Dh rows of one head in Q, K and V plus the output projection's input
columns for it. The oracle: removing heads from the ONNX graph (projection rows and columns,
the Reshape's H entry) computes what zeroing those columns of the output projection computes,
in onnxruntime. Models: a Hugging Face BERT-style encoder (random weights, `transformers`
configuration, no downloads), torch's nn.TransformerEncoderLayer (nn.MultiheadAttention: one
fused in_proj), a hand-built grouped-query block, and torchvision vit_b_16 from the corpus
(slow).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_passes.channel_groups import ChannelAnalysis
from graph_passes.ort_utils import compare_outputs, make_session
from graph_passes.prepare import prepare_model
from graph_passes.prune import prune_channels, zero_channels

from .graph_helpers import build, prepare

torch = pytest.importorskip("torch")

SEQ = 8


# --------------------------------------------------------------------------- model builders


def _export(module, example: tuple, path: Path, names: list[str], exporter: str, opset: int = 18) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(dynamo=False, opset_version=17) if exporter == "legacy" else dict(dynamo=True, opset_version=opset)
        torch.onnx.export(module, example, str(path), input_names=names, **kwargs)
    if exporter == "dynamo":  # the dynamo exporter may write the weights beside: one file
        model = onnx.load(str(path))
        onnx.save(model, str(path))
    return path


def bert_encoder(path: Path, attn: str = "eager", exporter: str = "legacy", layers: int = 2,
                 opset: int = 18) -> Path:
    """BERT layers, hidden 64, 4 heads of 16, MLP 4x: a block of 9 weight-layer widths."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=16, attn_implementation=attn)
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 100, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    return _export(Wrapped(), (ids, mask), path, ["input_ids", "attention_mask"], exporter, opset)


def torch_encoder_layer(path: Path, exporter: str = "legacy") -> Path:
    """nn.TransformerEncoderLayer: nn.MultiheadAttention's fused in_proj (3*D rows)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, dropout=0.0, batch_first=True).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    return _export(Wrapped(), (torch.randn(1, 6, 32),), path, ["x"], exporter)


class GroupedQueryBlock(torch.nn.Module):
    """4 query heads sharing 2 K/V heads (Llama's repeat_kv: Expand + Reshape), causal mask."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, d // heads
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, kv_heads * self.dh)
        self.v = torch.nn.Linear(d, kv_heads * self.dh)
        self.o = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 64), torch.nn.Linear(64, d)

    def _repeat(self, t, b, s):
        g = self.heads // self.kv_heads
        return t[:, :, None].expand(b, self.kv_heads, g, s, self.dh).reshape(b, self.heads, s, self.dh)

    def forward(self, x):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, self.dh).transpose(1, 2)
        k = self._repeat(self.k(x).view(b, s, self.kv_heads, self.dh).transpose(1, 2), b, s)
        v = self._repeat(self.v(x).view(b, s, self.kv_heads, self.dh).transpose(1, 2), b, s)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        scores = scores + torch.triu(torch.full((s, s), float("-inf")), 1)
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(y)
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


# --------------------------------------------------------------------------- checks


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 100, shape).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[..., -2:] = 0  # padding: the mask Add is live
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def head_groups(analysis: ChannelAnalysis, n_heads: int):
    """Prunable groups whose producers are attention projections (one channel per head)."""
    return [g for g in analysis.prunable_groups if g.size == n_heads and len(g.producers) >= 1
            and all(len(m.positions) > g.size for m in g.members_of("producer"))]


def check_heads_oracle(model, analysis, removal, rtol: float = 1e-4, feeds: dict | None = None) -> onnx.ModelProto:
    pruned = prune_channels(model, analysis, removal)
    zeroed = zero_channels(model, analysis, removal)
    feeds = _feeds(model) if feeds is None else feeds
    ref = make_session(zeroed).run(None, feeds)
    got = make_session(pruned).run(None, feeds)
    assert compare_outputs(got, ref).max_rel_error <= rtol
    original = make_session(model).run(None, feeds)
    assert compare_outputs(original, ref).max_rel_error > 1e-3, "removing heads changed nothing"
    return pruned


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = bert_encoder(tmp_path_factory.mktemp("bert") / "bert.onnx")
    return prepare_model(path)


@pytest.mark.slow  # the BERT export (transformers + torch.onnx): ~10-20 s
def test_bert_heads_are_exact_groups(bert):
    model, analysis = bert.model, bert.analysis
    heads = head_groups(analysis, 4)
    assert len(heads) == 2  # one per layer
    for g in heads:
        producers = sorted(g.producers)
        assert [p.rsplit("/", 2)[-2] for p in producers] == ["key", "query", "value"]
        assert all(m.positions.size == 64 for m in g.members_of("producer"))  # 4 heads x 16 rows
        assert [c.rsplit("/", 3)[-3] for c in g.consumers] == ["output"]  # the output projection
    # 7 of a block's 9 widths (Q, K, V and the MLP's 4); the residual stream stays blocked
    assert analysis.prunable_share == pytest.approx(7 / 9)
    removal = {heads[0].id: [1, 3], heads[1].id: [0]}
    pruned = check_heads_oracle(model, analysis, removal)
    inits = {t.name: t for t in pruned.graph.initializer}
    q0 = next(n for n in pruned.graph.node if n.name.endswith("layer.0/attention/self/query/MatMul"))
    assert list(inits[q0.input[1]].dims) == [64, 32]
    o1 = next(n for n in pruned.graph.node if n.name.endswith("layer.1/attention/output/dense/MatMul"))
    assert list(inits[o1.input[1]].dims) == [48, 64]
    shapes = {}
    for n in onnx.shape_inference.infer_shapes(pruned).graph.value_info:
        shapes[n.name] = [d.dim_value for d in n.type.tensor_type.shape.dim]
    scores = [s for name, s in shapes.items() if name.endswith("attention/self/MatMul_output_0")]
    assert sorted(s[1] for s in scores) == [2, 3]  # H -> H_kept in the QK^T scores


@pytest.mark.slow  # the BERT export (transformers + torch.onnx): ~10-20 s
def test_mlp_and_heads_prune_together(bert):
    model, analysis = bert.model, bert.analysis
    removal = {g.id: [0, 2] for g in head_groups(analysis, 4)}
    removal.update({g.id: list(range(0, 256, 3)) for g in analysis.prunable_groups if g.size == 256})
    check_heads_oracle(model, analysis, removal)


@pytest.mark.slow  # the BERT export (transformers + torch.onnx): ~10-20 s
def test_bert_export_converts_to_torch(bert):
    """The bridge (what compress trains) runs the export: its mask Flatten has axis == rank."""
    from plugin.bridge import check_parity, convert

    assert check_parity(bert.model, convert(bert.model)) <= 1e-4


def test_fused_in_proj_of_multihead_attention(tmp_path):
    prepared = prepare_model(torch_encoder_layer(tmp_path / "layer.onnx"))
    heads = head_groups(prepared.analysis, 4)
    assert len(heads) == 1 and len(heads[0].producers) == 1  # one in_proj: Q, K, V rows of 3*32
    assert heads[0].members_of("producer")[0].positions.size == 96
    check_heads_oracle(prepared.model, prepared.analysis, {heads[0].id: [0, 2, 3]})


def test_grouped_query_heads_couple_with_their_kv_head(tmp_path):
    torch.manual_seed(0)
    path = _export(GroupedQueryBlock().eval(), (torch.randn(1, 6, 32),), tmp_path / "gqa.onnx", ["x"], "legacy")
    prepared = prepare_model(path)
    analysis = prepared.analysis
    (group,) = head_groups(analysis, 2)  # one channel per K/V head
    rows = {m.node.rsplit("/", 2)[-2]: m.positions.size for m in group.members_of("producer")}
    assert rows == {"q": 32, "k": 16, "v": 16}  # a K/V head takes its 2 query heads along
    pruned = check_heads_oracle(prepared.model, analysis, {group.id: [1]})
    inits = {t.name: t for t in pruned.graph.initializer}
    q = next(n for n in pruned.graph.node if n.name == "/q/MatMul")
    assert list(inits[q.input[1]].dims) == [32, 16]


def _heads_text(middle: str, extra_output: str = "") -> str:
    """x [1,4,16] -> Q, K, V projections -> 2 heads of 8 -> <middle: qh, kt, vh -> y> -> out proj."""
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,16] x) => (float[1,4,16] out{extra_output}) {{
      shape4 = Constant <value=int64[4] {{1,4,2,8}}> ()
      shape3 = Constant <value=int64[3] {{1,4,16}}> ()
      q = MatMul(x, wq)
      k = MatMul(x, wk)
      v = MatMul(x, wv)
      q4 = Reshape(q, shape4)
      k4 = Reshape(k, shape4)
      v4 = Reshape(v, shape4)
      qh = Transpose <perm=[0,2,1,3]> (q4)
      kt = Transpose <perm=[0,2,3,1]> (k4)
      vh = Transpose <perm=[0,2,1,3]> (v4)
      {middle}
      yt = Transpose <perm=[0,2,1,3]> (y)
      y3 = Reshape(yt, shape3)
      out = MatMul(y3, wo)
    }}
    """


WEIGHTS = dict(wq=[16, 16], wk=[16, 16], wv=[16, 16], wo=[16, 16])


def test_hand_built_heads_oracle():
    model, analysis = prepare(build(_heads_text(
        "s = MatMul(qh, kt)\n p = Softmax <axis=-1> (s)\n y = MatMul(p, vh)"), **WEIGHTS))
    (group,) = analysis.prunable_groups
    assert group.size == 2
    check_heads_oracle(model, analysis, {group.id: [0]})


ATTEND = "s = MatMul(qh, kt)\n p = Softmax <axis=-1> (s)\n y = MatMul(p, vh)\n"


@pytest.mark.parametrize("middle, extra, reason", [
    # softmax over the heads axis mixes them
    ("s = MatMul(qh, kt)\n p = Softmax <axis=1> (s)\n y = MatMul(p, vh)", "", "normalises across the channel axis"),
    # a MatMul with the heads on its matrix axes (S x H times H x S) mixes them
    (ATTEND + "st = Transpose <perm=[0,2,1,3]> (s)\n stt = Transpose <perm=[0,1,3,2]> (st)\n m = MatMul(st, stt)",
     ", float[1,4,2,2] m", "matrix axis"),
    # heads multiplied with a tensor of unknown layout (a graph input) cannot be followed
    (ATTEND + "m = MatMul(s, side)", ", float[1,2,4,4] m", "no known layout"),
])
def test_head_mixing_ops_block(middle, extra, reason):
    text = _heads_text(middle, extra)
    if "side" in middle:
        text = text.replace("(float[1,4,16] x)", "(float[1,4,16] x, int64[1,2,4,4] side_ids)")
        text = text.replace("m = MatMul(s, side)", "side = Cast <to=1> (side_ids)\n m = MatMul(s, side)")
    model = build(text, **WEIGHTS)
    try:
        _, analysis = prepare(model)
    except Exception as exc:  # noqa: BLE001 - an invalid hand-built variant is a test bug
        pytest.fail(f"model does not prepare: {exc}")
    heads = [g for g in analysis.groups if g.size == 2]
    assert heads and not any(g.prunable for g in heads)
    assert any(reason in why for g in heads for why in g.reasons)


def test_channel_shuffle_split_is_still_blocked():
    """Splitting channels into blocks is followed, but merging them back in another order is not."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,6,6,6] y) {
      s5 = Constant <value=int64[5] {1,2,4,6,6}> ()
      s4 = Constant <value=int64[4] {1,8,6,6}> ()
      t = Conv <pads=[1,1,1,1]> (x, w1)
      t5 = Reshape(t, s5)
      tt = Transpose <perm=[0,2,1,3,4]> (t5)
      u = Reshape(tt, s4)
      y = Conv <pads=[1,1,1,1]> (u, w2)
    }
    """
    _, analysis = prepare(build(text, w1=[8, 3, 3, 3], w2=[6, 8, 3, 3]))
    conv1 = next(g for g in analysis.groups if any(m.node == "t" or m.tensor == "t" for m in g.members_of("producer")))
    assert not conv1.prunable
    assert any("splits or reorders" in why for why in conv1.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("attn, exporter, opset", [("sdpa", "legacy", 17), ("eager", "dynamo", 18),
                                                   ("sdpa", "dynamo", 23)])  # 23: an ONNX Attention op
def test_bert_variants(tmp_path, attn, exporter, opset):
    prepared = prepare_model(bert_encoder(tmp_path / "bert.onnx", attn, exporter, opset=opset))
    if opset >= 23:
        assert any(n.op_type == "Attention" for n in prepared.model.graph.node)
    heads = head_groups(prepared.analysis, 4)
    assert len(heads) == 2
    assert prepared.analysis.prunable_share == pytest.approx(7 / 9)
    check_heads_oracle(prepared.model, prepared.analysis, {heads[0].id: [0, 1, 2], heads[1].id: [3]})


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo"])  # legacy: test_corpus_analysis prunes its heads
def test_vit_b_16_heads(exporter):
    from .corpus import get_model

    prepared = prepare_model(get_model(f"vit_b_16-{exporter}").path)
    analysis = prepared.analysis
    heads = head_groups(analysis, 12)
    assert len(heads) == 12  # every encoder layer
    # 7/9 of each block's widths; the patch conv and the classifier (residual stream, output) not
    blocks = [layer for layer in analysis.layers if layer.out_channels != 1000 and not layer.is_conv]
    share = sum(la.prunable_out_channels for la in blocks) / sum(la.out_channels for la in blocks)
    assert share == pytest.approx(7 / 9)
    assert analysis.prunable_share > 0.75
    rng = np.random.default_rng(0)
    removal = {g.id: sorted(rng.choice(12, 5, replace=False).tolist()) for g in heads[::3]}
    check_heads_oracle(prepared.model, analysis, removal)


def _attention_op_text(four_d: bool, extra: str = "", mask: str = "") -> str:
    """x [1,5,32] -> Q (4 heads of 8), K and V (2 heads of 8) -> ONNX Attention (opset 23) -> out proj."""
    if four_d:
        body = """
      sq = Constant <value=int64[4] {1,5,4,8}> ()
      skv = Constant <value=int64[4] {1,5,2,8}> ()
      sy = Constant <value=int64[3] {1,5,32}> ()
      q4 = Reshape(q, sq)
      k4 = Reshape(k, skv)
      v4 = Reshape(v, skv)
      qh = Transpose <perm=[0,2,1,3]> (q4)
      kh = Transpose <perm=[0,2,1,3]> (k4)
      vh = Transpose <perm=[0,2,1,3]> (v4)
      yh = Attention <is_causal=1> (qh, kh, vh)
      yt = Transpose <perm=[0,2,1,3]> (yh)
      y = Reshape(yt, sy)"""
    else:
        body = f"\n      y{extra} = Attention <q_num_heads=4, kv_num_heads=2, is_causal=1> (q, k, v{mask})"
    return f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[1,5,32] x) => (float[1,5,32] out) {{
      q = MatMul(x, wq)
      k = MatMul(x, wk)
      v = MatMul(x, wv)
      {body}
      out = MatMul(y, wo)
    }}
    """


ATTN_WEIGHTS = dict(wq=[32, 32], wk=[32, 16], wv=[32, 16], wo=[32, 32])


@pytest.mark.parametrize("four_d", [False, True], ids=["3d", "4d"])
def test_onnx_attention_op_heads(four_d):
    model, analysis = prepare(build(_attention_op_text(four_d), **ATTN_WEIGHTS))
    (group,) = analysis.prunable_groups  # one channel per K/V head, with its two query heads
    assert group.size == 2
    rows = {m.node: m.positions.size for m in group.members_of("producer")}
    assert sorted(rows.values()) == [16, 16, 32]
    pruned = check_heads_oracle(model, analysis, {group.id: [0]})
    attention = next(n for n in pruned.graph.node if n.op_type == "Attention")
    attrs = {a.name: a.i for a in attention.attribute}
    if not four_d:
        assert attrs["q_num_heads"] == 2 and attrs["kv_num_heads"] == 1


def test_onnx_attention_op_mask_broadcast_over_heads():
    """A [1, 1, S, S] mask (here a float graph input, itself blocked) leaves the heads prunable."""
    text = _attention_op_text(False, "", ", mask").replace(
        "(float[1,5,32] x)", "(float[1,5,32] x, float[1,1,5,5] mask)")
    model, analysis = prepare(build(text, **ATTN_WEIGHTS))
    (group,) = analysis.prunable_groups
    check_heads_oracle(model, analysis, {group.id: [1]})


@pytest.mark.parametrize("extra, mask, reason", [
    (", present_k, present_v", "", "KV cache"),
    ("", ", head_mask", "mask is per head"),
])
def test_onnx_attention_op_blocks(extra, mask, reason):
    text = _attention_op_text(False, extra, mask)
    if mask:
        text = text.replace("(float[1,5,32] x)", "(float[1,5,32] x, float[1,4,5,5] head_mask)")
    _, analysis = prepare(build(text, **ATTN_WEIGHTS))
    heads = [g for g in analysis.groups if any(m.node == "q" or m.tensor == "q" for m in g.members_of("producer"))]
    assert heads and not heads[0].prunable
    assert any(reason in why for why in heads[0].reasons)


class SdpaBlock(torch.nn.Module):
    """F.scaled_dot_product_attention: the dynamo exporter at opset 23 writes an ONNX Attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


@pytest.mark.slow  # a dynamo export: ~10 s
def test_torch_sdpa_at_opset_23_exports_an_attention_op(tmp_path):
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SdpaBlock().eval(), (torch.randn(1, 6, 32),), str(tmp_path / "m.onnx"),
                          input_names=["x"], dynamo=True, opset_version=23)
    prepared = prepare_model(tmp_path / "m.onnx")
    assert any(n.op_type == "Attention" for n in prepared.model.graph.node)
    (group,) = head_groups(prepared.analysis, 4)
    assert len(group.producers) == 3
    check_heads_oracle(prepared.model, prepared.analysis, {group.id: [0, 2]})


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_bridge_flatten_at_any_axis(axis):
    """Flatten at axis == rank ([1, 8] -> [8, 1], BERT's mask) broke onnx2torch's converter."""
    from plugin.bridge import check_parity, convert

    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,8] x) => (float y) {{
      f = Flatten <axis={axis}> (x)
      y = Relu(f)
    }}
    """
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    assert check_parity(model, convert(model)) <= 1e-6
