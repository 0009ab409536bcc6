"""Reinforce-Ada-Est: rollouts allocated in proportion to a weight of each prompt's estimated pass rate.

Paper: Xiong et al., "Reinforce-Ada: An Adaptive Sampling Framework ..." (arXiv 2510.04996); the
estimation-based allocator of the authors' ``hanze`` branch (``verl/trainer/ppo/ray_trainer_ema.py``),
reference §3c.
"""

from __future__ import annotations

from typing import Any

from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.allocation import AllocationSampler, Plan, by_uid
from components.types import Group, Prompt, Rollout

WEIGHTS = ("inverse", "sqrt_var", "uniform")
BASELINES = ("pool_mean", "none")


class AdaEstSampler(AllocationSampler):
    """Reinforce-Ada-Est: ``n_i ∝ w(p̂_i)`` from a Beta prior and EMA-decayed per-prompt counts.

    Per prompt (keyed by the stable uid) the sampler keeps EMA-decayed counts ``(n_total, n_pos)``;
    ``p̂ = (α + n_pos) / (α + β + n_total)``, clipped to ``[1e-6, 1 - 1e-6]``. The step budget
    ``rollouts_per_prompt x B`` is split as ``n_i = n_min + largest-remainder share of the rest ∝ w(p̂_i)``
    (capped at ``n_max``), generated in one call, and *every* sample is kept (no down-sampling).
    After the call ``counts <- decay · counts + this call's counts``. With ``baseline: pool_mean``
    each group's baseline is the mean reward of this call's samples of the prompt (``Group.baseline``),
    which the ``pool_mean`` advantage uses: ``A = r - p~`` (no std).

    Weights:
      - ``inverse`` (default, the authors' code): ``w = 1/p̂``, the log-objective weight; pours
        rollouts into prompts that look hard. Unseen prompts look hard too (the Beta(1, 16) prior
        gives p̂ ≈ 0.059).
      - ``sqrt_var``: ``w = sqrt(p̂ (1 - p̂))``, the Bernoulli std: the *variance-seeking* variant,
        which favours prompts near p = 1/2 (like DynaMO's and GVM's allocations). In the project's
        prototype benchmark (``reference/benchmark-evidence.md``) it was the only allocation that
        beat GRPO, while ``inverse`` lost by spending rollouts on impossible prompts. Prefer it
        when the prompt pool holds prompts the model cannot solve.
      - ``uniform``: ``w = 1`` (the control: same machinery, no allocation).

    Defaults (authors' code): prior α = 1, β = 16; decay 0.9 per visit (about 10 visits of memory);
    floor 1 rollout per prompt, no cap; budget = 1 x round_repeat x prompts (the code's docstring
    says 2x, the code uses 1x); no pilot round.

    Choices where the reference is [UNVERIFIED] or silent:
      - whether this allocator is exactly the "Est" algorithm of the paper's v3 is unverified;
      - a positive is ``Rollout.passed`` (the reward's binary outcome; the Seq code uses reward > 0.7);
      - ``pilot > 0`` (not in the code) first draws ``pilot`` rollouts per prompt, folds them into the
        estimate (``decay · counts + pilot counts``), then allocates the rest; pilot samples are kept
        and the EMA update is still applied once per call.
      - ``n_max`` (not in the code) caps a single prompt's share.

    Metrics (``ada/``): the allocation summary of :class:`AllocationSampler` plus ``phat_mean``,
    ``phat_min``, ``phat_max`` (the estimates that drove this step) and ``seen_frac`` (prompts with
    history).

    Args:
        rollouts_per_prompt, budget, n_min, n_max, pilot: see :class:`AllocationSampler`.
        weight: ``inverse`` | ``sqrt_var`` | ``uniform``.
        prior_alpha, prior_beta: the Beta prior pseudo-counts of a pass and a failure.
        decay: the EMA factor applied to a prompt's counts at each visit (1: cumulative).
        clip: p̂ is clipped to ``[clip, 1 - clip]`` before weighting.
        baseline: ``pool_mean`` sets ``Group.baseline`` to this call's mean reward; ``none`` leaves it
            to the advantage estimator.
    """

    prefix = "ada"

    def __init__(
        self,
        rollouts_per_prompt: int = 8,
        budget: int | None = None,
        n_min: int = 1,
        n_max: int | None = None,
        pilot: int = 0,
        weight: str = "inverse",
        prior_alpha: float = 1.0,
        prior_beta: float = 16.0,
        decay: float = 0.9,
        clip: float = 1e-6,
        baseline: str = "pool_mean",
    ) -> None:
        super().__init__(rollouts_per_prompt=rollouts_per_prompt, budget=budget, n_min=n_min, n_max=n_max, pilot=pilot)
        f = "model.sampler."
        if weight not in WEIGHTS:
            raise ConfigError(f + "weight", f"unknown weight {weight!r}; valid: {list(WEIGHTS)}")
        if not prior_alpha > 0:
            raise ConfigError(f + "prior_alpha", f"must be > 0 (Beta prior pseudo-count of a pass), got {prior_alpha}")
        if not prior_beta > 0:
            raise ConfigError(f + "prior_beta", f"must be > 0 (Beta prior pseudo-count of a failure), got {prior_beta}")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f + "decay", f"must be in [0, 1], got {decay}")
        if not 0.0 < clip < 0.5:
            raise ConfigError(f + "clip", f"must be in (0, 0.5), got {clip}")
        if baseline not in BASELINES:
            raise ConfigError(f + "baseline", f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")
        self.weight, self.prior_alpha, self.prior_beta = weight, prior_alpha, prior_beta
        self.decay, self.clip, self.baseline = decay, clip, baseline
        self.counts: dict[str, list[float]] = {}  # uid -> [n_total, n_pos], EMA-decayed

    # ---- the estimate ---------------------------------------------------------------------------
    def pass_rate(self, n_total: float, n_pos: float) -> float:
        """Posterior mean of the Beta prior, clipped to [clip, 1 - clip]."""
        p = (self.prior_alpha + n_pos) / (self.prior_alpha + self.prior_beta + n_total)
        return min(max(p, self.clip), 1.0 - self.clip)

    def weight_of(self, p: float) -> float:
        if self.weight == "inverse":
            return 1.0 / p
        if self.weight == "sqrt_var":
            return (p * (1.0 - p)) ** 0.5
        return 1.0

    def estimate(self, uid: str, extra: list[Rollout] | None = None) -> float:
        """p̂ of a prompt from its state (plus ``extra`` rollouts drawn in this call, decayed as the update would)."""
        n, k = self.counts.get(uid, (0.0, 0.0))
        if extra:
            n, k = self.decay * n + len(extra), self.decay * k + sum(r.passed for r in extra)
        return self.pass_rate(n, k)

    # ---- AllocationSampler hooks ----------------------------------------------------------------
    def plan(self, prompts: list[Prompt], handle: StepHandle, pilot: list[list[Rollout]] | None) -> Plan:
        pooled = by_uid(prompts, pilot) if pilot else {}
        phat = [self.estimate(p.uid, pooled.get(p.uid)) for p in prompts]
        handle.log("ada/phat_mean", sum(phat) / len(phat))
        handle.log("ada/phat_min", min(phat))
        handle.log("ada/phat_max", max(phat))
        handle.log("ada/seen_frac", sum(p.uid in self.counts for p in prompts) / len(prompts))
        return Plan(shares=[self.weight_of(p) for p in phat], pass_rates=list(phat))

    def observe(self, prompts: list[Prompt], outs: list[list[Rollout]], handle: StepHandle) -> None:
        for uid, rs in by_uid(prompts, outs).items():  # one visit per uid, even if it occurs twice in the batch
            n, k = self.counts.get(uid, (0.0, 0.0))
            self.counts[uid] = [self.decay * n + len(rs), self.decay * k + float(sum(r.passed for r in rs))]

    def finish_group(self, group: Group) -> None:
        if self.baseline == "pool_mean":
            group.baseline = group.pool_mean

    # ---- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"counts": {uid: [float(n), float(k)] for uid, (n, k) in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(uid): [float(n), float(k)] for uid, (n, k) in state.get("counts", {}).items()}
