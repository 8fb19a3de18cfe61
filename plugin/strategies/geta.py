"""``--strategy geta``: joint structured pruning + quantization-aware training to explicit targets,
after GETA (Qu et al., CVPR 2025, arXiv 2502.16638). No lambda and no budget search: the user
states the group sparsity (``--sparsity 0.3``: that fraction of the prunable group channels is
removed) and the weight bit-width range (``--bits 2-8``), and one training run meets both.

The pruning units are the analysis' channel groups (``space.prunable_groups``): every layer of a
group shares the group's mask, so quantizers never break a group, and a group always keeps at
least one channel. Each weight layer gets a learned quantizer (step d, range q_m, exponent t; the
bit-width b = log2(q_m^t / d + 1) + 1 follows) trained by QASSO (``plugin.engine.geta``).

Epochs (``--epochs E``, the training budget): ``floor(0.3 E)`` cool-down epochs, the rest QASSO,
its steps split warm-up : projection : joint = 1 : 2 : 4 (E = 20: 14 QASSO epochs = 2 warm-up,
4 projection, 8 joint; 6 cool-down). Then the shared QAT runs ``--finetune-epochs``.

Targets: the number removed is ``round(sparsity * N)`` of the N prunable group channels, exactly
(spread over the pruning periods, the rest on the last); a sparsity that would empty a group is
refused before any training. Bits: the projection keeps every layer's learned b inside the range
(its upper bound lowered by ``bit_reduction`` per projection period: 8 -> 6 -> 4 with the
defaults); the plan's width is b rounded to the nearest integer, then up to the next width the
export writes inside the range (3 -> 4, 5..7 -> 8; ``plugin.engine.geta.snap_bits``).
Activations stay at the widest ``--act-bits`` width (8 by default), as in GETA's weight-only mode.

The engine handed to the shared QAT is the trained model itself (a
:class:`~plugin.engine.fakequant.FakeQuantModel` subclass): the cool-down and QAT freeze the plan,
which switches every layer to the export's quantizer (per-channel max|W_c| scales at the plan's
widths), so the learned q_m clipping and t exponent do not survive into the file: they shape the
training, the exported grid is the uniform one ``graph_passes.qdq`` writes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Mapping

from graph_passes.bitwidths import WEIGHT_BITS
from graph_passes.errors import ConfigError
from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem

logger = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.3
COOLDOWN_FRACTION = 0.3


def parse_sparsity(value: Any, flag: str = "--sparsity") -> float:
    """A group sparsity in [0, 1); ConfigError naming ``flag`` otherwise."""
    try:
        sparsity = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {value!r}: give a fraction of the prunable channels in [0, 1), "
                          f"e.g. {flag} 0.3") from None
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{flag} {value}: the fraction of channels to remove must be in [0, 1), e.g. {flag} 0.3")
    return sparsity


def parse_bits(text: Any, flag: str = "--bits") -> tuple[int, int]:
    """``"2-8"`` -> (2, 8): both ends exportable weight widths ({2, 4, 8}) and low <= high."""
    choices = ", ".join(map(str, WEIGHT_BITS))
    raw = str(text).strip()
    lo_text, sep, hi_text = raw.partition("-")
    try:
        lo, hi = (int(lo_text), int(hi_text)) if sep else (int(raw), int(raw))
    except ValueError:
        raise ConfigError(f"{flag} {raw!r}: give a range LO-HI of weight bit-widths from {choices}, "
                          f"e.g. {flag} 2-8") from None
    bad = [b for b in (lo, hi) if b not in WEIGHT_BITS]
    if bad:
        raise ConfigError(f"{flag} {raw}: {', '.join(map(str, dict.fromkeys(bad)))} bit(s) cannot be exported; "
                          f"both ends must be one of {choices}, e.g. {flag} 2-8")
    if lo > hi:
        raise ConfigError(f"{flag} {raw}: the low end is above the high end; write it LO-HI, e.g. {flag} {hi}-{lo}")
    return lo, hi


def range_widths(lo: int, hi: int) -> tuple[int, ...]:
    """The export's weight widths inside [lo, hi]."""
    return tuple(b for b in WEIGHT_BITS if lo <= b <= hi)


