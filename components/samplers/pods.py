"""PODS: generate many rollouts per prompt, train on the most informative few."""

from __future__ import annotations

import random
from typing import Any

from components.algos.selection import max_variance_indices, population_std, top_indices
from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.base import FixedGroupSampler, Sampler
from components.types import Group, Prompt

RULES = ("max_variance", "max_reward", "random")
NORMALIZE = ("kept", "pool")


class PODSSampler(Sampler):
    """PODS, Policy Optimization with Down-Sampling (Xu, Savani, Fang, Kolter; arXiv 2504.13818,
    TMLR 2026; code YixuanEvenXu/pods).

    Generates ``n`` rollouts per prompt (cheap inference) and keeps ``m`` of them for the update
    (the expensive forward/backward). Rules:

    - ``max_variance`` (PODS): the m rewards with the largest variance. An optimum is always the k
      highest plus the m - k lowest for some k, so it sorts once and scans k with prefix sums,
      O(n log n) (the reference code recomputes each variance, O(m^2)). The structure result is
      attributed to the paper's Lemma 3.1 by a secondary source only; the unit tests check it
      against brute force, non-binary rewards and ties included.
    - ``max_reward``: the top m (the paper's ablation; it collapses, groups become all-positive).
    - ``random``: m uniformly without replacement, from a seeded generator saved in ``state_dict``.

    Ties go to the earlier rollout. Pool statistics (``n_drawn``, ``n_pos``, ``reward_sum``) still
    cover every drawn rollout. ``normalize_within``: ``kept`` (default; the paper's choice, Appendix
    A.3 per a secondary source, UNVERIFIED) leaves ``baseline`` None, so the estimator normalises
    within the kept subset; ``pool`` sets ``baseline`` to the pool mean. Only the baseline moves:
    the ``grpo`` estimator still divides by the kept subset's std (the shared estimator has no
    per-group std override). PODS owns the baseline: one set by an inner sampler is replaced.

    Down-sampling cannot create variance: an all-equal group stays all-equal (the paper does not
    re-sample; use ``inner: DynamicSampling`` for that). The kept subset is not an on-policy sample
    and no importance correction is applied (as in the paper).

    Args:
        n: rollouts generated per prompt (paper: 64; default 64). Leave unset with ``inner``.
        m: rollouts kept per prompt (paper: 16). 2 <= m <= n; m == n is plain GRPO with pods/*
            metrics (the paper's n = m baseline).
        rule: ``max_variance`` | ``max_reward`` | ``random``.
        normalize_within: ``kept`` | ``pool``.
        inner: a sampler whose groups are down-sampled instead of n fixed rollouts (e.g. an
            allocation sampler or DynamicSampling); groups of size <= m pass whole. One that
            already down-samples (ReinforceAdaSeq, PODSSampler) is refused.
        seed: seed of the ``random`` rule.

    Metrics: ``pods/kept_frac`` (kept / rollouts seen), ``pods/kept_reward_std`` and
    ``pods/pool_reward_std`` (mean over groups of the population std of kept / of all rewards; the
    latter is the paper's ``reward_std``).
    """

    downsamples = True

    def __init__(
        self,
        n: int | None = None,
        m: int = 16,
        rule: str = "max_variance",
        normalize_within: str = "kept",
        inner: Sampler | None = None,
        seed: int = 0,
    ) -> None:
        if rule not in RULES:
            raise ConfigError("model.sampler.rule", f"must be one of {RULES}, got {rule!r}")
        if normalize_within not in NORMALIZE:
            raise ConfigError("model.sampler.normalize_within", f"must be one of {NORMALIZE}, got {normalize_within!r}")
        if m < 2:
            raise ConfigError("model.sampler.m", f"must be >= 2 (a kept subset of one has no variance), got {m}")
        if inner is not None:
            if n is not None:
                raise ConfigError("model.sampler.n", "leave unset when inner is given: the inner sampler decides the rollouts")
            if getattr(inner, "downsamples", False):
                raise ConfigError(
                    "model.sampler.inner",
                    f"{type(inner).__name__} already down-samples its groups; "
                    "give PODS a sampler that keeps every rollout it draws",
                )
        else:
            n = 64 if n is None else n
            if m > n:
                raise ConfigError("model.sampler.m", f"must be <= n ({n}), got {m}")
        self.n, self.m, self.rule, self.normalize_within, self.seed = n, m, rule, normalize_within, seed
        self.inner = inner if inner is not None else FixedGroupSampler(n)
        self.rng = random.Random(seed)

    def setup(self, handle: StepHandle) -> None:
        self.inner.setup(handle)

    def _select(self, rewards: list[float]) -> list[int]:
        if self.rule == "max_variance":
            return max_variance_indices(rewards, self.m)
        if self.rule == "max_reward":
            return top_indices(rewards, self.m)
        return sorted(self.rng.sample(range(len(rewards)), self.m))

    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        groups = self.inner.collect(prompts, handle)
        seen = kept = 0
        pool_std, kept_std = [], []
        for g in groups:
            rewards = g.rewards
            seen += g.size
            pool_std.append(population_std(rewards))
            if g.size > self.m:
                g.rollouts = [g.rollouts[i] for i in self._select(rewards)]
            kept += g.size
            kept_std.append(population_std(g.rewards))
            g.baseline = g.pool_mean if self.normalize_within == "pool" else None
        k = max(len(groups), 1)
        handle.log("pods/kept_frac", kept / max(seen, 1))
        handle.log("pods/kept_reward_std", sum(kept_std) / k)
        handle.log("pods/pool_reward_std", sum(pool_std) / k)
        return groups

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.inner.load_state_dict(state.get("inner", {}))
