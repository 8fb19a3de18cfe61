"""``--strategy bayesian``: Bayesian optimisation of per-group pruning ratios of a quantized model
(after Guerra, Drummond et al., "Automatic Pruning for Quantized Neural Networks", arXiv 2002.00523).

The network is quantized first: every weight at one width (``-S bits``, default the widest of
``--weight-bits``), every activation at the widest ``--act-bits``. Then optuna chooses a keep ratio
per prunable channel group (``space.prunable_groups``) in ``[min_keep, 1]`` on a grid of
``ratio_step``; the channels kept are the best by a criterion suited to low-precision weights
(``-S criterion``, default ``ql1``: the integer-domain L1 of the filter quantized at that width,
times its scale; ``l1``/``l2``: the float criteria of :mod:`plugin.importance`). Each trial's plan
is costed by the space (any cost model, no training) and, if it meets the budget, scored by the
shared candidate evaluator (:mod:`plugin.evaluator`: recalibrated clips, bias correction, held-out
accuracy or agreement with the original). Objective: the score under ``--target`` (a trial over
budget is not evaluated; its value is ``-cost / budget`` and its constraint is violated, so the
sampler learns where the boundary is), or ``score - lambda * cost / cost(8-bit)`` with
``--lambda``. The first trials are enqueued: the largest uniform ratio that meets the budget (and
no pruning where that is feasible), so a feasible plan is known from the start.

Sampler (``-S sampler``): ``tpe`` (default) is optuna's multivariate TPE with the constant liar
and the budget as a constraint (c-TPE). Chosen because (1) several workers share one study
(``--storage``): the constant liar stops concurrent workers from proposing the same point while
trials run, (2) its cost per suggestion does not grow with the number of groups (ResNet-50 has
dozens) and the ratios are a grid, which it samples natively, (3) it needs no extra solver. ``gp``
(optuna's GPSampler, closer to the paper's Gaussian-process BO) and ``random`` are available.
Measured (``benchmarks/bayesian.py --parts samplers``, digits, W4, ``size=10%``, 40 trials): best
held-out score tpe 0.402 in 53 s, gp 0.406 in 134 s, random 0.211 in 20 s.

The study lives in optuna's storage: by default SQLite in ``NAME.study.db`` beside the output
(in memory when nothing is written), so an interrupted run continues with ``--resume``;
``--storage URL`` (an RDB URL such as ``sqlite:///s.db`` or ``postgresql://...``, or a path to an
optuna journal file) lets several processes share one study (``--study NAME``, all with
``--resume``). ``--trials N`` is the total of completed trials the study ends with, over all
workers: a trial whose number places it beyond N (two workers starting the last one together) is
pruned unevaluated, and a plan already evaluated is looked up, not evaluated again. The study
records the model hash and the search settings; a study of another model or other settings is
refused. After the study: the best feasible trial's plan is applied (recalibrated,
bias-corrected) and handed to the shared QAT and export; QAT gets ``--epochs`` + ``--finetune-epochs``
(the search trains nothing). ``history`` holds every trial (params, kept channels, scores, costs),
the trials' Pareto front (score vs cost) and the evaluator's measured cost; with an output,
``NAME.pareto.png`` shows the front.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graph_passes.errors import ConfigError, CostModelError, PlanError
from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem

if TYPE_CHECKING:
    import optuna

    from plugin.evaluator import CandidateEvaluator
    from plugin.plan import CompressionPlan

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "random")
#: ``prunequant compress`` flags that map onto this strategy's options
CLI_FLAGS = {"trials": "--trials", "study": "--study", "storage": "--storage", "resume": "--resume"}


class BayesianStrategy:
    name: ClassVar[str] = "bayesian"
    summary: ClassVar[str] = ("quantize uniformly, then Bayesian optimisation (optuna) of a pruning ratio per "
                              "channel group, each candidate recalibrated and scored on held-out data; "
                              "--target or --lambda; resumable, shareable study (--study, --storage)")
    steerable: ClassVar[bool] = True
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "trials": StrategyOption("trials", int, 40, "completed trials the study ends with (over all workers)"),
        "bits": StrategyOption("bits", int, None, "the uniform weight width [default: widest of --weight-bits]"),
        "criterion": StrategyOption("criterion", str, "ql1", "channels kept: ql1 (integer-domain L1 x scale), l1, l2"),
        "sampler": StrategyOption("sampler", str, "tpe", "tpe, gp or random"),
        "min_keep": StrategyOption("min_keep", float, 0.2, "lowest keep ratio of a group"),
        "ratio_step": StrategyOption("ratio_step", float, 0.05, "grid of the keep ratios"),
        "study": StrategyOption("study", str, None, "study name [default: bayesian-<model hash>]"),
        "storage": StrategyOption("storage", str, None,
                        "optuna storage: RDB URL or journal file [default: NAME.study.db beside the output]"),
        "resume": StrategyOption("resume", bool, False, "continue (or join) an existing study of that name"),
        "calib_samples": StrategyOption("calib_samples", int, 256, "training samples per candidate's recalibration"),
        "eval_samples": StrategyOption("eval_samples", int, None, "held-out samples scored per trial [default: all]"),
        "bias_correction": StrategyOption("bias_correction", bool, True, "correct biases after pruning/quantization"),
        "finetune_steps": StrategyOption("finetune_steps", int, 0, "QAT steps per candidate before scoring"),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        return _Search(problem, dict(options)).run()


# ----------------------------------------------------------------------------- storage


def redact(url: str) -> str:
    """``url`` without a password (it goes into reports and logs)."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def study_path(output: str) -> str:
    """NAME.study.db beside NAME.onnx."""
    out = Path(output)
    return str((out.with_suffix("") if out.suffix else out)) + ".study.db"


