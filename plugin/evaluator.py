"""The candidate evaluator: score many plans on one fake-quantized model, cheaply.

Strategies that *evaluate* candidate plans instead of training a supernet (``bayesian``, and an
RL agent later) share this module. One :class:`CandidateEvaluator` holds one
:class:`~plugin.engine.fakequant.FakeQuantModel` (``problem.fake_quant()``, built once) and, per
candidate plan (:meth:`CandidateEvaluator.evaluate`):

1. restores the original weights and biases (nothing leaks from one candidate to the next),
2. freezes the plan (per-channel weight bits, 0 = pruned; activation bits),
3. recalibrates every activation clip on the *compressed* model's own activations (the 99.9th
   percentile of |x| at every site, one forward pass over ``calib_samples`` training samples; the
   engine's ``calibrate`` observes the FP32 teacher, whose activations do not change with the
   plan). Weight scales need nothing: the quantizer recomputes ``max|W_c| / (2^(b-1) - 1)`` from
   the weights on every forward pass,
4. bias correction (``bias_correction``, on by default): for every weight layer with a bias, the
   per-output-channel mean of the layer's output under the FP32 original minus the same mean
   under the candidate (over the calibration samples, batch and spatial positions) is added to
   the bias (the empirical bias correction of Nagel et al., ICCV 2019, applied to the error of
   pruning and quantization together). A removed input channel ``c`` of a consumer shifts every
   output by ``W[:, c] * x_c``; its mean is what the correction puts back. It is exact in the mean
   over positions, also at zero-padded borders (the mean is measured, not derived), and it is
   measured, not assumed, to help (``benchmarks/bayesian.py --criterion``). All layers are
   corrected from one pass (``bias_passes`` passes repeat it, each on the corrected model);
   layers without a bias are left alone (adding a bias would change the graph),
5. optionally ``finetune_steps`` steps of QAT (:func:`plugin.engine.training.finetune`),
6. scores it on the held-out data: top-1 accuracy with labels, top-1 agreement with the FP32
   original and a distillation loss (KL of the softmax for a classifier output, MSE otherwise)
   against the original's outputs, which are computed once and cached.

``score`` is accuracy when the held-out data has labels, agreement for a classifier otherwise, and
``1 - min(1, ||y - y_ref||^2 / ||y_ref||^2)`` for any other output.

Cost: the teacher's held-out outputs and per-layer means are computed once (``setup``); a
candidate then costs one student pass over the calibration samples (clips), ``bias_passes``
more (bias correction), one over the held-out set (score), plus fine-tuning. Each
:class:`Evaluation` states its wall time as a multiple of one student forward pass over the
held-out set, measured at setup (``forward_passes``); :meth:`CandidateEvaluator.stats` the mean.

Channel scores for pruning (:func:`channel_scores`): the float criteria of
:mod:`plugin.importance` (``l1``, ``l2``) and ``ql1``, the integer-domain L1 of the filter
*quantized at the width it will be kept at*, times its scale (= the L1 of the dequantized
filter). At 8 bits it is float L1 up to rounding; at 2 bits a filter's score is
``max|W_c| * #{i: |w_i| > max|W_c| / 2}``: what the low-precision filter actually contributes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graph_passes.errors import ConfigError
from plugin.importance import channel_importance
from plugin.plan import CompressionPlan
from plugin.space import SearchSpace

if TYPE_CHECKING:
    from plugin.data import Dataset
    from plugin.engine.fakequant import FakeQuantModel

logger = logging.getLogger(__name__)

#: channel criteria: the float ones of plugin.importance plus the integer-domain L1 ("ql1")
CRITERIA = ("ql1", "l1", "l2")
#: the quantile of |x| an activation clip is set to (the same as FakeQuantModel.calibrate)
CLIP_QUANTILE = 0.999
_QUANTILE_MAX_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------- channel scores


def quantize_dequantize(weight: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """``q * scale`` per output channel on ``axis`` (symmetric, narrow range, the export's grid)."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0)
    flat = w.reshape(w.shape[0], -1)
    qmax = 2 ** (int(bits) - 1) - 1
    absmax = np.abs(flat).max(axis=1, keepdims=True) if flat.size else np.zeros((len(flat), 1))
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    q = np.clip(np.round(flat / scale), -qmax, qmax)
    return np.moveaxis((q * scale).reshape(w.shape), 0, axis)


def channel_scores(space: SearchSpace, criterion: str = "ql1", bits: int = 8,
                   weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per channel group, the importance of each channel (higher = keep); see the module doc.

    ``ql1`` quantizes every weight at ``bits`` first, then takes plain L1 (normalised per layer
    and summed over the group's producers exactly like :func:`plugin.importance.channel_importance`).
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown channel criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if criterion != "ql1":
        return channel_importance(space, weights, criterion)
    quantized: dict[str, np.ndarray] = {}
    for info in space.layers.values():
        layer = info.layer
        w = weights.get(layer.weight) if weights is not None else None
        if w is None:
            w = space.analysis.graph.constant(layer.weight)
        if w is not None:
            quantized[layer.weight] = quantize_dequantize(w, bits, layer.weight_out_axis)
    return channel_importance(space, quantized, "l1")


# ----------------------------------------------------------------------------- the evaluator


@dataclass
class EvaluatorConfig:
    """``calib_samples`` training samples recalibrate the clips and drive the bias correction;
    ``eval_samples`` caps the held-out samples scored (None: all); ``finetune_steps`` > 0 adds
    that many QAT steps per candidate (then every weight is restored afterwards)."""

    calib_samples: int = 256
    eval_samples: int | None = None
    batch_size: int = 256
    recalibrate: bool = True
    bias_correction: bool = True
    bias_passes: int = 1
    bias_samples: int = 256
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calib_samples < 1 or self.batch_size < 1 or self.bias_passes < 0 or self.bias_samples < 1 or self.finetune_steps < 0:
            raise ConfigError(f"evaluator needs calib_samples >= 1, batch_size >= 1, bias_passes >= 0 and "
                              f"finetune_steps >= 0; got {self}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"eval_samples must be >= 1 or None, got {self.eval_samples}")


@dataclass
class Evaluation:
    """One candidate's scores. ``plan``: the candidate with the recalibrated clips and the
    (corrected) weights' scales; ``forward_passes``: wall time / one held-out forward pass."""

    score: float
    agreement: float | None
    distill_loss: float
    accuracy: float | None
    samples: int
    seconds: float
    forward_passes: float
    plan: CompressionPlan = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("plan")
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _outputs(value: Any) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_classifier(t: Tensor) -> bool:
    return t.ndim == 2 and t.shape[1] > 1 and t.is_floating_point()


def _abs_quantile(x: Tensor) -> float:
    flat = x.detach().abs().flatten().float()
    if flat.numel() > _QUANTILE_MAX_ELEMENTS:
        flat = flat[:: flat.numel() // _QUANTILE_MAX_ELEMENTS + 1]
    return float(torch.quantile(flat, CLIP_QUANTILE)) if flat.numel() else 0.0


class ProblemLike(Protocol):
    """What the evaluator needs of a :class:`plugin.strategies.problem.Problem` (not imported:
    strategies import this module)."""

    train: Dataset
    held_out: Dataset
    settings: Any

    def fake_quant(self) -> FakeQuantModel: ...


class CandidateEvaluator:
    """Scores candidate plans on one fake-quantized model; see the module docstring.

    ``CandidateEvaluator(problem)`` builds the engine with ``problem.fake_quant()`` (or takes
    ``engine``); :meth:`evaluate` scores a plan and leaves the model as it found it;
    :meth:`apply` leaves a plan applied (frozen, recalibrated, bias-corrected) for QAT and returns
    the plan to fine-tune.
    """

    def __init__(self, problem: ProblemLike, config: EvaluatorConfig | None = None,
                 engine: FakeQuantModel | None = None) -> None:
        self.problem = problem
        self.config = config or EvaluatorConfig(seed=problem.settings.seed)
        self.engine = engine if engine is not None else problem.fake_quant()
        self.engine.eval()
        self.device = next((p.device for p in self.engine.parameters()), torch.device("cpu"))
        self.held: Dataset = problem.held_out
        if self.config.eval_samples is not None:
            self.held = self.held.subset(self.config.eval_samples, seed=self.config.seed)
        self.calib: Dataset = problem.train.subset(self.config.calib_samples, seed=self.config.seed)
        self._snapshot = {k: v.detach().clone() for k, v in self.engine.state_dict().items()}
        self._layers = getattr(self.engine, "_layers")  # name -> WrappedLayer (the engine's bookkeeping)
        self.evaluations: list[Evaluation] = []
        self.setup_seconds = 0.0
        self.forward_seconds = float("nan")
        self._setup()

    # ------------------------------------------------------------------ setup: cached teacher figures

    @torch.no_grad()
    def _setup(self) -> None:
        start = time.perf_counter()
        self._held_batches = _ordered_batches(self.held, self.engine.input_names, self.config.batch_size,
                                              self.device)
        self._calib_batches = _ordered_batches(self.calib, self.engine.input_names, self.config.batch_size,
                                               self.device)
        self._teacher_held = [_outputs(self.engine.teacher_outputs(*inputs)) for inputs, _ in self._held_batches]
        self._bias_batch = _ordered_batches(self.calib, self.engine.input_names, self.config.bias_samples,
                                            self.device)[0]
        self._teacher_means = self._layer_means(teacher=True)
        self.setup_seconds = time.perf_counter() - start
        # the unit of cost: one forward pass of the (fake-quantized) model over the held-out set
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for inputs, _labels in self._held_batches:
                self.engine(*inputs)
            times.append(time.perf_counter() - t0)
        self.forward_seconds = max(min(times), 1e-9)
        logger.info("evaluator: %d held-out, %d calibration samples; one held-out forward pass %.3f s",
                    len(self.held), len(self.calib), self.forward_seconds)

    def _layer_outputs(self, teacher: bool) -> list[tuple[str, nn.Module, int]]:
        out = []
        root = self.engine._teacher_module() if teacher else self.engine.net
        for name, entry in self._layers.items():
            if entry.bias_attr is None:
                continue
            owner = root.get_submodule(entry.owner)
            out.append((name, owner, -1 if isinstance(owner, nn.Linear) else 1))
        return out

    @torch.no_grad()
    def _layer_means(self, teacher: bool) -> dict[str, Tensor]:
        """Per layer with a bias: the mean of each output channel over the bias-correction batch."""
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        handles = []

        def observe(name: str, axis: int, output: Any) -> None:
            y = _first(output).detach()
            c = self._layers[name].info.layer.out_channels
            if y.ndim < 2 or y.shape[axis] != c:
                return
            y = y.movedim(axis, 0).reshape(c, -1).double()
            sums[name] = sums.get(name, 0) + y.sum(dim=1)
            counts[name] = counts.get(name, 0) + y.shape[1]

        for name, owner, axis in self._layer_outputs(teacher):
            handles.append(owner.register_forward_hook(
                lambda _m, _args, output, name=name, axis=axis: observe(name, axis, output)))
        try:
            if teacher:
                self.engine.teacher_outputs(*self._bias_batch[0])
            else:
                self.engine(*self._bias_batch[0])
        finally:
            for handle in handles:
                handle.remove()
        return {name: (sums[name] / max(counts[name], 1)) for name in sums}

    # ------------------------------------------------------------------ per candidate

    def restore(self) -> None:
        """Back to the original weights, biases and clips."""
        self.engine.load_state_dict(self._snapshot, strict=True)

    @torch.no_grad()
    def recalibrate(self) -> dict[str, float]:
        """Every site's clip from the frozen candidate's own activations (one pass)."""
        found: dict[str, float] = {}
        handles = []
        for site in self.engine.sites.values():
            handles.append(site.register_forward_pre_hook(
                lambda m, args: found.__setitem__(m.tensor, max(found.get(m.tensor, 0.0), _abs_quantile(args[0])))))
        try:
            for inputs, _labels in self._calib_batches:
                self.engine(*inputs)
        finally:
            for handle in handles:
                handle.remove()
        for site in self.engine.sites.values():
            value = found.get(site.tensor, 0.0)
            if value > 0 and math.isfinite(value):
                site.quantizer.clip.fill_(value)
        return found

    @torch.no_grad()
    def correct_biases(self) -> int:
        """One forward pass over the bias-correction batch in which every layer with a bias, as
        it runs (in graph order), adds (teacher mean - candidate mean) of each kept output channel
        to its bias and to the output it passes on, so that downstream layers are measured on the
        corrected upstream. Returns the number of layers corrected."""
        done: set[str] = set()
        handles = []

        def correct(name: str, axis: int, output: Any) -> Any:
            if name in done or isinstance(output, (tuple, list)):
                return None
            reference = self._teacher_means.get(name)
            entry = self._layers[name]
            c = entry.info.layer.out_channels
            if reference is None or output.ndim < 2 or output.shape[axis] != c:
                return None
            done.add(name)
            mean = output.detach().movedim(axis, 0).reshape(c, -1).double().mean(dim=1)
            kept = (entry.quantizer.frozen_bits != 0).double()
            delta = (reference - mean) * kept
            bias = self.engine.net.get_submodule(entry.owner).parametrizations[entry.bias_attr].original
            bias.add_(delta.to(bias.dtype).reshape(bias.shape))
            shape = [1] * output.ndim
            shape[axis] = c
            return output + delta.to(output.dtype).reshape(shape)

        for name, owner, axis in self._layer_outputs(teacher=False):
            handles.append(owner.register_forward_hook(
                lambda _m, _args, output, name=name, axis=axis: correct(name, axis, output)))
        try:
            self.engine(*self._bias_batch[0])
        finally:
            for handle in handles:
                handle.remove()
        return len(done)

    def prepare(self, plan: CompressionPlan) -> CompressionPlan:
        """Restore, freeze ``plan``, recalibrate, correct biases, fine-tune: the model now runs the
        candidate. Returns the plan with the clips and weight scales in force."""
        self.restore()
        self.engine.eval()
        self.engine.freeze(plan)
        if self.config.recalibrate:
            self.recalibrate()
        if self.config.bias_correction:
            for _ in range(self.config.bias_passes):
                self.correct_biases()
        current = self.engine.frozen_plan(metadata=plan.metadata, cost_models=list(plan.cost_after) or None)
        if self.config.finetune_steps > 0:
            from plugin.engine.training import FinetuneConfig, finetune

            s = self.problem.settings
            current = finetune(self.engine, current, self.calib, FinetuneConfig(
                epochs=1, batch_size=min(s.batch_size, len(self.calib)), lr=self.config.finetune_lr,
                task_loss=s.task_loss, max_steps_per_epoch=self.config.finetune_steps, device=str(self.device),
                seed=self.config.seed, progress=False)).plan
            self.engine.eval()
        return current

    @torch.no_grad()
    def score(self) -> dict[str, float | None]:
        """The model as it is now, on the held-out data, against the cached original outputs."""
        correct = agree = count = 0
        has_labels = self.held.labels is not None
        classifier = True
        kl = 0.0
        err = ref = 0.0
        for (inputs, labels), teacher in zip(self._held_batches, self._teacher_held):
            student = _outputs(self.engine(*inputs))
            s, t = student[0], teacher[0]
            if _is_classifier(t):
                pred = s.argmax(dim=1)
                agree += int((pred == t.argmax(dim=1)).sum())
                if labels is not None:
                    correct += int((pred == labels).sum())
                log_t = F.log_softmax(t.double(), dim=1)
                kl += float((log_t.exp() * (log_t - F.log_softmax(s.double(), dim=1))).sum())
            else:
                classifier = False
            for so, to in zip(student, teacher):
                if so.is_floating_point():
                    err += float(((so.double() - to.double()) ** 2).sum())
                    ref += float((to.double() ** 2).sum())
            count += int(s.shape[0])
        nmse = err / ref if ref > 0 else (0.0 if err == 0 else 1.0)
        out: dict[str, float | None] = {
            "agreement": agree / max(count, 1) if classifier else None,
            "accuracy": correct / max(count, 1) if classifier and has_labels else None,
            "distill_loss": kl / max(count, 1) if classifier else nmse,
            "samples": float(count),
        }
        if out["accuracy"] is not None:
            out["score"] = out["accuracy"]
        elif out["agreement"] is not None:
            out["score"] = out["agreement"]
        else:
            out["score"] = 1.0 - min(1.0, nmse)
        return out

    def evaluate(self, plan: CompressionPlan) -> Evaluation:
        """Score ``plan``; the model is restored to the original weights afterwards."""
        start = time.perf_counter()
        try:
            current = self.prepare(plan)
            figures = self.score()
        finally:
            self.restore()
        seconds = time.perf_counter() - start
        evaluation = Evaluation(float(figures["score"]), figures["agreement"], float(figures["distill_loss"]),
                                figures["accuracy"], int(figures["samples"]), seconds,
                                seconds / self.forward_seconds, current)
        self.evaluations.append(evaluation)
        return evaluation

    def apply(self, plan: CompressionPlan) -> CompressionPlan:
        """Leave ``plan`` applied (frozen, recalibrated, bias-corrected): the engine is where QAT
        starts. Returns the plan to fine-tune (clips recalibrated)."""
        current = self.prepare(plan)
        self.engine.calibrated = True
        return current

    def stats(self) -> dict[str, Any]:
        """What evaluating cost: per candidate, seconds and multiples of one held-out forward pass."""
        passes = [e.forward_passes for e in self.evaluations]
        seconds = [e.seconds for e in self.evaluations]
        return {
            "candidates": len(self.evaluations),
            "held_out_samples": len(self.held),
            "calibration_samples": len(self.calib),
            "forward_pass_seconds": round(self.forward_seconds, 6),
            "setup_seconds": round(self.setup_seconds, 3),
            "mean_seconds": round(float(np.mean(seconds)), 4) if seconds else None,
            "mean_forward_passes": round(float(np.mean(passes)), 2) if passes else None,
            "max_forward_passes": round(float(np.max(passes)), 2) if passes else None,
            "config": asdict(self.config),
        }


def _ordered_batches(data: Dataset, input_names: Sequence[str], batch_size: int,
                     device: torch.device) -> list[tuple[tuple[Tensor, ...], Tensor | None]]:
    """``data`` in its own order, as tensors on ``device`` (kept: every candidate reuses them)."""
    batches = []
    for start in range(0, len(data), batch_size):
        inputs = tuple(torch.as_tensor(np.asarray(data.arrays[n][start:start + batch_size])).to(device)
                       for n in input_names)
        labels = None if data.labels is None else torch.as_tensor(data.labels[start:start + batch_size]).long().to(device)
        batches.append((inputs, labels))
    return batches


__all__ = ["CRITERIA", "CandidateEvaluator", "Evaluation", "EvaluatorConfig", "channel_scores",
           "quantize_dequantize"]
