"""``--strategy rl``: a reinforcement-learning agent chooses, per weight layer, the pruning
granularity (coarse: whole channels of the layer's channel group; fine: individual weights), the
pruning ratio, and the weight and activation bit-widths, minimising energy under an accuracy-loss
constraint, without retraining (after Balaskas et al. 2023, arXiv 2312.15322; the agent follows
the public AMC and HAQ designs, whose details are in /work/shared/DESIGN.md).

Environment (:class:`CompressionEnv`, gymnasium): one episode walks the weight layers in graph
order (``space.layers``). At layer ``i`` the action ``(ratio, w, a, g)`` in ``[0, 1]^4`` sets

* the granularity: fine-grained when ``g >= 0.5`` (or when the layer decides no prunable group:
  coupled later layers, unprunable groups), where the space allows it
  (:meth:`SearchSpace.supports_sparsity`); ``-S granularity=coarse|fine`` restricts the choice,
* coarse: the keep ratio ``0.2 + 0.8 * ratio`` (AMC's range; ``-S min_keep``) of the layer's output
  channel group, when it is prunable and no earlier layer of the same group (coupled layers: a
  residual Add) has decided it already; the channels kept are the best by the integer-domain L1
  criterion of :func:`plugin.evaluator.channel_scores`,
* fine: the layer's sparsity ``max_sparsity * (1 - ratio)`` (``-S max_sparsity``, default 0.9;
  the group keeps all its channels): in every kept channel the smallest-|w| weights are zero, by
  the plan's rule (:class:`plugin.plan.LayerPlan`), exported as exact integer zeros,
* the layer's weight width: HAQ's rounding of a continuous action onto the exportable widths of
  ``--weight-bits`` (sorted, ``w`` in ``[0, 1]`` picks ``widths[min(n - 1, floor(w * n))]``),
* the width of the activation site feeding the layer (the first layer reading a site decides it).

The *action wall* (AMC): after each action the most compressed reachable completion of the
episode (every later group-deciding layer at the lowest keep ratio, every other later layer at
``max_sparsity`` where allowed, every later layer and site at its lowest width) must still meet
``--target`` on the target's cost model; if it does not, the action is lowered (keep ratio in
steps of one channel, sparsity in steps of 0.05, a granularity switch towards the completion's,
then the weight width, then the activation width; see ``apply_action``) until it does, so every
episode's plan is within the budget. Without ``--target`` there is no wall.

State (AMC-like, every feature min-max normalised to ``[0, 1]``): layer index, kind (conv 0,
depthwise 0.5, linear 1), c_in, c_out, kernel size, #weights, cost reduced so far (the decided
layers' 8-bit cost minus their cost now, over the whole 8-bit model's), remaining cost (the
undecided layers' 8-bit cost over the whole), the previous action (4 numbers, as taken).

Reward, at the episode end only (AMC; 0 on the other steps, discount 1): the plan is scored by
the shared candidate evaluator (:mod:`plugin.evaluator`: clips recalibrated on the candidate, bias
correction, held-out accuracy with labels, agreement with the original without; no training), and

    reward = (1 - E / E_8bit) + score_weight * score                       if loss <= accuracy_loss
    reward = score_weight * score - penalty * min(loss - accuracy_loss, 10)  otherwise

with ``E`` the energy of ``-S energy`` (default ``horowitz_energy``, uJ per sample: the zero-skipping
accelerator model, the one that rewards fine-grained zeros; ``mpic_energy`` skips no zero, so
under it fine-grained pruning earns nothing), ``loss`` the
accuracy loss in points against the FP32 original on the same held-out samples (100 x (1 -
agreement) without labels) and ``accuracy_loss`` the constraint (default 1.7 points): the energy
saved counts only within the constraint, so every feasible plan earns more than every infeasible
one, and beyond it the penalty (``-S penalty`` per point, capped at 10 points) points the agent
back to lower losses. (A penalty added to the saving, tried first, let plans 3 points over the
constraint out-earn feasible ones.)

Agent: stable-baselines3 DDPG (``-S agent=td3`` for TD3), MlpPolicy ``-S hidden`` x 2 (300-300 as
AMC/HAQ), learning rate 1e-3 (SB3 takes one rate for actor and critic; AMC used 1e-4 / 1e-3), tau
0.01, batch 64, discount 1, one gradient step per environment step after each episode, ``-S warmup`` episodes of
uniformly random actions, then Gaussian exploration noise of sigma ``-S noise`` (0.5 in the
[-1, 1] scaled action space) decaying by ``-S noise_decay`` per episode. ``-S episodes`` episodes
in total (``-S gradient_steps``: agent updates per episode; more did not help on digits: 24 instead of
6 gave 0.82 of the 8-bit energy instead of 0.73, 300 episodes, one seed). The best *feasible* plan (loss within the constraint) of lowest energy is kept (ties: the
higher score); when no episode is feasible the one with the smallest loss is returned, with one
line of warning. The search trains nothing; the shared QAT (``--epochs`` + ``--finetune-epochs``)
and the export follow, starting from the chosen plan applied by the evaluator.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from graph_passes.errors import ConfigError, CostModelError, PlanError
from plugin.strategies.base import StrategyOption, StrategyResult
from plugin.strategies.problem import Problem

if TYPE_CHECKING:
    from plugin.evaluator import CandidateEvaluator
    from plugin.plan import CompressionPlan
    from plugin.space import SearchSpace

logger = logging.getLogger(__name__)

AGENTS = ("ddpg", "td3")
GRANULARITIES = ("both", "coarse", "fine")
#: the action: keep ratio or sparsity, weight width, activation width, granularity (>= 0.5: fine)
ACTION_DIM = 4
_KINDS = {"conv": 0.0, "depthwise": 0.5, "linear": 1.0}
#: observation: index, kind, c_in, c_out, k, #weights, reduced, remaining, previous action (ACTION_DIM)
OBS_DIM = 8 + ACTION_DIM
#: the penalty stops growing this many points over the constraint (keeps the critic's targets bounded)
PENALTY_CAP_POINTS = 10.0


class RLStrategy:
    name: ClassVar[str] = "rl"
    summary: ClassVar[str] = ("a DDPG agent (stable-baselines3) chooses per layer the pruning granularity (channels or "
                              "weights), its ratio and the weight and activation widths, minimising -S energy "
                              "(horowitz_energy) at <= -S accuracy_loss points "
                              "lost, each episode recalibrated and scored without retraining; --target (optional) "
                              "is kept by an action wall")
    # the budget is optional for this strategy: it follows --target (or -S target) when given, and
    # a run without one gets no default budget (compress gives other steerable strategies <cost>=35%)
    steerable: ClassVar[bool] = True
    default_target: ClassVar[bool] = False
    options: ClassVar[Mapping[str, StrategyOption]] = {
        "episodes": StrategyOption("episodes", int, 200, "episodes in total (warm-up included)"),
        "warmup": StrategyOption("warmup", int, None, "episodes of random actions first [default: episodes // 4]"),
        "accuracy_loss": StrategyOption("accuracy_loss", float, 1.7, "the constraint: accuracy points lost at most"),
        "penalty": StrategyOption("penalty", float, 0.2, "reward lost per point of accuracy loss over the constraint"),
        "score_weight": StrategyOption("score_weight", float, 0.1, "weight of the held-out score in the reward"),
        "energy": StrategyOption("energy", str, "horowitz_energy", "the cost model to minimise (horowitz_energy "
                                                                  "counts skipped zero weights; mpic_energy does not)"),
        "granularity": StrategyOption("granularity", str, "both", "pruning granularity the agent may choose per layer: "
                                                       "both, coarse (channels) or fine (weights)"),
        "max_sparsity": StrategyOption("max_sparsity", float, 0.9, "highest fine-grained sparsity of a layer"),
        "target": StrategyOption("target", str, None, "a budget kept by the action wall (what --target gives), e.g. "
                                            "size=30%"),
        "min_keep": StrategyOption("min_keep", float, 0.2, "lowest keep ratio of a group"),
        "agent": StrategyOption("agent", str, "ddpg", "ddpg or td3"),
        "hidden": StrategyOption("hidden", int, 300, "units of each of the 2 hidden layers of actor and critic"),
        "noise": StrategyOption("noise", float, 0.5, "initial exploration noise (sigma, scaled action space)"),
        "gradient_steps": StrategyOption("gradient_steps", int, 0, "agent updates after each episode [default 0: one per "
                                                         "layer stepped]"),
        "noise_decay": StrategyOption("noise_decay", float, 0.99, "exploration noise factor per episode"),
        "calib_samples": StrategyOption("calib_samples", int, 256, "training samples per candidate's recalibration"),
        "eval_samples": StrategyOption("eval_samples", int, None, "held-out samples scored per episode [default: all]"),
        "bias_correction": StrategyOption("bias_correction", bool, True, "correct biases after pruning/quantization"),
    }

    def search(self, problem: Problem, options: Mapping[str, Any]) -> StrategyResult:
        return _Search(problem, dict(options)).run()


# ----------------------------------------------------------------------------- the decision space


@dataclass
class Decision:
    """The choices of one episode so far."""

    keep: dict[str, int] = field(default_factory=dict)  # group -> channels kept
    layer_bits: dict[str, int] = field(default_factory=dict)
    site_bits: dict[str, int] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)  # layer -> fine-grained sparsity (absent: dense)

    def copy(self) -> Decision:
        return Decision(dict(self.keep), dict(self.layer_bits), dict(self.site_bits), dict(self.sparsity))


class Walk:
    """The layers in graph order with what each decides, and the plans of (partial) decisions."""

    def __init__(self, space: SearchSpace, scores: Mapping[str, np.ndarray], min_keep: float,
                 granularity: str = "both", max_sparsity: float = 0.9, sparsity_step: float = 0.05) -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"-S granularity={granularity}: use one of {', '.join(GRANULARITIES)}")
        if not 0 < max_sparsity <= 0.99:
            raise ConfigError(f"-S max_sparsity={max_sparsity}: give a fraction in (0, 0.99], e.g. 0.9")
        self.space = space
        self.scores = scores
        self.min_keep = min_keep
        self.granularity = granularity
        self.max_sparsity = float(max_sparsity)
        self.sparsity_step = float(sparsity_step)
        self.names = list(space.layers)
        self.widths = sorted(space.precisions.weight_widths)
        self.act_widths = sorted(space.precisions.activations)
        prunable = set(space.prunable_groups)
        self.group_of: dict[str, str | None] = {}
        self.site_of: dict[str, str | None] = {}
        seen_groups: set[str] = set()
        seen_sites: set[str] = set()
        for name, info in space.layers.items():
            columns = set(info.columns)
            groups = [u.group_id for u in space.map.units.values()
                      if u.group_id is not None and u.alpha_index == info.alpha_index
                      and columns & set(range(u.offset, u.offset + u.size))]
            group = groups[0] if len(groups) == 1 and groups[0] in prunable and groups[0] not in seen_groups else None
            self.group_of[name] = group
            if group is not None:
                seen_groups.add(group)
            site = info.layer.input if info.layer.input in space.sites and info.layer.input not in seen_sites else None
            self.site_of[name] = site
            if site is not None:
                seen_sites.add(site)
        #: layers that may be pruned fine-grained (the space says which layouts allow it)
        self.fine_ok = {name: granularity != "coarse" and space.supports_sparsity(name) for name in self.names}

    def keep_count(self, group: str, ratio: float) -> int:
        size = self.space.group_size(group)
        return max(1, min(size, int(math.ceil(ratio * size - 1e-9))))

    def lowest_keep(self, group: str) -> int:
        return self.keep_count(group, self.min_keep)

    def width(self, action: float) -> int:
        return self.widths[min(len(self.widths) - 1, int(math.floor(float(action) * len(self.widths))))]

    def act_width(self, action: float) -> int:
        return self.act_widths[min(len(self.act_widths) - 1, int(math.floor(float(action) * len(self.act_widths))))]

    def coarse_ok(self, name: str) -> bool:
        """Whether the layer decides a channel group that coarse pruning may cut."""
        return self.group_of[name] is not None and self.granularity != "fine"

    def completed(self, decision: Decision, step: int) -> Decision:
        """``decision`` with every layer from ``step`` on at its most compressed *reachable* choice
        (the action wall lowers every action towards it): a layer that decides a group at the
        lowest keep ratio (coarse; unless ``granularity`` is fine), any other layer that may be
        sparse at ``max_sparsity`` (fine), every width at its lowest."""
        out = decision.copy()
        for name in self.names[step:]:
            group, site = self.group_of[name], self.site_of[name]
            if self.coarse_ok(name):
                if group not in out.keep:
                    out.keep[group] = self.lowest_keep(group)
            elif self.fine_ok[name] and name not in out.layer_bits:
                out.sparsity[name] = self.max_sparsity
            out.layer_bits.setdefault(name, self.widths[0])
            if site is not None:
                out.site_bits.setdefault(site, self.act_widths[0])
        return out

    def plan(self, decision: Decision, cost_models: list[str] | None = None,
             metadata: Mapping[str, Any] | None = None) -> CompressionPlan:
        from plugin.importance import keep_indices

        kept = {g: keep_indices(self.scores[g], n / self.space.group_size(g)) for g, n in decision.keep.items()}
        for g, n in decision.keep.items():  # keep_indices rounds the ratio: pin the count exactly
            if len(kept[g]) != n:
                order = np.argsort(-np.asarray(self.scores[g]), kind="stable")
                kept[g] = sorted(int(c) for c in order[:n])
        return self.space.plan(kept=kept, layer_bits=decision.layer_bits, site_bits=decision.site_bits,
                               sparsity={n: v for n, v in decision.sparsity.items() if v},
                               cost_models=cost_models, metadata=metadata)


# ----------------------------------------------------------------------------- the environment


def _make_env_class() -> type:
    import gymnasium as gym
    from gymnasium import spaces

    class CompressionEnv(gym.Env):
        """See the module docstring. ``evaluate(decision) -> (reward, record)`` scores a finished
        episode; ``wall`` (cost model, absolute budget) or None."""

        metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

        def __init__(self, walk: Walk, evaluate: Any, wall: tuple[str, float] | None, energy: str) -> None:
            super().__init__()
            self.walk = walk
            self.evaluate_fn = evaluate
            self.wall = wall
            self.energy = energy
            self.action_space = spaces.Box(0.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
            self.observation_space = spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
            space = walk.space
            specs = [space.layers[n].spec for n in walk.names]
            raw = np.array([[i, _KINDS.get(s.kind, 0.0), s.c_in, s.c_out, s.kernel[0] * s.kernel[1],
                             s.c_out * (s.c_in // max(s.groups, 1)) * s.kernel[0] * s.kernel[1]]
                            for i, s in enumerate(specs)], dtype=np.float64)
            lo, hi = raw.min(axis=0), raw.max(axis=0)
            self.static = (raw - lo) / np.where(hi > lo, hi - lo, 1.0)
            self.static[:, 1] = raw[:, 1]  # the kind is already in [0, 1]
            baseline = space.baseline_plan()
            model = _cost_model(energy)
            pairs = space.plan_pairs(baseline)
            self.layer_before = np.array([float(model(spec, inputs)) for spec, inputs in pairs])
            self.total_before = max(float(self.layer_before.sum()), 1e-30)
            self.episode_records: list[dict[str, Any]] = []
            self.wall_hits = 0
            self._reset_state()

        def _reset_state(self) -> None:
            self.step_index = 0
            self.decision = Decision()
            self.previous = np.zeros(ACTION_DIM)
            self.reduced = 0.0
            self.actions: list[list[float]] = []

        def observation(self) -> np.ndarray:
            i = min(self.step_index, len(self.walk.names) - 1)
            remaining = float(self.layer_before[self.step_index:].sum()) / self.total_before
            obs = np.concatenate([self.static[i], [min(max(self.reduced, 0.0), 1.0), remaining], self.previous])
            return obs.astype(np.float32)

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
            super().reset(seed=seed)
            self._reset_state()
            return self.observation(), {}

        def feasible(self, decision: Decision, step: int) -> bool:
            if self.wall is None:
                return True
            name, budget = self.wall
            plan = self.walk.plan(self.walk.completed(decision, step), cost_models=[name])
            return plan.cost_after[name] <= budget * (1 + 1e-9)

        def apply_action(self, action: np.ndarray) -> list[float]:
            """Decide the current layer (action wall applied); the action actually taken.

            ``action = (ratio, w, a, granularity)``: granularity >= 0.5 picks fine-grained (where
            the layer allows it; ``-S granularity`` may force one), then ``ratio`` sets the
            sparsity ``max_sparsity * (1 - ratio)``; otherwise coarse, and ``ratio`` the keep ratio
            of the group the layer decides (a layer deciding none stays dense). High actions
            compress less. The wall lowers, in order: the keep ratio one channel at a time, the
            sparsity up by ``sparsity_step``, a fine layer deciding a group to coarse (full keep,
            then down), a dense layer deciding no group to fine, the weight width, the activation
            width; that ends at :meth:`Walk.completed`'s choice, which the wall has checked."""
            walk = self.walk
            name = walk.names[self.step_index]
            group, site = walk.group_of[name], walk.site_of[name]
            a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, 1.0)
            if a.size < ACTION_DIM:  # a 3-number action (no granularity): coarse
                a = np.concatenate([a, np.zeros(ACTION_DIM - a.size)])
            fine = walk.fine_ok[name] and (a[3] >= 0.5 or not walk.coarse_ok(name))
            if walk.granularity == "fine" and not walk.fine_ok[name]:
                fine = False
            size = walk.space.group_size(group) if group else 1
            keep = (walk.keep_count(group, walk.min_keep + (1 - walk.min_keep) * a[0]) if walk.coarse_ok(name) and not fine
                    else size if group else None)
            sparsity = walk.max_sparsity * (1.0 - a[0]) if fine else 0.0
            w_index = walk.widths.index(walk.width(a[1]))
            a_index = walk.act_widths.index(walk.act_width(a[2])) if site else None

            def trial() -> Decision:
                d = self.decision.copy()
                if group is not None:
                    d.keep[group] = keep
                d.layer_bits[name] = walk.widths[w_index]
                if sparsity > 0:
                    d.sparsity[name] = round(float(sparsity), 6)
                else:
                    d.sparsity.pop(name, None)
                if site is not None:
                    d.site_bits[site] = walk.act_widths[a_index]
                return d

            decided = trial()
            walled = False
            while not self.feasible(decided, self.step_index + 1):
                walled = True
                if not fine and walk.coarse_ok(name) and keep > walk.lowest_keep(group):
                    keep -= 1
                elif fine and sparsity < walk.max_sparsity - 1e-9:
                    sparsity = min(walk.max_sparsity, sparsity + walk.sparsity_step)
                elif fine and walk.coarse_ok(name):
                    fine, sparsity, keep = False, 0.0, size
                elif not fine and not walk.coarse_ok(name) and walk.fine_ok[name]:
                    fine, sparsity = True, 0.0
                elif w_index > 0:
                    w_index -= 1
                elif a_index is not None and a_index > 0:
                    a_index -= 1
                else:  # cannot happen once the start was checked reachable: the cheapest completion
                    break
                decided = trial()
            self.wall_hits += int(walled)
            self.decision = decided
            if fine:
                ratio = 1.0 - sparsity / walk.max_sparsity
            elif group is not None and walk.coarse_ok(name) and walk.min_keep < 1:
                ratio = (keep / size - walk.min_keep) / (1 - walk.min_keep)
            else:
                ratio = 1.0
            taken = [
                ratio,
                (w_index + 0.5) / len(walk.widths),
                (a_index + 0.5) / len(walk.act_widths) if a_index is not None else 1.0,
                0.75 if fine else 0.25,
            ]
            return [float(min(max(t, 0.0), 1.0)) for t in taken]

        def step(self, action: np.ndarray):
            taken = self.apply_action(action)
            self.actions.append(taken)
            self.previous = np.array(taken)
            self.step_index += 1
            done = self.step_index >= len(self.walk.names)
            # cost reduced so far, on the decided layers
            plan = self.walk.plan(self.walk.completed(self.decision, len(self.walk.names)), cost_models=[self.energy])
            model = _cost_model(self.energy)
            now = np.array([float(model(spec, inputs)) for spec, inputs in self.walk.space.plan_pairs(plan)])
            k = self.step_index
            self.reduced = float((self.layer_before[:k] - now[:k]).sum()) / self.total_before
            if not done:
                return self.observation(), 0.0, False, False, {}
            reward, record = self.evaluate_fn(self.decision)
            record["actions"] = self.actions
            self.episode_records.append(record)
            return self.observation(), float(reward), True, False, {"record": record}

    return CompressionEnv


