"""QAT reads the FP32 teacher's outputs from a per-sample cache (issue 15, speed): the teacher
runs once per training sample and once per validation sample instead of every step, and the
fine-tuning losses and validation figures are those of a run without the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.engine.batches import TEACHER_CACHE_ENV
from plugin.engine.training import FinetuneConfig, finetune
from tests.test_qat_start import _calibrated, _unlabelled, digits, split  # noqa: F401 (fixtures)


def _run(digits, split, monkeypatch, cache_mb: str) -> tuple[list[float], list[dict], int]:
    monkeypatch.setenv(TEACHER_CACHE_ENV, cache_mb)
    train, held = _unlabelled(split[0]), _unlabelled(split[1])
    torch.manual_seed(0)
    model, plan = _calibrated(digits, train, 8)
    calls = {"n": 0}
    original = model.teacher_outputs

    def counted(*inputs):
        calls["n"] += int(inputs[0].shape[0])
        return original(*inputs)

    monkeypatch.setattr(model, "teacher_outputs", counted)
    result = finetune(model, plan, train, FinetuneConfig(epochs=3, batch_size=64, progress=False,
                                                         task_loss="distill_kl"), validation=held)
    return result.epoch_losses, result.validation, calls["n"]


def test_qat_teacher_cache_same_numbers_fewer_teacher_runs(digits, split, monkeypatch) -> None:
    cached_losses, cached_val, cached_calls = _run(digits, split, monkeypatch, "64")
    plain_losses, plain_val, plain_calls = _run(digits, split, monkeypatch, "0")
    n_train, n_held = len(split[0]), len(split[1])
    # without the cache: every epoch runs the teacher on every sample (3 training epochs, 4 scorings)
    assert plain_calls == 3 * n_train + 4 * n_held
    # with it: once per sample
    assert cached_calls == n_train + n_held
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=1e-5)
    for a, b in zip(cached_val, plain_val):
        assert a["distill_loss"] == pytest.approx(b["distill_loss"], rel=1e-5)
