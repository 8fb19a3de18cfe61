"""Corpus-wide: every model loads, normalises (verified against onnxruntime), analyses, and the
pruning oracle holds for every prunable group (random channel subsets in all groups at once,
then all-but-one channel in all groups at once)."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes.channel_groups import analyse
from graph_passes.prune import check_pruning, repair_removal
from plugin.inspect_cmd import prepare_model

from . import corpus

# CNNs whose conv output channels are not >= 90% prunable, and why (checked, not guessed):
LOW_SHARE = {
    "light_bvlc_alexnet": "LRN after conv1/conv2 mixes neighbouring channels",
    "light_zfnet512": "LRN after conv1/conv2 mixes neighbouring channels",
    "light_shufflenet": "channel shuffle after grouped 1x1 convs: every group is blocked",
    "light_squeezenet": "the classifier is a 1000-channel conv feeding the graph output",
    "squeezenet1_1-legacy": "the classifier is a 1000-channel conv feeding the graph output",
    "squeezenet1_1-dynamo": "the classifier is a 1000-channel conv feeding the graph output",
    "shufflenet_v2_x1_0-legacy": "channel shuffle splits the channel axis; the split halves stay prunable",
    "shufflenet_v2_x1_0-dynamo": "channel shuffle splits the channel axis; the split halves stay prunable",
    "vgg11_bn-dynamo": "the dynamo exporter lowers AdaptiveAvgPool2d(1x1 -> 7x7) to a GatherND, which blocks",
    "convnext_tiny-legacy": "LayerNorm over channels follows every depthwise conv; its MLPs are prunable",
    "convnext_tiny-dynamo": "LayerNorm over channels follows every depthwise conv; its MLPs are prunable",
}
# Large light models at 224x224 (hundreds of MB of weights) and all torchvision exports are slow.
FAST = {"light_densenet121", "light_inception_v1", "light_inception_v2", "light_resnet50",
        "light_shufflenet", "light_squeezenet"}


def _params():
    for name in corpus.CORPUS_NAMES:
        marks = [] if name in FAST else [pytest.mark.slow]
        yield pytest.param(name, marks=marks, id=name)


def _random_removal(analysis, rng) -> dict[str, list[int]]:
    removal = {}
    for group in analysis.prunable_groups:
        if group.size > 1:
            k = int(rng.integers(1, group.size))
            removal[group.id] = sorted(rng.choice(group.size, k, replace=False).tolist())
    return repair_removal(analysis, removal)


@pytest.mark.parametrize("name", list(_params()))
def test_corpus_model_analyses_and_prunes_exactly(name):
    entry = corpus.get_model(name)
    prepared = prepare_model(str(entry.path))
    assert prepared.normalised.max_rel_error is not None
    assert prepared.normalised.max_rel_error <= 1e-4
    analysis = prepared.analysis
    assert analysis.layers and analysis.groups
    share = analysis.conv_prunable_share()
    if entry.is_cnn and name not in LOW_SHARE:
        assert share >= 0.9, f"{name}: only {share:.1%} of conv output channels prunable"
    if name in LOW_SHARE:
        assert share < 0.9, f"{name} is listed as low-share but reaches {share:.1%}: update LOW_SHARE"
    assert analysis.prunable_groups or name in LOW_SHARE, f"{name}: nothing prunable"
    model = prepared.model
    if entry.family == "light":  # constant 0.02 weights: every channel alike, the oracle would be blind
        corpus.randomise_weights(model, analysis.layers, seed=0)
        corpus.expose_logits(model)
        analysis = analyse(model)
    rng = np.random.default_rng(0)
    all_but_one = repair_removal(
        analysis, {g.id: list(range(1, g.size)) for g in analysis.prunable_groups if g.size > 1}
    )
    # models with hundreds of MB of weights: one draw (random subsets in every group at once)
    big = entry.path.stat().st_size > 200e6
    for removal in [_random_removal(analysis, rng)] + ([] if big else [all_but_one]):
        err = check_pruning(model, analysis, removal)
        assert err <= 1e-4, f"{name}: pruned model differs from the zeroed one by {err:.2e}"