def open_storage(url: str | None, output: str | None) -> tuple[Any, str]:
    """(optuna storage, its description): an RDB URL, a journal file path, the default SQLite file
    beside ``output``, or in memory; ConfigError (one line) when it cannot be opened."""
    import optuna

    if url is None:
        if output is None:
            return optuna.storages.InMemoryStorage(), "in memory"
        url = "sqlite:///" + os.path.abspath(study_path(output))
        flag = "the study file beside -o"
    else:
        flag = "--storage"
    try:
        if "://" in url:
            kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        else:
            try:
                from optuna.storages.journal import JournalFileBackend, JournalStorage
            except ImportError:  # optuna < 4
                from optuna.storages import JournalFileStorage as JournalFileBackend, JournalStorage

            storage = JournalStorage(JournalFileBackend(url))
    except Exception as exc:  # sqlalchemy / OS / import errors: all mean "cannot open it"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{flag} {redact(url)!r} cannot be opened as an optuna storage ({type(exc).__name__}: "
                          f"{reason}); give an RDB URL such as sqlite:///study.db or a journal file path") from None
    return storage, redact(url)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """optuna's per-trial INFO lines off while we run (our bar shows progress); restored after."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


RECORD = "prunequant"


def _attrs(trial: Any) -> dict[str, Any]:
    """A trial's record (one user attribute, see ``objective``) plus its other user attributes."""
    attrs = dict(trial.user_attrs)
    return {**attrs.pop(RECORD, {}), **attrs}


