"""Attention heads of torchvision's Swin transformer as exact channel groups (issue 12).

Swin's attention (torchvision.models.swin_transformer.shifted_window_attention) splits its fused
qkv projection in one Reshape, ``[B*nW, N, 3C] -> [B*nW, N, 3, H, Dh]``, then permutes and picks
q, k, v apart along the 3-axis (graph_passes.op_rules.attention.FusedHeadsReshapeRule ties the
three segments and each head's Dh block); adds a per-head relative position bias constant
[H, N, N] (sliced with the heads) and, in shifted blocks, a window mask; the windows are rolled
(Slice + Concat) and merged by PatchMerging. The oracle: removing heads from the ONNX graph
computes what zeroing those columns of the output projection computes, in onnxruntime.

The model is torchvision's own SwinTransformer class (the code swin_t runs) at a small
configuration so the tests stay fast: embed_dim 24, depths [2, 2], heads [2, 4], window 4, on
32x32 inputs (8x8 then 4x4 tokens: shifted windows with their mask in stage 1, one window in
stage 2). swin_t itself (embed_dim 96, depths [2, 2, 6, 2], window 7; legacy export at 64x64, measured
once, not a test: minutes to analyse here): the heads of 5 of its 12 blocks are prunable (stages
1 and 2, the first block of stage 3); at that resolution the later blocks keep run-time
Shape / Reshape nodes (windows larger than the 4x4 and 2x2 token maps) and an Add with channels
on different axes, which block (23.2% exact coverage).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from graph_passes.prepare import prepare_model

from .test_attention_groups import _export, check_heads_oracle

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

DEPTHS, HEADS = (2, 2), (2, 4)


def small_swin(path: Path, exporter: str) -> Path:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=list(DEPTHS), num_heads=list(HEADS),
                            window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10).eval()
    return _export(model, (torch.randn(1, 3, 32, 32),), path, ["input"], exporter)


def _head_groups(analysis):
    """Prunable groups of one channel per head, in block order: sizes 2, 2, 4, 4."""
    return [g for g in analysis.prunable_groups if g.exact and g.size in HEADS
            and all(m.positions.size > g.size for m in g.members_of("producer"))]


@pytest.fixture(scope="module", params=["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])  # dynamo: ~15 s
def swin(request, tmp_path_factory):
    path = small_swin(tmp_path_factory.mktemp("swin") / f"swin-{request.param}.onnx", request.param)
    return prepare_model(str(path))


def test_swin_heads_are_exact_groups(swin):
    analysis = swin.analysis
    heads = _head_groups(analysis)
    assert [g.size for g in heads] == [h for h, d in zip(HEADS, DEPTHS) for _ in range(d)]
    for g in heads:
        (qkv,) = g.members_of("producer")  # the fused qkv projection: 3 segments x H heads x Dh rows
        assert qkv.positions.size == 3 * g.size * 12
        assert len(g.consumers) == 1  # the output projection's input columns
        assert any(m.kind == "constant" for m in g.members)  # the relative position bias [H, N, N]
    # Q, K, V and the MLP's first layer of every block (7/9 of a block's widths, as in ViT)
    assert analysis.coverage(False) == pytest.approx(0.7315, abs=1e-3)


def test_swin_heads_oracle(swin):
    analysis = swin.analysis
    heads = _head_groups(analysis)
    # stage 1: a shifted block (mask) and a plain one; stage 2: both blocks
    removal = {heads[0].id: [1], heads[1].id: [0], heads[2].id: [0, 3], heads[3].id: [2]}
    pruned = check_heads_oracle(swin.model, analysis, removal)
    scores = [n for n in pruned.graph.node if n.op_type == "Softmax"]
    assert len(scores) == 4


def test_swin_mlp_and_heads_prune_together(swin):
    analysis = swin.analysis
    removal = {g.id: [0] for g in _head_groups(analysis)}
    removal.update({g.id: list(range(0, g.size, 4)) for g in analysis.prunable_groups
                    if g.exact and g.size in (96, 192)})
    check_heads_oracle(swin.model, analysis, removal)


class _FusedQKV(torch.nn.Module):
    """timm / Swin style: qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4); q, k, v = qkv[0..2]."""

    def __init__(self, d: int = 32, heads: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.bias = torch.nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads) + self.bias
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("exporter", ["legacy"])  # dynamo: covered by the Swin fixture
def test_fused_qkv_split_in_one_reshape(tmp_path, exporter):
    torch.manual_seed(0)
    path = _export(_FusedQKV().eval(), (torch.randn(1, 6, 32),), tmp_path / "qkv.onnx", ["x"], exporter)
    prepared = prepare_model(str(path))
    (heads,) = [g for g in prepared.analysis.prunable_groups if g.size == 4]
    pruned = check_heads_oracle(prepared.model, prepared.analysis, {heads.id: [1, 2]})
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape"
                   and any(np.asarray(t.dims).tolist() == [5] for t in pruned.graph.initializer if t.name == n.input[1]))
    from onnx import numpy_helper

    target = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == reshape.input[1]))
    assert target.tolist()[2:] == [3, 2, 8]  # S and Dh kept, H 4 -> 2