def make_env(walk: Walk, evaluate: Any, wall: tuple[str, float] | None = None, energy: str = "mpic_energy") -> Any:
    """A :class:`CompressionEnv` over ``walk`` (gymnasium is imported here, not at module load)."""
    return _make_env_class()(walk, evaluate, wall, energy)


def _cost_model(name: str) -> Any:
    from cost_models import get_cost_model

    return get_cost_model(name)


def _make_noise(dim: int, sigma: float, decay: float, seed: int) -> Any:
    from stable_baselines3.common.noise import ActionNoise

    class DecayingNormalNoise(ActionNoise):
        """Gaussian exploration noise whose sigma shrinks by ``decay`` at every episode end (SB3 calls
        ``reset`` when an episode is done)."""

        def __init__(self) -> None:
            super().__init__()
            self.sigma = float(sigma)
            self.rng = np.random.default_rng(seed)

        def __call__(self) -> np.ndarray:
            return self.rng.normal(0.0, self.sigma, size=dim).astype(np.float32)

        def reset(self) -> None:
            self.sigma *= decay

        def __repr__(self) -> str:
            return f"DecayingNormalNoise(sigma={self.sigma:.4f}, decay={decay})"

    return DecayingNormalNoise()


# ----------------------------------------------------------------------------- the reward


