"""QAT starts from the calibrated post-training point and never ends below it on held-out data
(issue 15): ``finetune`` with validation data scores the frozen, calibrated model before its first
step and ends on the best state; the uniform strategy does the same for its training epochs; the
learning rate follows the plan's widths. Short runs on samples/digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.data import Dataset
from plugin.engine.config import SearchConfig
from plugin.engine.fakequant import FakeQuantModel
from plugin.engine.training import (QAT_LR_DEFAULT, FinetuneConfig, finetune, plan_qat_lr, qat_lr,
                                    validation_score)
from plugin.inspect_cmd import PreparedModel, prepare_model
from plugin.space import Precisions, SearchSpace

DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"


@pytest.fixture(scope="module")
def digits() -> PreparedModel:
    return prepare_model(str(DIGITS / "model.onnx"), ["input=1x1x8x8"])


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    data = np.load(DIGITS / "train.npz")
    x, y = data["input"], data["labels"].astype(np.int64)
    return Dataset({"input": x[:256]}, y[:256]), Dataset({"input": x[256:512]}, y[256:512])


def _calibrated(digits: PreparedModel, train: Dataset, bits: int) -> tuple[FakeQuantModel, object]:
    config = SearchConfig(progress=False, batch_size=64, weight_precisions=(bits,), act_bits=(8,))
    space = SearchSpace(digits.analysis, Precisions((bits,), (8,)))
    model = FakeQuantModel.build(digits.model, config, space=space)
    model.calibrate(train, 64)
    return model, space.uniform_plan(bits, 8)


def _unlabelled(data: Dataset) -> Dataset:
    return Dataset(dict(data.arrays), None)


@pytest.mark.parametrize("labelled", [True, False])
def test_qat_never_ends_below_its_calibrated_start(digits: PreparedModel, split, labelled: bool) -> None:
    """A learning rate that wrecks the weights (Adam at 0.05): without keep-best the model ends
    far below its calibrated start on the held-out split; with it, QAT ends on the start (or a
    better epoch), by accuracy with labels and by the distillation loss without."""
    train, held = split if labelled else (_unlabelled(split[0]), _unlabelled(split[1]))
    torch.manual_seed(0)
    model, plan = _calibrated(digits, train, 8)
    wild = FinetuneConfig(epochs=2, lr=0.05, batch_size=64, progress=False, keep_best=False,
                          task_loss="cross_entropy" if labelled else "distill_kl")
    model.freeze(plan)
    frozen_start = validation_score(model, held)  # the frozen, calibrated plan before any step
    ruined = finetune(model, plan, train, wild, validation=held)
    assert ruined.best_epoch is None and not ruined.validation
    end = validation_score(model, held)
    if labelled:
        assert frozen_start["accuracy"] > 0.9 and end["accuracy"] < frozen_start["accuracy"] - 0.05
    else:
        assert end["distill_loss"] > 2 * frozen_start["distill_loss"]

    model, plan = _calibrated(digits, train, 8)
    kept = finetune(model, plan, train, FinetuneConfig(**{**wild.__dict__, "keep_best": True}), validation=held)
    final = validation_score(model, held)
    assert kept.best_epoch is not None
    assert kept.validation[0]["distill_loss"] == pytest.approx(frozen_start["distill_loss"], rel=1e-4)
    best = kept.validation[kept.best_epoch]
    if labelled:
        assert final["accuracy"] >= kept.validation[0]["accuracy"]
        assert final["accuracy"] == pytest.approx(best["accuracy"])
    else:
        assert final["distill_loss"] <= kept.validation[0]["distill_loss"] * (1 + 1e-5)
        assert final["distill_loss"] == pytest.approx(best["distill_loss"], rel=1e-5)
    assert kept.plan.metadata["finetune"]["best_epoch"] == kept.best_epoch


def test_learning_rate_follows_the_plan(digits: PreparedModel, split) -> None:
    train, _ = split
    _, plan8 = _calibrated(digits, train, 8)
    _, plan4 = _calibrated(digits, train, 4)
    assert plan_qat_lr(plan8) == qat_lr(8) < QAT_LR_DEFAULT
    assert plan_qat_lr(plan8) < plan_qat_lr(plan4) == qat_lr(4) < QAT_LR_DEFAULT == qat_lr(2)
    space = SearchSpace(digits.analysis, Precisions((0, 8), (8,)))
    group = space.prunable_groups[0]
    pruned = space.plan(kept={group: [0]}, layer_bits={n: 8 for n in space.layers}, site_bits=8)
    assert plan_qat_lr(pruned) == QAT_LR_DEFAULT  # pruned channels: the rest recovers at the default rate
    model, _ = _calibrated(digits, train, 8)
    result = finetune(model, plan8, train, FinetuneConfig(epochs=1, max_steps_per_epoch=1, progress=False))
    assert result.plan.metadata["finetune"]["lr"] == qat_lr(8)


def test_uniform_strategy_keeps_its_calibrated_start(tmp_path) -> None:
    """Through compress: the uniform strategy's history scores the calibrated post-training model
    (epoch 0) and its epochs on the held-out split and ends on the best of them."""
    from plugin.api import CompressConfig, compress

    data = np.load(DIGITS / "train.npz")
    config = CompressConfig(strategy="uniform", weight_precisions=(8,), act_bits=(8,), epochs=2, finetune_epochs=0,
                            strategy_options={"lr": 0.05}, progress=False, max_steps_per_epoch=4)
    result = compress(str(DIGITS / "model.onnx"), {"input": data["input"][:400]}, labels=data["labels"][:400],
                      config=config)
    (stage,) = [h for h in result.report["history"] if isinstance(h, dict) and h.get("stage") == "uniform-qat"]
    scores = [v["accuracy"] for v in stage["validation"]]
    assert len(scores) == 3 and stage["lr"] == 0.05 and stage["keep_best"]
    assert scores[stage["best_epoch"]] == max(scores)
    # the report scores the exported model with onnxruntime: within rounding of the fake-quant figure
    assert result.report["quality"]["accuracy_after"] >= scores[0] - 0.01


def test_cosine_schedule_decays_the_learning_rate_to_zero(digits: PreparedModel, split, monkeypatch) -> None:
    """``schedule="cosine"``: every step's rate is ``lr * (1 + cos(pi * t / T))) / 2`` over the run's
    T = epochs x batches steps (the first step at ``lr``, the last near 0); constant keeps ``lr``."""
    train, _ = split  # 256 samples, batch 64: 4 steps per epoch
    seen: dict[str, list[float]] = {"constant": [], "cosine": []}
    fused: list[bool] = []
    original = torch.optim.Adam.step

    for schedule in ("constant", "cosine"):
        def step(self, *args, _seen=seen[schedule], **kwargs):  # the rate each step runs at
            _seen.append(self.param_groups[0]["lr"])
            fused.append(bool(self.defaults.get("fused")))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", step)
        model, plan = _calibrated(digits, train, 8)
        result = finetune(model, plan, train, FinetuneConfig(epochs=2, lr=1e-3, batch_size=64, progress=False,
                                                            schedule=schedule))
        assert result.plan.metadata["finetune"]["schedule"] == schedule
    assert seen["constant"] == [1e-3] * 8
    assert fused == [True] * 16  # QAT's Adam is torch's fused kernel on CPU (plugin.engine.optimisers)
    total = 8
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * t / total)) for t in range(total)]
    assert seen["cosine"] == pytest.approx(expected, rel=1e-9)
    assert seen["cosine"][0] == pytest.approx(1e-3) and seen["cosine"][-1] < 0.04 * 1e-3


def test_unknown_qat_schedule_fails_before_any_work(tmp_path) -> None:
    from plugin.api import CompressConfig, compress
    from plugin.engine.config import SearchConfigError
    from graph_passes.errors import ConfigError

    with pytest.raises(ConfigError, match="--qat-schedule"):
        compress(str(DIGITS / "model.onnx"), {"input": np.zeros((4, 1, 8, 8), np.float32)},
                 output=str(tmp_path / "out.onnx"), config=CompressConfig(qat_schedule="linear"))
    assert not list(tmp_path.iterdir())
    with pytest.raises(SearchConfigError, match="schedule"):
        FinetuneConfig(schedule="step")
