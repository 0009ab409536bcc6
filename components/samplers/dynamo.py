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
from components.handle import StepHandle
from components.samplers.allocation import AllocationSampler, Plan, by_uid, water_fill
from components.types import Prompt, Rollout

POSITIVES = ("reward_gt_0", "passed")
REFRESH = ("step", "epoch")


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
      - ``refresh: step`` (default) refreshes priorities from the history at *every step*: with a
        fixed pool and small batches this reacts faster and needs no notion of epoch.
        ``refresh: epoch`` is the authors' form (``update_rank`` once per epoch): an *epoch* is
        ``epoch_prompts`` prompts drawn (default: the size of the data module's training pool),
        counted over the prompts given to ``collect``; priorities, the exploring test and the
        sample counts given to the water-filling all come from a snapshot of the history taken at
        the last epoch boundary (empty during the first epoch, so it is all exploration, as the
        authors' warm-up), while the history itself keeps accumulating every step. The authors'
        bounds are ``rollouts_per_prompt: 16, n_min: 8, n_max: 24``;
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
        refresh: ``step`` or ``epoch`` (the authors': priorities from a per-epoch snapshot).
        epoch_prompts: prompts per epoch with ``refresh: epoch`` (null: the training pool's size).
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
        refresh: str = "step",
        epoch_prompts: int | None = None,
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
        if refresh not in REFRESH:
            raise ConfigError(f + "refresh", f"unknown schedule {refresh!r}; valid: {list(REFRESH)}")
        if epoch_prompts is not None and epoch_prompts < 1:
            raise ConfigError(f + "epoch_prompts", f"must be >= 1 or null (the training pool's size), got {epoch_prompts}")
        self.refresh, self.epoch_prompts = refresh, epoch_prompts
        self.counts: dict[str, list[int]] = {}  # uid -> [G (rollouts so far), k (positives so far)]
        self.ranked: dict[str, list[int]] = {}  # refresh=epoch: the counts at the last epoch boundary
        self.drawn_in_epoch = 0  # refresh=epoch: prompts drawn since that boundary
        self.epochs = 0

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
    def _history(self) -> dict[str, list[int]]:
        """The counts priorities are computed from: live (``step``) or the epoch snapshot (``epoch``)."""
        return self.counts if self.refresh == "step" else self.ranked

    def _epoch_size(self, handle: StepHandle) -> int:
        if self.epoch_prompts is not None:
            return self.epoch_prompts
        pool = handle.train_prompts()
        if not pool:
            raise ConfigError("model.sampler.epoch_prompts", "refresh: epoch needs epoch_prompts or a training pool")
        return len(pool)

    def plan(self, prompts: list[Prompt], handle: StepHandle, pilot: list[list[Rollout]] | None) -> Plan:
        hist = [self._history().get(p.uid, (0, 0)) for p in prompts]
        prio = [self.priority(g, k) for g, k in hist]
        b = len(prompts)
        done = [pr for pr in prio if pr >= 0]
        handle.log("dynamo/exploring_frac", (b - len(done)) / b)
        handle.log(
            "dynamo/mastered_frac", sum(g >= max(self.initial_budget, 1) and k / g >= self.mastery_threshold for g, k in hist) / b
        )
        handle.log("dynamo/unsolved_frac", sum(g > 0 and k == 0 for g, k in hist) / b)
        if done:
            handle.log("dynamo/priority_mean", sum(done) / len(done))
        return Plan(shares=[max(pr, 0.0) for pr in prio], pass_rates=[k / g if g else None for g, k in hist])

    def integerise(self, plan: Plan, budget: int, floors: list[int], caps: list[int | None], prompts: list[Prompt]) -> list[int]:
        counts = [self._history().get(p.uid, (0, 0))[0] for p in prompts]
        return water_fill(plan.shares, budget, self.n_min, self.n_max, counts, self.initial_budget, field=self._budget_field)

    def observe(self, prompts: list[Prompt], outs: list[list[Rollout]], handle: StepHandle) -> None:
        for uid, rs in by_uid(prompts, outs).items():
            g, k = self.counts.get(uid, (0, 0))
            self.counts[uid] = [g + len(rs), k + sum(self.is_positive(r) for r in rs)]
        if self.refresh == "epoch":
            self.drawn_in_epoch += len(prompts)
            size = self._epoch_size(handle)
            if self.drawn_in_epoch >= size:  # end of an epoch: update_rank from all history so far
                self.ranked = {u: list(v) for u, v in self.counts.items()}
                self.drawn_in_epoch -= size
                self.epochs += 1
            handle.log("dynamo/epochs", self.epochs)

    # ---- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": {uid: [int(g), int(k)] for uid, (g, k) in self.counts.items()},
            "ranked": {uid: [int(g), int(k)] for uid, (g, k) in self.ranked.items()},
            "drawn_in_epoch": int(self.drawn_in_epoch),
            "epochs": int(self.epochs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(uid): [int(g), int(k)] for uid, (g, k) in state.get("counts", {}).items()}
        self.ranked = {str(uid): [int(g), int(k)] for uid, (g, k) in state.get("ranked", {}).items()}
        self.drawn_in_epoch, self.epochs = int(state.get("drawn_in_epoch", 0)), int(state.get("epochs", 0))