def episode_reward(score: float, reference: float, energy: float, energy_before: float, constraint: float,
                   penalty: float, score_weight: float) -> tuple[float, float, bool]:
    """(reward, accuracy loss in points, within the constraint) of a finished episode's plan:
    ``(1 - energy / energy_before) + score_weight * score`` within the constraint, else
    ``score_weight * score - penalty * min(loss - constraint, PENALTY_CAP_POINTS)``, with
    ``loss = 100 * (reference - score)`` (see the module docstring)."""
    loss = 100.0 * (reference - score)
    excess = max(0.0, loss - constraint)
    if excess <= 1e-9:
        saving = 1.0 - energy / energy_before if energy_before > 0 else 0.0
        return saving + score_weight * score, loss, True
    return score_weight * score - penalty * min(excess, PENALTY_CAP_POINTS), loss, False


# ----------------------------------------------------------------------------- the search


class _Search:
    def __init__(self, problem: Problem, options: dict[str, Any]) -> None:
        self.problem = problem
        self.options = options
        s = problem.settings
        space = problem.space
        self.episodes = int(options["episodes"])
        if self.episodes < 1:
            raise ConfigError(f"-S episodes={self.episodes}: give at least 1")
        warmup = options.get("warmup")
        self.warmup = max(1, self.episodes // 4) if warmup is None else int(warmup)
        if not 0 <= self.warmup <= self.episodes:
            raise ConfigError(f"-S warmup={self.warmup}: give 0..episodes ({self.episodes})")
        self.constraint = float(options["accuracy_loss"])
        if not (math.isfinite(self.constraint) and 0 <= self.constraint <= 100):
            raise ConfigError(f"-S accuracy_loss={options['accuracy_loss']}: give points in [0, 100], e.g. 1.7")
        self.penalty, self.score_weight = float(options["penalty"]), float(options["score_weight"])
        if not (self.penalty >= 0 and self.score_weight >= 0):
            raise ConfigError("-S penalty and -S score_weight must be >= 0")
        self.min_keep = float(options["min_keep"])
        if not 0 < self.min_keep <= 1:
            raise ConfigError(f"-S min_keep={self.min_keep}: give a ratio in (0, 1], e.g. 0.2")
        self.agent = str(options["agent"]).lower()
        if self.agent not in AGENTS:
            raise ConfigError(f"-S agent={options['agent']}: use one of {', '.join(AGENTS)}")
        self.hidden = int(options["hidden"])
        if not 1 <= self.hidden <= 4096:
            raise ConfigError(f"-S hidden={self.hidden}: give 1..4096 units")
        self.noise, self.noise_decay = float(options["noise"]), float(options["noise_decay"])
        self.gradient_steps = int(options["gradient_steps"])
        if self.gradient_steps < 0:
            raise ConfigError(f"-S gradient_steps={self.gradient_steps}: give >= 0 (0: one per layer stepped)")
        if not (self.noise >= 0 and 0 < self.noise_decay <= 1):
            raise ConfigError("-S noise must be >= 0 and -S noise_decay in (0, 1]")
        from cost_models import get_cost_model

        self.energy = str(options["energy"])
        get_cost_model(self.energy)  # unknown: CostModelError listing the known ones
        if not space.layers:
            raise PlanError("--strategy rl: this model has no weight layer to compress")
        if not s.precisions.prunes:
            logger.warning("rl: --weight-bits has no 0, so nothing is pruned; the agent chooses bit-widths only")
        from plugin.evaluator import channel_scores

        self.scores = channel_scores(space, "ql1", max(space.precisions.weight_widths))
        self.walk = Walk(space, self.scores, self.min_keep, str(options["granularity"]).lower(),
                         float(options["max_sparsity"]))
        self.wall: tuple[str, float] | None = None
        self.budget_text = options.get("target") or s.target
        if self.budget_text:
            from plugin.targets import parse_target

            budget = parse_target(self.budget_text)
            self.wall = (budget.cost_model, budget.absolute(space.cost_before(budget.cost_model)))
            self._check_reachable()
        self.energy_before = space.cost_before(self.energy)
        self.evaluator: CandidateEvaluator | None = None
        self.reference: float = 1.0
        self.records: list[dict[str, Any]] = []
        self.decisions: list[Decision] = []
        self.bar: Any = None

    def _check_reachable(self) -> None:
        from plugin.budget import format_cost

        assert self.wall is not None
        name, budget = self.wall
        lowest = self.walk.plan(self.walk.completed(Decision(), 0), cost_models=[name]).cost_after[name]
        if lowest > budget * (1 + 1e-9):
            raise CostModelError(
                f"budget {self.budget_text!r} ({format_cost(name, budget)}) cannot be met: the cheapest plan "
                f"(keep {self.min_keep:g} of every prunable group, the lowest widths) costs {format_cost(name, lowest)}; "
                "loosen --target, lower -S min_keep or allow lower --weight-bits/--act-bits")

    # ------------------------------------------------------------------ the reward

    def reward(self, score: float, energy: float) -> tuple[float, float, bool]:
        return episode_reward(score, self.reference, energy, self.energy_before, self.constraint, self.penalty,
                              self.score_weight)

    def evaluate(self, decision: Decision) -> tuple[float, dict[str, Any]]:
        assert self.evaluator is not None
        plan = self.walk.plan(decision)
        evaluation = self.evaluator.evaluate(plan)
        energy = float(plan.cost_after[self.energy])
        reward, loss, feasible = self.reward(evaluation.score, energy)
        n = len(self.records)
        record = {"kind": "episode", "episode": n, "warmup": n < self.warmup, "reward": round(reward, 6),
                  "score": evaluation.score, "accuracy": evaluation.accuracy, "agreement": evaluation.agreement,
                  "accuracy_loss_points": round(loss, 4), "feasible": feasible,
                  "energy": energy, "energy_ratio": energy / self.energy_before if self.energy_before else None,
                  "cost": {k: v / plan.cost_before[k] for k, v in plan.cost_after.items() if plan.cost_before.get(k)},
                  "kept": dict(decision.keep), "layer_bits": dict(decision.layer_bits),
                  "sparsity": dict(decision.sparsity),
                  "site_bits": dict(decision.site_bits), "seconds": round(evaluation.seconds, 4)}
        self.records.append(record)
        self.decisions.append(decision)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(energy=f"{record['energy_ratio']:.3f}", loss=f"{loss:.2f}", reward=f"{reward:.3f}")
        return reward, record

    def _reference_score(self) -> float:
        """The FP32 original's score on the evaluator's held-out samples (accuracy with labels; 1.0
        = full agreement with itself otherwise)."""
        import torch

        assert self.evaluator is not None
        held = self.evaluator.held
        if held.labels is None:
            return 1.0
        engine = self.evaluator.engine
        device = self.evaluator.device
        correct = 0
        with torch.no_grad():
            for start in range(0, len(held), 256):
                inputs = [torch.as_tensor(np.asarray(held.arrays[n][start:start + 256])).to(device)
                          for n in engine.input_names]
                out = engine.teacher_outputs(*inputs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                if out.ndim != 2:
                    return 1.0
                correct += int((out.argmax(dim=1).cpu().numpy() == held.labels[start:start + 256]).sum())
        return correct / max(len(held), 1)

    # ------------------------------------------------------------------ run

    def run(self) -> StrategyResult:
        import torch
        from tqdm.auto import tqdm

        from plugin.evaluator import CandidateEvaluator, EvaluatorConfig

        s = self.problem.settings
        o = self.options
        self.evaluator = CandidateEvaluator(self.problem, EvaluatorConfig(
            calib_samples=int(o["calib_samples"]), eval_samples=o.get("eval_samples"),
            bias_correction=bool(o["bias_correction"]), seed=s.seed))
        self.reference = self._reference_score()
        self.records, self.decisions = [], []
        env = make_env(self.walk, self.evaluate, self.wall, self.energy)
        steps = len(self.walk.names)
        start = time.perf_counter()
        self.bar = tqdm(total=self.episodes, desc="rl episodes", unit="episode", disable=not s.progress)
        import random

        rng_state = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # SB3 seeds them globally
        try:
            model = self._agent(env)
            model.learn(total_timesteps=self.episodes * steps, progress_bar=False)
        finally:
            self.bar.close()
            self.bar = None
            torch.set_rng_state(rng_state[0])
            np.random.set_state(rng_state[1])
            random.setstate(rng_state[2])
        seconds = time.perf_counter() - start
        return self._result(env, seconds)

    def _agent(self, env: Any) -> Any:
        from stable_baselines3 import DDPG, TD3

        cls = DDPG if self.agent == "ddpg" else TD3
        steps = len(self.walk.names)
        noise = _make_noise(ACTION_DIM, self.noise, self.noise_decay, self.problem.settings.seed) if self.noise > 0 else None
        return cls("MlpPolicy", env, learning_rate=1e-3, buffer_size=max(1000, self.episodes * steps * 2),
                   learning_starts=self.warmup * steps, batch_size=64, tau=0.01, gamma=1.0,
                   train_freq=(1, "episode"), gradient_steps=self.gradient_steps or -1, action_noise=noise,
                   policy_kwargs={"net_arch": {"pi": [self.hidden, self.hidden], "qf": [self.hidden, self.hidden]}},
                   seed=self.problem.settings.seed, device="cpu", verbose=0)

    def _result(self, env: Any, seconds: float) -> StrategyResult:
        assert self.evaluator is not None
        records = self.records
        if not records:
            raise PlanError("--strategy rl ran no episode; give -S episodes >= 1")
        feasible = [i for i, r in enumerate(records) if r["feasible"]]
        if feasible:
            best = min(feasible, key=lambda i: (records[i]["energy"], -records[i]["score"], i))
        else:
            best = min(range(len(records)), key=lambda i: (records[i]["accuracy_loss_points"], records[i]["energy"], i))
            logger.warning("rl: no episode of %d kept the accuracy loss within %.2f points; returning the one with the "
                           "smallest loss (%.2f points, energy %.3f of 8-bit); raise -S episodes or -S accuracy_loss",
                           len(records), self.constraint, records[best]["accuracy_loss_points"],
                           records[best]["energy_ratio"])
        chosen = records[best]
        metadata = {"strategy": "rl", "agent": self.agent, "episode": best, "energy_model": self.energy,
                    "granularity": self.walk.granularity,
                    "accuracy_loss_constraint": self.constraint, "feasible": chosen["feasible"],
                    "budget": self.budget_text}
        plan = self.evaluator.apply(self.walk.plan(self.decisions[best], metadata=metadata))
        history = list(records)
        summary = {"kind": "rl", "episodes": len(records), "warmup": self.warmup, "agent": self.agent,
                   "best_episode": best, "feasible_episodes": len(feasible), "constraint_met": bool(feasible),
                   "accuracy_loss_constraint": self.constraint, "reference_score": self.reference,
                   "energy_model": self.energy, "energy_before": self.energy_before,
                   "energy_after_search": chosen["energy"], "energy_ratio_after_search": chosen["energy_ratio"],
                   "accuracy_loss_points_before_qat": chosen["accuracy_loss_points"],
                   "score_before_qat": chosen["score"], "budget": self.budget_text,
                   "wall_hits": env.wall_hits, "search_seconds": round(seconds, 2)}
        history.append(summary)
        history.append({"kind": "evaluator", **self.evaluator.stats()})
        logger.info("rl: episode %d of %d chosen: %s %.3f of 8-bit, %.2f points lost before QAT (%s)",
                    best, len(records), self.energy, chosen["energy_ratio"], chosen["accuracy_loss_points"],
                    "within the constraint" if chosen["feasible"] else "over the constraint")
        return StrategyResult(plan, history, engine=self.evaluator.engine, epochs_used=0)


__all__ = ["AGENTS", "Decision", "RLStrategy", "Walk", "episode_reward", "make_env"]