class GetaStrategy:
    name: ClassVar[str] = "geta"
    summary: ClassVar[str] = ("GETA-style joint pruning + quantization-aware training to explicit targets "
                              "(Qu et al. 2025): --sparsity of the group channels, --bits LO-HI; no --target")
    steerable: ClassVar[bool] = False
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "sparsity": StrategyOption("sparsity", float, DEFAULT_SPARSITY,
                                   "fraction of the prunable group channels to remove, in [0, 1) (--sparsity)"),
        "bits": StrategyOption("bits", str, None,
                               "weight bit-width range LO-HI from 2, 4, 8 (--bits) [default: the --weight-bits range]"),
        "projection_periods": StrategyOption("projection_periods", int, 3,
                                             "periods of the projection stage (the upper bit bound drops after each)"),
        "bit_reduction": StrategyOption("bit_reduction", int, 2, "bits the upper bound drops per projection period"),
        "pruning_periods": StrategyOption("pruning_periods", int, 4, "periods of the joint stage (K/P channels each)"),
        "lr_quant": StrategyOption("lr_quant", float, 1e-3, "Adam learning rate of d, q_m and t"),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        s = problem.settings
        space = problem.space
        sparsity = parse_sparsity(options.get("sparsity", DEFAULT_SPARSITY))
        widths_allowed = s.precisions.weight_widths
        if options.get("bits") is None:
            lo, hi = min(widths_allowed), max(widths_allowed)
        else:
            lo, hi = parse_bits(options["bits"])
        widths = range_widths(lo, hi)
        missing = [b for b in widths if b not in widths_allowed]
        if missing:
            raise ConfigError(f"--bits {lo}-{hi} needs weight widths {','.join(map(str, widths))} but --weight-bits "
                              f"allows only {','.join(map(str, s.precisions.weights))}; drop --weight-bits")
        groups = list(space.prunable_groups)
        total = sum(space.group_size(g) for g in groups)
        room = sum(space.group_size(g) - 1 for g in groups)
        n_remove = int(round(sparsity * total))
        if sparsity > 0 and not s.precisions.prunes:
            raise ConfigError("--strategy geta with --sparsity > 0 prunes: --weight-bits must include 0 "
                              "(or drop --weight-bits)")
        if n_remove > 0 and not groups:
            raise ConfigError(f"--sparsity {sparsity:g}: this model has no prunable channel groups "
                              "(`prunequant inspect` says why); use --sparsity 0")
        if n_remove > room:
            most = math.floor(1000 * room / total) / 1000  # a 3-decimal sparsity that fits
            raise ConfigError(f"--sparsity {sparsity:g} would remove {n_remove} of the {total} prunable group "
                              f"channels, but every group keeps one, so at most {room} can go; use --sparsity "
                              f"{most:.3f} or less")
        if s.epochs < 1:
            raise ConfigError("--strategy geta trains: --epochs must be at least 1")
        return self._run(problem, options, sparsity, lo, hi, widths, n_remove, total)

    def _run(self, problem: Problem, options: Mapping[str, Any], sparsity: float, lo: int, hi: int,
             widths: tuple[int, ...], n_remove: int, total: int) -> StrategyResult:
        from graph_passes.prune import repair_removal
        from plugin.engine.geta import GetaModel, QassoConfig, run_qasso, snap_bits
        from plugin.engine.training import FinetuneConfig, finetune
        from plugin.strategies.problem import _check_batching

        s = problem.settings
        space = problem.space
        act = max(s.precisions.activations)
        config = problem.search_config()
        net = GetaModel.build(problem.model, config, space=space)
        _check_batching(net, problem.train, config)
        net = net.to(config.device)
        net.calibrate(problem.train, config.batch_size)
        cool = int(COOLDOWN_FRACTION * s.epochs)
        qasso_epochs = s.epochs - cool
        result = run_qasso(net, problem.train, QassoConfig(
            lo=lo, hi=hi, n_remove=n_remove, epochs=qasso_epochs, batch_size=config.batch_size,
            max_steps_per_epoch=s.max_steps_per_epoch, lr=config.lr, lr_quant=float(options["lr_quant"]),
            weight_decay=config.weight_decay, bit_reduction=int(options["bit_reduction"]),
            projection_periods=int(options["projection_periods"]), pruning_periods=int(options["pruning_periods"]),
            task_loss=s.task_loss, device=config.device, seed=s.seed, progress=s.progress))
        removal = {g: list(v) for g, v in result.pruned.items() if v}
        repaired = repair_removal(space.analysis, removal) if removal else {}
        history = list(result.history)
        if {g: sorted(v) for g, v in repaired.items() if v} != {g: sorted(v) for g, v in removal.items()}:
            given_back = sum(len(v) for v in removal.values()) - sum(len(v) for v in repaired.values())
            logger.warning("geta: %d pruned channel(s) given back so that no tensor of the graph is emptied; "
                           "the sparsity falls short of the target by that much", given_back)
            history.append({"event": "repair", "given_back": given_back})
            removal = {g: v for g, v in repaired.items() if v}
        removed = sum(len(v) for v in removal.values())
        kept = {g: [k for k in range(space.group_size(g)) if k not in set(removal.get(g, ()))]
                for g in space.prunable_groups}
        layer_bits = {name: snap_bits(b, widths) for name, b in result.bits.items()}
        summary = {
            "sparsity_target": sparsity, "prunable_channels": total, "removed": removed,
            "sparsity": removed / total if total else 0.0, "bits_range": [lo, hi], "upper_bound_final": result.upper_bound,
            "learned_bits": {n: round(b, 3) for n, b in result.bits.items()}, "layer_bits": layer_bits,
            "epochs": {"qasso": qasso_epochs, "cooldown": cool},
            "steps": {"warmup": result.schedule.warmup, "projection": result.schedule.projection,
                      "joint": result.schedule.joint, "projection_periods": result.schedule.projection_periods,
                      "pruning_periods": result.schedule.pruning_periods},
        }
        metadata = {"strategy": "geta", "geta": summary}
        plan = space.plan(kept=kept, layer_bits=layer_bits, site_bits=act, clips=net.clips(), metadata=metadata)
        logger.info("geta: %d/%d group channels removed (target %.3f), widths %s; %s", removed, total, sparsity,
                    sorted(set(layer_bits.values())), space.describe_plan(plan, s.cost))
        if cool:
            plan = finetune(net, plan, problem.train, FinetuneConfig(
                epochs=cool, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                task_loss=s.task_loss, max_steps_per_epoch=s.max_steps_per_epoch, device=config.device,
                seed=s.seed, progress=s.progress)).plan
        else:
            net.freeze(plan)
        history.append({"event": "plan", **{k: v for k, v in summary.items() if k != "learned_bits"}})
        return StrategyResult(plan, history, engine=net, epochs_used=s.epochs)


__all__ = ["GetaStrategy", "parse_bits", "parse_sparsity", "range_widths"]
