"""DynaMO dynamic rollout allocation: rollouts in proportion to each prompt's outcome variance.

Paper: Fang et al., "How to Allocate, How to Learn? Dynamic Rollout Allocation and Advantage
Modulation for Policy Optimization" (arXiv 2602.19208, Findings of ACL 2026); code
``GithubX-F/DynaMO-RL`` (``verl/utils/dataset/rl_dataset.py::update_rank``,
``recipe/dynamo/dynamo_ray_trainer.py::get_rollout_n_per_prompt``), reference §5a. The token-level
advantage modulation of the same paper is a separate signal callback.
"""

from __future__ import annotations

from typing import Any

from components.errors import ConfigError
from components.samplers.allocation import AllocationSampler, Plan, by_uid, water_fill
from components.samplers.base import SamplingContext
from components.types import Prompt, Rollout

POSITIVES = ("reward_gt_0", "passed")


class DynaMOSampler(AllocationSampler):
    """DynaMO allocation: water-fill ``n_i ∝ P_i`` into ``[n_min, n_max]`` from cumulative history.

    Per prompt (stable uid) the sampler keeps the cumulative count of rollouts ``G_i`` and positives
    ``k_i`` (no decay). The priority is the unbiased Bernoulli variance of that history,
    ``P_i = k_i (G_i - k_i) / (G_i (G_i - 1))``, as in ``update_rank``:

      - ``G_i < initial_budget``: exploring; gets ``initial_budget - G_i`` (at least ``n_min``) and no
        share of the water-filling;
      - ``acc_i = k_i / G_i >= mastery_threshold`` (0.85): priority ``min_priority`` (0.01);
      - otherwise ``max(P_i + (1 - acc_i) 1e-6, min_priority)`` (the tie-breaker favours harder
        prompts); never-solved prompts (P = 0) sit at ``min_priority``.

    The weight is ``P_i`` itself (a variance), as in the code, not ``sqrt(P_i)`` as in the README's
    ``n ∝ σ``. Counts come from :func:`~components.samplers.allocation.water_fill` (reference §5a steps
    1-6) and sum exactly to ``rollouts_per_prompt x B``. The engine returns rollouts grouped per
    prompt, so the released trainer's row-misalignment (reference §5f) cannot happen here.

    Defaults: the released script uses 16 per prompt on average in ``[8, 24]``; scaled to an average
    of 8 that is ``[4, 12]``; ``initial_budget`` 4; ``mastery_threshold`` 0.85; ``min_priority`` 0.01;
    a positive is ``reward > 0`` (``positive: passed`` uses the reward's binary outcome instead).

    Choices (the paper body is [UNVERIFIED]; the code was read):
      - priorities are refreshed from the history at *every step* (the released code refreshes them
        once per epoch from previous epochs); with a fixed pool and small batches this reacts
        faster and needs no notion of epoch;
      - an impossible budget (outside ``[B n_min, B n_max]``) is a ConfigError, where the code clips
        it silently.

    Metrics (``dynamo/``): the allocation summary of :class:`AllocationSampler` (``pass_rate_top`` /
    ``pass_rate_bottom`` show whether the prompts that got the most rollouts are mixed ones), plus
    ``exploring_frac``, ``mastered_frac``, ``unsolved_frac`` (history with no positive) and
    ``priority_mean`` (over prompts past exploration).

    Args:
        rollouts_per_prompt, budget: the step budget, see :class:`AllocationSampler`.
        n_min, n_max: per-prompt floor and cap (both required).
        initial_budget: a prompt with fewer samples in its history is still exploring.
        mastery_threshold: history accuracy at which a prompt counts as mastered.
        min_priority: the priority floor (mastered and never-solved prompts).
        positive: ``reward_gt_0`` (the code's ``reward > 0``) or ``passed``.
    """

    prefix = "dynamo"

    def __init__(
        self,
        rollouts_per_prompt: int = 8,
        budget: int | None = None,
        n_min: int = 4,
        n_max: int = 12,
        initial_budget: int = 4,
        mastery_threshold: float = 0.85,
        min_priority: float = 0.01,
        positive: str = "reward_gt_0",
    ) -> None:
        f = "model.sampler."
        if n_max is None:
            raise ConfigError(f + "n_max", "DynaMO needs a cap: an int >= n_min")
        super().__init__(rollouts_per_prompt=rollouts_per_prompt, budget=budget, n_min=n_min, n_max=n_max, pilot=0)
        if initial_budget < 0:
            raise ConfigError(f + "initial_budget", f"must be >= 0, got {initial_budget}")
        if not 0.0 < mastery_threshold <= 1.0:
            raise ConfigError(f + "mastery_threshold", f"must be in (0, 1], got {mastery_threshold}")
        if not min_priority > 0:
            raise ConfigError(f + "min_priority", f"must be > 0, got {min_priority}")
        if positive not in POSITIVES:
            raise ConfigError(f + "positive", f"unknown rule {positive!r}; valid: {list(POSITIVES)}")
        self.initial_budget, self.mastery_threshold = initial_budget, mastery_threshold
        self.min_priority, self.positive = min_priority, positive
        self.counts: dict[str, list[int]] = {}  # uid -> [G (rollouts so far), k (positives so far)]

    def is_positive(self, r: Rollout) -> bool:
        return r.reward > 0 if self.positive == "reward_gt_0" else bool(r.passed)

    def priority(self, g: int, k: int) -> float:
        """``update_rank``'s priority; -1 while exploring (``g < initial_budget``)."""
        if g < self.initial_budget or g == 0:
            return -1.0
        acc = k / g
        if acc >= self.mastery_threshold:
            return self.min_priority
        var = k * (g - k) / (g * (g - 1)) if g > 1 else 0.0
        return max(var + (1.0 - acc) * 1e-6, self.min_priority)

    # ---- AllocationSampler hooks ----------------------------------------------------------------
    def plan(self, prompts: list[Prompt], ctx: SamplingContext, pilot: list[list[Rollout]] | None) -> Plan:
        hist = [self.counts.get(p.uid, (0, 0)) for p in prompts]
        prio = [self.priority(g, k) for g, k in hist]
        b = len(prompts)
        done = [pr for pr in prio if pr >= 0]
        ctx.log("dynamo/exploring_frac", (b - len(done)) / b)
        ctx.log(
            "dynamo/mastered_frac", sum(g >= max(self.initial_budget, 1) and k / g >= self.mastery_threshold for g, k in hist) / b
        )
        ctx.log("dynamo/unsolved_frac", sum(g > 0 and k == 0 for g, k in hist) / b)
        if done:
            ctx.log("dynamo/priority_mean", sum(done) / len(done))
        return Plan(shares=[max(pr, 0.0) for pr in prio], pass_rates=[k / g if g else None for g, k in hist])

    def integerise(self, plan: Plan, budget: int, floors: list[int], caps: list[int | None], prompts: list[Prompt]) -> list[int]:
        counts = [self.counts.get(p.uid, (0, 0))[0] for p in prompts]
        return water_fill(plan.shares, budget, self.n_min, self.n_max, counts, self.initial_budget, field=self._budget_field)

    def observe(self, prompts: list[Prompt], outs: list[list[Rollout]], ctx: SamplingContext) -> None:
        for uid, rs in by_uid(prompts, outs).items():
            g, k = self.counts.get(uid, (0, 0))
            self.counts[uid] = [g + len(rs), k + sum(self.is_positive(r) for r in rs)]

    # ---- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"counts": {uid: [int(g), int(k)] for uid, (g, k) in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(uid): [int(g), int(k)] for uid, (g, k) in state.get("counts", {}).items()}
