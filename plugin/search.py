"""The gradient-based joint pruning + mixed-precision search (Motetti et al., arXiv 2407.01054).

    searchable = SearchableModel.build(normalised_model, SearchConfig(lam=0.5))
    plan = run_search(searchable, dataset, searchable.config)

Loss = task loss + lambda * cost. The cost is the searchable model's expected cost under theta;
with ``normalise_cost`` (the default) it is divided by the cost of the same model with every
weight and activation at 8 bits, so lambda is unit-free and means the same for every cost model
(``lambda_paper = lam / cost_8bit``). Weights (and clips, without decay) train with Adam, the
architecture logits with SGD + momentum; the temperature decays once per epoch. The module is
kept in eval mode throughout: the ONNX graph has inference semantics (BatchNorm with stored
statistics, no dropout); gradients flow all the same.

Data: a :class:`plugin.data.Dataset` (shuffled per epoch with the seed) or any re-iterable
sequence of batches (a batch: a dict input name -> array, a tuple of arrays in the model's input
order optionally followed by labels, or one array). Targets: the original FP32 model's outputs
(distillation, the default: label-free) or the labels (``task_loss="cross_entropy"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from graph_passes.errors import ConfigError, DataError
from plugin.plan import CompressionPlan
from plugin.quantizers import DEFAULT_ACTIVATION_PRECISIONS, DEFAULT_WEIGHT_PRECISIONS

if TYPE_CHECKING:
    from plugin.searchable import SearchableModel

logger = logging.getLogger(__name__)

TASK_LOSSES = ("distill_kl", "distill_mse", "cross_entropy")
DISCRETISATIONS = ("keep_first", "argmax")

Batch = tuple[tuple[Tensor, ...], "Tensor | None"]


class SearchConfigError(ConfigError):
    """An invalid search or fine-tuning setting (the message names the field and the fix)."""


@dataclass
class SearchConfig:
    """Every setting of the gradient search. Defaults follow DESIGN.md.

    ``lam`` multiplies the cost divided by the all-8-bit cost (``normalise_cost``); short
    searches need lam in the tens to thousands (digits, 20 steps per epoch: ~100 starts trading
    bits, ~300-600 prunes). ``discretisation``: ``keep_first`` prunes a channel only when
    ``theta_0 > 1/2``, then takes the likeliest width; ``argmax`` is the paper's plain argmax.

    ``act_bits`` fixes the activation precision set (e.g. ``(8,)``) instead of searching over
    ``activation_precisions``. ``init_clip`` None calibrates each activation clip from the data
    (99.9th percentile of |x| under the FP32 model) instead of the fixed PACT value.
    ``max_steps_per_epoch`` caps an epoch (quick runs and tests). ``prune_init`` > 0 starts each
    channel's 0-bit logit at ``prune_init * (1 - |W_c| / mean |W|)`` (weak channels likelier to
    be pruned) instead of 0 for all; off by default: on the digits sample (10 + 5 epochs) it
    pruned more at lambda 60 (0.20 vs 0.26 of W8, same 97.6%) and lost accuracy at 80 and 110.
    """

    weight_precisions: tuple[int, ...] = DEFAULT_WEIGHT_PRECISIONS
    activation_precisions: tuple[int, ...] = DEFAULT_ACTIVATION_PRECISIONS
    act_bits: tuple[int, ...] | None = None
    cost_model: str = "size"
    lam: float = 1.0
    lambda_ramp: bool = False
    normalise_cost: bool = True
    epochs: int = 20
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    alpha_lr: float = 1e-2
    alpha_momentum: float = 0.9
    temperature: float = 1.0
    temperature_decay: float = 0.045
    task_loss: str = "distill_kl"
    discretisation: str = "keep_first"
    prune_init: float = 0.0
    init_clip: float | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.weight_precisions = tuple(int(b) for b in self.weight_precisions)
        self.activation_precisions = tuple(int(b) for b in self.activation_precisions)
        if self.act_bits is not None:
            self.act_bits = tuple(int(b) for b in self.act_bits)
        if self.task_loss not in TASK_LOSSES:
            raise SearchConfigError(f"task_loss {self.task_loss!r} is unknown; use one of {', '.join(TASK_LOSSES)}")
        if self.discretisation not in DISCRETISATIONS:
            raise SearchConfigError(f"discretisation {self.discretisation!r} is unknown; use one of "
                                    f"{', '.join(DISCRETISATIONS)}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SearchConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "alpha_lr", "temperature"):
            if not float(getattr(self, name)) > 0:
                raise SearchConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise SearchConfigError(f"lam (lambda) must be a finite number >= 0, got {self.lam!r}")

    @property
    def site_precisions(self) -> tuple[int, ...]:
        return self.act_bits if self.act_bits is not None else self.activation_precisions


# ----------------------------------------------------------------------------- data


def _as_tensor(value: Any, device: torch.device) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    return tensor.to(device)


def _split_batch(batch: Any, input_names: Sequence[str], device: torch.device) -> Batch:
    """One user batch -> (inputs in the model's order, labels or None)."""
    if isinstance(batch, Mapping):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise DataError(f"a batch has no array for model input(s) {missing}; keys: {sorted(batch)}")
        labels = batch.get("labels") if "labels" not in input_names else None
        inputs = tuple(_as_tensor(batch[n], device) for n in input_names)
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
        labels = items.pop() if len(items) == len(input_names) + 1 else None
        if len(items) != len(input_names):
            raise DataError(f"a batch holds {len(items)} arrays but the model has {len(input_names)} inputs")
        inputs = tuple(_as_tensor(v, device) for v in items)
    else:
        inputs, labels = (_as_tensor(batch, device),), None
    return inputs, None if labels is None else _as_tensor(labels, device).long()


def iterate_batches(
    data: Any, input_names: Sequence[str], batch_size: int, seed: int, device: torch.device,
    max_steps: int | None = None,
) -> Iterator[Batch]:
    """Batches of a :class:`plugin.data.Dataset` (shuffled by ``seed``) or of a batch sequence."""
    if hasattr(data, "arrays") and hasattr(data, "batch_indices"):
        labels = getattr(data, "labels", None)
        source: Iterable[Any] = (
            ({n: data.arrays[n][i] for n in input_names}
             | ({} if labels is None else {"labels": labels[i]}))
            for i in data.batch_indices(batch_size, shuffle=True, seed=seed)
        )
    else:
        source = data
    for step, batch in enumerate(source):
        if max_steps is not None and step >= max_steps:
            return
        yield _split_batch(batch, input_names, device)


def count_batches(data: Any, batch_size: int, max_steps: int | None) -> int | None:
    n = len(data) if hasattr(data, "__len__") else None
    if n is not None and hasattr(data, "batch_indices"):
        n = math.ceil(n / batch_size)
    return n if max_steps is None or n is None else min(n, max_steps)


# ----------------------------------------------------------------------------- loss


def _outputs(value: Any) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def task_loss(kind: str, student: Any, teacher: Any, labels: Tensor | None) -> Tensor:
    """Distillation (KL over axis 1 or MSE, summed over float outputs) or cross-entropy."""
    outs = _outputs(student)
    if kind == "cross_entropy":
        if labels is None:
            raise DataError("task_loss='cross_entropy' needs labels; pass labelled data or use distill_kl")
        return F.cross_entropy(outs[0], labels)
    total = outs[0].new_zeros(())
    for s, t in zip(outs, _outputs(teacher)):
        if not s.is_floating_point():
            continue
        if kind == "distill_kl" and s.ndim >= 2 and s.shape[1] > 1:
            log_t = F.log_softmax(t, dim=1)
            total = total + (log_t.exp() * (log_t - F.log_softmax(s, dim=1))).sum(dim=1).mean()
        else:
            total = total + F.mse_loss(s, t)
    return total


# ----------------------------------------------------------------------------- runner


@dataclass
class EpochStats:
    epoch: int
    task_loss: float
    cost: float
    lam: float
    temperature: float


@dataclass
class SearchRunner:
    """Optimisers and schedule state of one search; :meth:`run_epoch` is one pass over the data.

    ``budget.search_to_budget`` drives it with a changing lambda (warm start across rounds).
    """

    searchable: SearchableModel
    data: Any
    config: SearchConfig
    history: list[EpochStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        from plugin.quantizers import net_param_groups

        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.searchable.to(self.device)
        if cfg.init_clip is None and not self.searchable.calibrated:
            self.searchable.calibrate(self.data, cfg.batch_size, max_batches=4)
        self.weight_opt = torch.optim.Adam(net_param_groups(self.searchable, cfg.weight_decay),
                                           lr=cfg.lr)
        self.alpha_opt = torch.optim.SGD(self.searchable.nas_parameters(), lr=cfg.alpha_lr,
                                         momentum=cfg.alpha_momentum)
        self.temperature = cfg.temperature
        self.searchable.set_temperature(self.temperature)
        before = self.searchable.cost_before(cfg.cost_model)
        self.cost_scale = 1.0 / before if cfg.normalise_cost and before > 0 else 1.0

    def _batches(self, epoch: int, max_steps: int | None = None) -> Iterator[Batch]:
        cfg = self.config
        steps = cfg.max_steps_per_epoch if max_steps is None else max_steps
        return iterate_batches(self.data, self.searchable.input_names, cfg.batch_size,
                               cfg.seed + epoch, self.device, steps)

    def run_epoch(self, lam: float, should_stop: Callable[[], bool] | None = None,
                  check_every: int = 1) -> EpochStats:
        """One epoch at ``lam``, then the temperature decays.

        ``should_stop`` is asked every ``check_every`` steps; True ends the epoch early (the
        budget controller checks the discretised plan this way).
        """
        cfg, model = self.config, self.searchable
        epoch = len(self.history)
        total = count_batches(self.data, cfg.batch_size, cfg.max_steps_per_epoch)
        bar = tqdm(self._batches(epoch), total=total, desc=f"search {epoch + 1}", leave=False,
                   disable=not cfg.progress)
        losses, cost_value = [], float("nan")
        for inputs, labels in bar:
            teacher = model.teacher_outputs(*inputs) if cfg.task_loss != "cross_entropy" else None
            loss_task = task_loss(cfg.task_loss, model(*inputs), teacher, labels)
            cost = model.cost(cfg.cost_model) * self.cost_scale
            loss = loss_task + lam * cost
            self.weight_opt.zero_grad(set_to_none=True)
            self.alpha_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.weight_opt.step()
            self.alpha_opt.step()
            losses.append(float(loss_task.detach()))
            cost_value = float(cost.detach())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", cost=f"{cost_value:.4f}")
            if should_stop is not None and len(losses) % check_every == 0 and should_stop():
                bar.close()
                break
        stats = EpochStats(epoch + 1, float(np.mean(losses)) if losses else float("nan"), cost_value, lam,
                           self.temperature)
        self.history.append(stats)
        self.temperature *= math.exp(-cfg.temperature_decay)
        model.set_temperature(self.temperature)
        logger.info("search epoch %d: task loss %.4f, cost %.4f, lambda %.3g, T %.3f",
                    stats.epoch, stats.task_loss, stats.cost, lam, stats.temperature)
        return stats

    def lam_at(self, epoch: int) -> float:
        """lambda for ``epoch`` (0-based): ramped from lam/100 over the first half if asked."""
        cfg = self.config
        half = cfg.epochs / 2
        if not cfg.lambda_ramp or half <= 0 or epoch >= half:
            return cfg.lam
        return cfg.lam / 100 * 100 ** (epoch / half)

    def metadata(self, **extra: Any) -> dict[str, Any]:
        cfg = self.config
        return {
            "strategy": "gradient", "cost_model": cfg.cost_model, "normalise_cost": cfg.normalise_cost,
            "seed": int(cfg.seed), "epochs": len(self.history), "task_loss": cfg.task_loss,
            "history": [{k: float(v) if isinstance(v, float) else v for k, v in asdict(s).items()}
                        for s in self.history],
            **extra,
        }


def run_search(searchable: SearchableModel, data: Any, config: SearchConfig | None = None) -> CompressionPlan:
    """Search for ``config.epochs`` epochs at ``config.lam``; returns the discretised plan."""
    config = config or searchable.config
    runner = SearchRunner(searchable, data, config)
    for epoch in range(config.epochs):
        runner.run_epoch(runner.lam_at(epoch))
    plan = searchable.discretise(metadata=runner.metadata(**{"lambda": float(config.lam),
                                                             "lambda_ramp": config.lambda_ramp}))
    logger.info("search done: %s", searchable.describe_plan(plan, config.cost_model))
    return plan
