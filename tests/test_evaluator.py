"""The shared candidate evaluator (plugin/evaluator.py): scores plans on one fake-quantized model,
leaves it as it found it, recalibrates, corrects biases after removed channels (measured to
help), costs a small multiple of one held-out forward pass; the integer-domain L1 criterion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graph_passes.digest import model_digest
from graph_passes.errors import ConfigError
from graph_passes.prepare import prepare_model
from plugin.data import Dataset, input_specs, load_dataset
from plugin.evaluator import CandidateEvaluator, EvaluatorConfig, channel_scores, quantize_dequantize
from plugin.importance import channel_importance, keep_indices
from plugin.space import Precisions, SearchSpace
from plugin.strategies.problem import Problem, RunSettings

DIGITS = "samples/digits/model.onnx"
TRAIN = "samples/digits/train.npz"


@pytest.fixture(scope="module")
def problem() -> Problem:
    prepared = prepare_model(DIGITS)
    precisions = Precisions.parse("0,2,4,8", "8")
    space = SearchSpace(prepared.analysis, precisions, model_sha256=model_digest(prepared.original))
    train, held = load_dataset(TRAIN, input_specs(prepared.model)).split(0.2, seed=0)
    settings = RunSettings(precisions, target="size=50%", progress=False, task_loss="cross_entropy")
    return Problem(prepared, space, train, held, settings)


@pytest.fixture(scope="module")
def engine(problem):
    return problem.fake_quant()


def _plan(space: SearchSpace, ratios: dict[str, float], bits: int = 8, criterion: str = "l1"):
    scores = channel_scores(space, criterion, bits)
    return space.plan(kept={g: keep_indices(scores[g], r) for g, r in ratios.items()},
                      layer_bits={n: bits for n in space.layers}, site_bits=8)


def test_unpruned_8bit_plan_scores_like_the_original_and_nothing_leaks(problem, engine) -> None:
    evaluator = CandidateEvaluator(problem, EvaluatorConfig(), engine=engine)
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    full = evaluator.evaluate(_plan(problem.space, {}))
    assert full.accuracy == pytest.approx(1.0) and full.agreement == pytest.approx(1.0)
    assert full.score == full.accuracy and full.samples == len(problem.held_out)
    pruned = evaluator.evaluate(_plan(problem.space, {g: 0.5 for g in problem.space.prunable_groups}))
    assert pruned.score < full.score
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, biases and clips restored
    again = evaluator.evaluate(_plan(problem.space, {}))
    assert again.score == full.score and again.distill_loss == pytest.approx(full.distill_loss)


def test_bias_correction_recovers_removed_channels(problem, engine) -> None:
    """Measured: removing 4 of the first conv's 16 channels keeps 73% in FP32 (onnxruntime on the
    pruned graph); with the bias correction the candidate scores >= 95%."""
    plan = _plan(problem.space, {"g0": 0.75})
    with_bc = CandidateEvaluator(problem, EvaluatorConfig(bias_correction=True), engine=engine).evaluate(plan)
    without = CandidateEvaluator(problem, EvaluatorConfig(bias_correction=False), engine=engine).evaluate(plan)
    assert with_bc.score >= 0.95
    assert with_bc.score > without.score + 0.1


def test_cost_is_a_small_multiple_of_one_forward_pass(problem, engine) -> None:
    evaluator = CandidateEvaluator(problem, EvaluatorConfig(), engine=engine)
    for ratio in (1.0, 0.8, 0.6):
        evaluator.evaluate(_plan(problem.space, {g: ratio for g in problem.space.prunable_groups}))
    stats = evaluator.stats()
    assert stats["candidates"] == 3 and stats["forward_pass_seconds"] > 0
    # calibration pass + bias pass + scoring pass + bookkeeping: measured ~5x on digits
    assert 1.0 <= stats["mean_forward_passes"] < 30


def test_apply_leaves_the_plan_in_force_with_recalibrated_clips(problem) -> None:
    engine = problem.fake_quant()
    evaluator = CandidateEvaluator(problem, EvaluatorConfig(), engine=engine)
    plan = _plan(problem.space, {g: 0.75 for g in problem.space.prunable_groups})
    applied = evaluator.apply(plan)
    assert engine.calibrated
    layers, _sites = engine.frozen_bits()
    assert {n: tuple(b) for n, b in layers.items()} == {n: tuple(p.bits) for n, p in applied.layers.items()}
    assert {g.kept for g in applied.groups.values()} == {g.kept for g in plan.groups.values()}
    assert any(a.clip != 6.0 for a in applied.activations.values())  # the candidate's own clips


def test_without_labels_the_score_is_agreement(problem, engine) -> None:
    held = Dataset(dict(problem.held_out.arrays), None, "unlabelled")
    unlabelled = Problem(problem.prepared, problem.space, problem.train, held, problem.settings)
    evaluation = CandidateEvaluator(unlabelled, EvaluatorConfig(), engine=engine).evaluate(
        _plan(problem.space, {g: 0.7 for g in problem.space.prunable_groups}))
    assert evaluation.accuracy is None and evaluation.score == evaluation.agreement
    assert evaluation.distill_loss > 0


def test_quantized_l1_criterion(problem) -> None:
    space = problem.space
    float_l1 = channel_importance(space)
    at8 = channel_scores(space, "ql1", 8)
    at2 = channel_scores(space, "ql1", 2)
    for g in space.prunable_groups:
        assert np.corrcoef(float_l1[g], at8[g])[0, 1] > 0.999  # 8 bits: float L1 up to rounding
    # 2 bits: a filter scores max|W| * #(|w| > max|W| / 2) (per layer normalised, summed over producers)
    w = np.array([[0.1, -0.9, 0.5, 0.2], [0.4, 0.4, -0.4, 0.0]])
    dq = quantize_dequantize(w, 2, 0)
    assert np.allclose(np.abs(dq).sum(axis=1), [0.9 * 2, 0.4 * 3])
    assert any(not np.allclose(np.argsort(float_l1[g]), np.argsort(at2[g])) for g in space.prunable_groups)
    with pytest.raises(ConfigError, match="unknown channel criterion"):
        channel_scores(space, "taylor")