def _settings_mismatch(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return [f"{k}: study {recorded.get(k)!r}, this run {v!r}" for k, v in wanted.items() if recorded.get(k) != v]


# ----------------------------------------------------------------------------- the search


class _Search:
    def __init__(self, problem: Problem, options: dict[str, Any]) -> None:
        self.problem = problem
        self.options = options
        s = problem.settings
        space = problem.space
        if not s.precisions.prunes:
            raise ConfigError("--strategy bayesian prunes channels: --weight-bits must include 0, e.g. 0,8")
        widths = s.precisions.weight_widths
        self.bits = int(options["bits"]) if options.get("bits") is not None else max(widths)
        if self.bits not in widths:
            raise ConfigError(f"-S bits={self.bits}: not one of --weight-bits {','.join(map(str, widths))}")
        self.act_bits = max(s.precisions.activations)
        self.trials = int(options["trials"])
        if self.trials < 1:
            raise ConfigError(f"--trials {self.trials}: give at least 1")
        self.sampler_name = str(options["sampler"]).lower()
        if self.sampler_name not in SAMPLERS:
            raise ConfigError(f"-S sampler={options['sampler']}: use one of {', '.join(SAMPLERS)}")
        self.min_keep, self.step = float(options["min_keep"]), float(options["ratio_step"])
        steps = (1.0 - self.min_keep) / self.step if self.step > 0 else float("nan")
        if not (0 < self.min_keep <= 1 and self.step > 0 and math.isfinite(steps)
                and abs(steps - round(steps)) < 1e-6):
            raise ConfigError(f"-S min_keep={self.min_keep} -S ratio_step={self.step}: need 0 < min_keep <= 1 and "
                              "(1 - min_keep) a whole number of steps, e.g. min_keep=0.2 ratio_step=0.05")
        self.grid = [round(self.min_keep + i * self.step, 10) for i in range(int(round(steps)) + 1)]
        self.groups = list(space.prunable_groups)
        if not self.groups:
            raise PlanError("--strategy bayesian: this model has no prunable channel group (`prunequant inspect` "
                            "says why); use --strategy gradient or uniform")
        from plugin.evaluator import channel_scores

        self.criterion = str(options["criterion"]).lower()
        self.scores = channel_scores(space, self.criterion, self.bits)
        self.cost_name = s.cost
        self.budget = None
        self.target_abs: float | None = None
        if s.target:
            from plugin.targets import parse_target

            self.budget = parse_target(s.target)
            self.cost_name = self.budget.cost_model
            self.target_abs = self.budget.absolute(space.cost_before(self.cost_name))
        self.lam = None if s.target else float(s.lam if s.lam is not None else 1.0)
        self.before = space.cost_before(self.cost_name)
        self._check_reachable()
        self.study_name = options.get("study") or f"bayesian-{space.model_sha256[:12]}"
        self.evaluator: CandidateEvaluator | None = None

    # ------------------------------------------------------------------ plans

    def kept(self, ratios: Mapping[str, float]) -> dict[str, list[int]]:
        from plugin.importance import keep_indices

        return {g: keep_indices(self.scores[g], float(ratios[g])) for g in self.groups}

    def plan(self, ratios: Mapping[str, float], metadata: Mapping[str, Any] | None = None) -> CompressionPlan:
        space = self.problem.space
        return space.plan(kept=self.kept(ratios), layer_bits={n: self.bits for n in space.layers},
                          site_bits=self.act_bits, metadata=metadata)

    def cost(self, ratios: Mapping[str, float]) -> float:
        return self.problem.space.cost_of_plan(self.plan(ratios), self.cost_name)

    def feasible(self, cost: float) -> bool:
        return self.target_abs is None or cost <= self.target_abs * (1 + 1e-9)

    def _check_reachable(self) -> None:
        if self.target_abs is None:
            return
        from plugin.budget import format_cost

        lowest = self.cost({g: self.min_keep for g in self.groups})
        if not self.feasible(lowest):
            raise CostModelError(
                f"budget {self.budget.text!r} ({format_cost(self.cost_name, self.target_abs)}) cannot be met by "
                f"pruning a W{self.bits} model: keeping {self.min_keep:g} of every prunable group costs "
                f"{format_cost(self.cost_name, lowest)} ({lowest / self.before:.3f} of the 8-bit model); use a "
                "lower -S bits, a lower -S min_keep or a looser --target")

    def uniform_ratio(self) -> float | None:
        """The largest grid ratio that, applied to every group, meets the budget."""
        feasible = [r for r in self.grid if self.feasible(self.cost({g: r for g in self.groups}))]
        return max(feasible) if feasible else None

    def _key(self, ratios: Mapping[str, float]) -> str:
        counts = {g: len(k) for g, k in self.kept(ratios).items()}
        return hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ the study

    def settings(self) -> dict[str, Any]:
        objective = f"target {self.budget.text}" if self.budget else f"lambda {self.lam:g} x {self.cost_name}"
        return {"model_sha256": self.problem.space.model_sha256, "bits": self.bits, "act_bits": self.act_bits,
                "criterion": self.criterion, "min_keep": self.min_keep, "ratio_step": self.step,
                "objective": objective, "groups": self.groups}

    def sampler(self, shared: bool) -> optuna.samplers.BaseSampler:
        import optuna

        seed = self.problem.settings.seed
        if shared:  # workers of one study must not draw the same random start points
            seed = (seed * 1_000_003 + os.getpid()) % (2 ** 31)
        startup = max(2, min(10, self.trials // 4))

        # the budget as a constraint: optuna >= 5 reads Trial.set_constraint; older ones a callback
        legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {
            "constraints_func": lambda t: [float(_attrs(t).get("constraint", 0.0))]}
        if self.sampler_name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                              constant_liar=True, **legacy)
        if self.sampler_name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, deterministic_objective=True,
                                             **legacy)
        return optuna.samplers.RandomSampler(seed=seed)

    def open_study(self) -> tuple[optuna.Study, str]:
        import optuna

        url = self.options.get("storage")
        storage, where = open_storage(url, self.problem.output)
        try:
            storage.get_study_id_from_name(self.study_name)
            exists = True
        except KeyError:
            exists = False
        if exists and not self.options.get("resume"):
            raise ConfigError(f"study {self.study_name!r} already exists in {where}: pass --resume to continue it, "
                              "or --study NAME to start another")
        with _quiet_optuna():
            study = optuna.create_study(storage=storage, study_name=self.study_name, direction="maximize",
                                        sampler=self.sampler(shared=url is not None), load_if_exists=True)
        wanted = self.settings()
        recorded = study.user_attrs
        if recorded.get("model_sha256") not in (None, wanted["model_sha256"]):
            raise PlanError(f"study {self.study_name!r} in {where} is of another model (sha256 "
                            f"{str(recorded['model_sha256'])[:12]}..., this model {wanted['model_sha256'][:12]}...); "
                            "use another --study or --storage")
        if "model_sha256" in recorded:
            mismatch = _settings_mismatch(recorded, wanted)
            if mismatch:
                raise ConfigError(f"study {self.study_name!r} in {where} was run with other settings "
                                  f"({'; '.join(mismatch)}); use another --study, or the study's settings")
        else:  # the sha256 last: another worker that reads it finds every other setting written
            for key, value in sorted(wanted.items(), key=lambda kv: kv[0] == "model_sha256"):
                study.set_user_attr(key, value)
        return study, where

    def _enqueue_starts(self, study: optuna.Study) -> None:
        if study.trials:
            return
        starts = []
        if self.feasible(self.cost({g: 1.0 for g in self.groups})):
            starts.append(1.0)
        r = self.uniform_ratio()
        if r is not None and r not in starts:
            starts.append(r)
        for ratio in starts:
            study.enqueue_trial({f"keep:{g}": ratio for g in self.groups}, user_attrs={"start": f"uniform {ratio:g}"})

    def objective(self, trial: optuna.trial.Trial) -> float:
        """One trial; its record goes into the storage as one user attribute (one write)."""
        rec: dict[str, Any] = {}
        try:
            return self._objective(trial, rec)
        finally:
            if rec:
                trial.set_user_attr(RECORD, rec)

    def _objective(self, trial: optuna.trial.Trial, rec: dict[str, Any]) -> float:
        import optuna
        from optuna.trial import TrialState

        study = trial.study
        alive = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
        if sum(1 for t in alive if t.number < trial.number) >= self.trials:
            study.stop()
            rec["skipped"] = "the study already has its trials"
            raise optuna.TrialPruned("the study already has its trials")
        ratios = {g: trial.suggest_float(f"keep:{g}", self.min_keep, 1.0, step=self.step) for g in self.groups}
        plan = self.plan(ratios)
        cost = float(plan.cost_after[self.cost_name])
        key = self._key(ratios)
        rec["key"] = key
        rec["worker"] = os.getpid()
        rec["kept"] = {g: len(k) for g, k in self.kept(ratios).items()}
        rec["cost"] = {k: v / plan.cost_before[k] for k, v in plan.cost_after.items() if plan.cost_before.get(k)}
        rec["cost_abs"] = cost
        feasible = self.feasible(cost)
        rec["feasible"] = feasible
        constraint = 0.0 if self.target_abs is None else cost / self.target_abs - 1.0
        rec["constraint"] = constraint
        if hasattr(trial, "set_constraint"):
            trial.set_constraint("budget", constraint)
        if not feasible:
            rec["evaluated"] = False
            return -cost / float(self.target_abs)
        # the same kept channels as a trial evaluated already, or being evaluated by a worker that
        # started it first: not evaluated again (the key is written before the check, so of two
        # workers starting the same plan at once, the one with the higher trial number yields)
        trial.set_user_attr("key", key)
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if other.number == trial.number or _attrs(other).get("key") != key:
                continue
            if other.state == TrialState.COMPLETE and _attrs(other).get("evaluated"):
                rec["duplicate_of"] = other.number
                for attr in ("score", "accuracy", "agreement", "distill_loss"):
                    rec[attr] = _attrs(other).get(attr)
                rec["evaluated"] = False
                return float(other.value)
            if other.state == TrialState.RUNNING and other.number < trial.number:
                rec["duplicate_of"] = other.number
                raise optuna.TrialPruned(f"trial {other.number} is evaluating the same plan")
        # A worker that checked before this trial's key was written may be evaluating the same
        # plan already: claim the plan, then look again; a trial that finds another claim yields.
        # Of two claims, the later one's look sees the earlier, so at most one trial evaluates a
        # plan (both may yield when they claim at once: the plan is then sampled again later).
        trial.set_user_attr("evaluating", True)
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if other.number == trial.number or _attrs(other).get("key") != key:
                continue
            if (other.state == TrialState.RUNNING and _attrs(other).get("evaluating")) or (
                    other.state == TrialState.COMPLETE and _attrs(other).get("evaluated")):
                rec["duplicate_of"] = other.number
                raise optuna.TrialPruned(f"trial {other.number} evaluates the same plan")
        assert self.evaluator is not None
        evaluation = self.evaluator.evaluate(plan)
        for attr, value in (("score", evaluation.score), ("accuracy", evaluation.accuracy),
                            ("agreement", evaluation.agreement), ("distill_loss", evaluation.distill_loss),
                            ("seconds", evaluation.seconds), ("forward_passes", evaluation.forward_passes)):
            rec[attr] = value
        rec["evaluated"] = True
        if self.lam is not None:
            return evaluation.score - self.lam * cost / self.before
        return evaluation.score

    def run(self) -> StrategyResult:
        import optuna
        from optuna.trial import TrialState

        from plugin.evaluator import CandidateEvaluator, EvaluatorConfig

        study, where = self.open_study()
        self._enqueue_starts(study)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        remaining = max(0, self.trials - done)
        logger.info("bayesian: study %r in %s, %d trial(s) done, %d to run (%s sampler, W%d, %d groups)",
                    self.study_name, where, done, remaining, self.sampler_name, self.bits, len(self.groups))
        o = self.options
        self.evaluator = CandidateEvaluator(self.problem, EvaluatorConfig(
            calib_samples=int(o["calib_samples"]), eval_samples=o.get("eval_samples"),
            bias_correction=bool(o["bias_correction"]), finetune_steps=int(o["finetune_steps"]),
            seed=self.problem.settings.seed))
        if remaining:
            self._optimize(study, remaining, done)
        trials = study.get_trials(deepcopy=True, states=(TrialState.COMPLETE,))
        history = [self._trial_record(t) for t in sorted(trials, key=lambda t: t.number)]
        best = self._best(trials)
        ratios = {g: float(best.params[f"keep:{g}"]) for g in self.groups}
        front = pareto_front(history, self.cost_name)
        metadata = {"strategy": "bayesian", "weight_bits": self.bits, "activation_bits": self.act_bits,
                    "criterion": self.criterion, "study": self.study_name, "storage": where,
                    "best_trial": best.number, "keep_ratios": ratios, "sampler": self.sampler_name}
        plan = self.evaluator.apply(self.plan(ratios, metadata=metadata))
        stats = self.evaluator.stats()
        history.append({"kind": "pareto_front", "cost_model": self.cost_name, "points": front})
        history.append({"kind": "evaluator", **stats})
        history.append({"kind": "study", "name": self.study_name, "storage": where, "sampler": self.sampler_name,
                        "completed_trials": len(trials), "best_trial": best.number,
                        "best_score": _attrs(best).get("score"),
                        "budget": self.budget.text if self.budget else None, "lambda": self.lam})
        logger.info("bayesian: best trial %d, score %.4f, %s (evaluator: %s forward passes per candidate)",
                    best.number, _attrs(best).get("score") or float("nan"),
                    self.problem.space.describe_plan(plan, self.cost_name), stats["mean_forward_passes"])
        if self.problem.output is not None:
            write_front_png(history, front, self._png_path(), self.cost_name,
                            None if self.target_abs is None else self.target_abs / self.before, best.number)
        return StrategyResult(plan, history, engine=self.evaluator.engine, epochs_used=0)

    def _png_path(self) -> str:
        out = Path(self.problem.output or "model.onnx")
        return str(out.with_suffix("") if out.suffix else out) + ".pareto.png"

    def _optimize(self, study: optuna.Study, remaining: int, done: int) -> None:
        import optuna
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        bar = tqdm(total=self.trials, initial=done, desc="bayesian trials", unit="trial",
                   disable=not self.problem.settings.progress)

        def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.state == TrialState.COMPLETE:
                bar.update(1)
                score = _attrs(trial).get("score")
                bar.set_postfix(score="-" if score is None else f"{score:.4f}",
                                cost=f"{_attrs(trial).get('cost', {}).get(self.cost_name, float('nan')):.3f}")
            complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if complete >= self.trials:
                study.stop()

        try:
            with _quiet_optuna():
                study.optimize(self.objective, n_trials=2 * remaining + 8, callbacks=[after], catch=(),
                               gc_after_trial=False)
        finally:
            bar.close()

    def _best(self, trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
        from plugin.budget import format_cost

        feasible = [t for t in trials if _attrs(t).get("feasible") and t.value is not None]
        if not feasible:
            if not trials:
                raise CostModelError(f"study {self.study_name!r} has no completed trial; run it with --trials N")
            cheapest = min(trials, key=lambda t: _attrs(t).get("cost_abs", float("inf")))
            raise CostModelError(
                f"no trial of {len(trials)} met budget {self.budget.text if self.budget else '-'}: the cheapest "
                f"reached {format_cost(self.cost_name, _attrs(cheapest).get('cost_abs', float('nan')))}; "
                "run more trials (--resume --trials N) or loosen --target")
        return max(feasible, key=lambda t: (t.value, -_attrs(t).get("cost_abs", 0.0), -t.number))

    def _trial_record(self, t: optuna.trial.FrozenTrial) -> dict[str, Any]:
        a = _attrs(t)
        record = {"kind": "trial", "trial": t.number, "params": dict(t.params), "kept": a.get("kept"),
                  "score": a.get("score"), "accuracy": a.get("accuracy"), "agreement": a.get("agreement"),
                  "distill_loss": a.get("distill_loss"), "cost": a.get("cost"), "feasible": a.get("feasible"),
                  "value": t.value, "evaluated": a.get("evaluated"), "worker": a.get("worker")}
        for extra in ("duplicate_of", "start", "forward_passes"):
            if extra in a:
                record[extra] = a[extra]
        return record


# ----------------------------------------------------------------------------- Pareto front and plot


def pareto_front(history: list[Mapping[str, Any]], cost_model: str | None = None) -> list[dict[str, Any]]:
    """The non-dominated trials (higher score, lower cost) among the scored ones, by cost."""
    points = []
    for h in history:
        if h.get("kind") != "trial" or h.get("score") is None or not h.get("cost"):
            continue
        cost = h["cost"].get(cost_model or "size")
        if cost is None:
            continue
        points.append({"trial": h["trial"], "score": float(h["score"]), "cost": float(cost)})
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["cost"], -p["score"])):
        if not front or p["score"] > front[-1]["score"]:
            front.append(p)
    return front


def write_front_png(history: list[Mapping[str, Any]], front: list[Mapping[str, Any]], path: str, cost_model: str,
                    budget: float | None, best: int) -> None:
    """Scatter of the scored trials and their front; written atomically (tmp file, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scored = [h for h in history if h.get("kind") == "trial" and h.get("score") is not None and h.get("cost")]
    ax.scatter([h["cost"].get(cost_model, float("nan")) for h in scored], [h["score"] for h in scored],
               s=14, alpha=0.6, label="trials")
    ax.plot([p["cost"] for p in front], [p["score"] for p in front], "-o", color="C3", ms=4, label="Pareto front")
    chosen = [h for h in scored if h["trial"] == best]
    if chosen:
        ax.scatter([chosen[0]["cost"].get(cost_model)], [chosen[0]["score"]], marker="*", s=160, color="C2",
                   label=f"chosen (trial {best})", zorder=3)
    if budget is not None:
        ax.axvline(budget, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel(f"{cost_model} / all-8-bit model")
    ax.set_ylabel("held-out score")
    ax.set_title("bayesian: trials")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write %s: %s", path, exc)
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["BayesianStrategy", "CLI_FLAGS", "open_storage", "pareto_front", "redact", "study_path"]
