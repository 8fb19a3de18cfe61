"""Settings of the torch engine's search and training (validated on construction).

``SearchConfig`` holds every setting of the DNAS search (the gradient and sequential strategies)
and the run settings the engine needs (device, seed, batch size, task loss). Defaults follow
DESIGN.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graph_passes.errors import ConfigError
from plugin.space import DEFAULT_ACTIVATION_PRECISIONS, DEFAULT_WEIGHT_PRECISIONS

TASK_LOSSES = ("distill_kl", "distill_mse", "cross_entropy")
DISCRETISATIONS = ("keep_first", "argmax", "expected")
PRUNE_INIT_SCORES = ("weight", "taylor")
LOGIT_STEPS = ("sgd", "sgd_per_cost", "adam")


class SearchConfigError(ConfigError):
    """An invalid search or fine-tuning setting (the message names the field and the fix)."""


#: QAT learning-rate schedules (``FinetuneConfig.schedule``, ``compress --qat-schedule``)
QAT_SCHEDULES = ("constant", "cosine")
#: compress's QAT schedule: cosine beat the constant rate on 7 of 9 benchmark configurations over
#: 3 seeds (benchmarks/results/qat-schedule-cpu: shapes32 size=50% 74.22 vs 71.43%, MNIST-1D
#: size=35% 98.59 vs 97.94%, W8A8 75.50 vs 75.17%; the two losses within one test sample's
#: worth or the spread). ``FinetuneConfig`` (the primitive) keeps "constant".
DEFAULT_QAT_SCHEDULE = "cosine"

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

    ``logit_steps`` chooses how the logits step: ``sgd`` (SGD + momentum, the paper's),
    ``sgd_per_cost`` (the same, each weight logit column's gradient multiplied by
    ``ref / C_c``, ``C_c`` the cost the column stands for at the start (its widest width, inputs
    at their kept expectation; ``ref`` their cost-weighted mean, so lambda keeps its
    meaning): a column standing for many weights, e.g. an attention head or a group
    spanning several layers, then moves no faster than a one-layer channel of equal benefit per
    unit cost), or ``adam`` (Adam at ``alpha_lr``: per-parameter normalised steps).

    Pruning where it pays (issue 15; all off by default until measured):
    ``discretisation="expected"`` respects the search's expectation: in each group it prunes
    ``round(sum_c theta_0)`` channels (those with the largest theta_0) and gives the others
    widths in the expected counts ``round(sum_c theta_b)``, likeliest first (largest remainder;
    ties within 1e-3 broken by a channel importance: the Taylor score when one was computed,
    else the weight norm: the least important pruned first, the most important widest), instead
    of thresholding each channel at ``theta_0 > 1/2`` (a group whose channels all sit at 0.4
    keeps them all); ``prune_threshold`` does not apply. ``prune_init_score`` chooses the score
    ``prune_init`` starts from: ``weight`` (the norm formula above) or ``taylor`` (first-order
    Taylor ``|sum_w w dL/dw|`` per channel over ``importance_batches`` batches, L the cross-entropy
    against the FP32 model's own argmax, so no labels are needed; the 0-bit logit starts at
    ``prune_init * (1 - 2 p)``, p the channel's importance percentile in its group).
    ``zero_logit_lr`` multiplies the 0-bit logits' gradient (a separate learning rate for
    pruning; with ``logit_steps="adam"`` a constant factor has no effect). ``ordered_cost`` in
    [0, 1) weights each prunable channel's cost in the loss by ``1 + ordered_cost * (1 - 2 p)``
    (p its importance percentile in its group, as above): the least important pushed hardest,
    the same mean pressure; plans are still costed exactly.

    Budget mode (``plugin.budget``): ``budget_settle`` keeps searching after the first plan that
    meets the budget, for the rest of ``epochs``, with lambda steered by feedback on the
    discretised plan's cost, instead of handing the unused epochs to QAT: the first such plan
    can come after one or two epochs, while the mixture is still soft (temperature ~1) and the
    logits have barely moved, so its per-channel choices are mostly the start's.
    ``settle_temperature`` (with ``budget_settle``): the temperature the settling phase anneals
    to by its last epoch (geometrically), so the weights train under a nearly hard mixture, the
    one the plan discretises; None keeps the ``temperature_decay`` schedule.
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
    logit_steps: str = "sgd"
    prune_init: float = 0.0
    prune_init_score: str = "weight"
    importance_batches: int = 4
    zero_logit_lr: float = 1.0
    ordered_cost: float = 0.0
    budget_settle: bool = False
    settle_temperature: float | None = None
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
        if self.logit_steps not in LOGIT_STEPS:
            raise SearchConfigError(f"logit_steps {self.logit_steps!r} is unknown; use one of "
                                    f"{', '.join(LOGIT_STEPS)}")
        if self.prune_init_score not in PRUNE_INIT_SCORES:
            raise SearchConfigError(f"prune_init_score {self.prune_init_score!r} is unknown; use one of "
                                    f"{', '.join(PRUNE_INIT_SCORES)}")
        if not (math.isfinite(self.zero_logit_lr) and self.zero_logit_lr > 0):
            raise SearchConfigError(f"zero_logit_lr must be a finite number > 0, got {self.zero_logit_lr!r}")
        if not 0 <= self.ordered_cost < 1:
            raise SearchConfigError(f"ordered_cost must be in [0, 1), got {self.ordered_cost!r}")
        for name in ("epochs", "batch_size", "importance_batches"):
            if int(getattr(self, name)) < 1:
                raise SearchConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "alpha_lr", "temperature"):
            if not float(getattr(self, name)) > 0:
                raise SearchConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.settle_temperature is not None and not (math.isfinite(self.settle_temperature)
                                                        and self.settle_temperature > 0):
            raise SearchConfigError(f"settle_temperature must be a finite number > 0, got {self.settle_temperature!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise SearchConfigError(f"lam (lambda) must be a finite number >= 0, got {self.lam!r}")

    @property
    def site_precisions(self) -> tuple[int, ...]:
        return self.act_bits if self.act_bits is not None else self.activation_precisions
