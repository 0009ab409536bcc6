"""Advantage estimators: pure tensor functions, registered by name.

Every estimator takes flat per-rollout ``rewards`` and a ``group`` index (rollout -> group id), never
a ``(B, G)`` reshape, so ragged groups (any allocation method) flow through the same code.
``baseline`` optionally gives one baseline per group (e.g. Reinforce-Ada's pool mean over every
sample drawn, not only those kept); NaN entries mean "use the kept rollouts".

Conventions, chosen and tested here:
- size-1 groups get advantage 0 from the group-relative estimators (there is no "other" rollout to
  compare with); verl instead uses mean 0 / std 1 (A = r). A supplied baseline still applies.
- ``std="population"`` (divide by N) is the default, as in SAGE and the analytic formulas;
  ``std="unbiased"`` (N - 1) matches verl's ``torch.std``. They differ by sqrt(2) at G = 2.
- all-equal rewards give exactly 0 and never NaN: a zero-spread group is not divided by its std.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class AdvantageConfig:
    """Which estimator (``model.advantage.name``) and every estimator's options.

    Each estimator receives this whole object and reads the options it uses, so a new option is a
    field here and a line in its estimator, never a change to the update.
    """

    name: str = "grpo"  # grpo | dr_grpo | rloo | pool_mean | raft
    std: Literal["population", "unbiased"] = "population"  # grpo: divide by the N or the N - 1 std
    eps: float = 1e-6  # grpo, pool_mean: added to the std before dividing
    normalize_std: bool = False  # pool_mean only: divide by sqrt(p~(1 - p~))
    threshold: float = 0.0  # raft only: a rollout is accepted when its reward is above this


# (rewards (N,), group (N,), per-group baseline (G,) with NaN = own, or None, config) -> (N,) advantages
AdvantageFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", AdvantageConfig], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    from components.errors import ConfigError

    if name not in ADVANTAGES:
        raise ConfigError("model.advantage.name", f"unknown estimator {name!r}; valid: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def group_stats(
    values: torch.Tensor, group: torch.Tensor, num_groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count, sum, sum of squares), by scatter-add over the group index."""
    g = int(group.max().item()) + 1 if num_groups is None else num_groups
    v = values.double()
    count = torch.zeros(g, dtype=torch.double).index_add_(0, group, torch.ones_like(v))
    total = torch.zeros(g, dtype=torch.double).index_add_(0, group, v)
    sq = torch.zeros(g, dtype=torch.double).index_add_(0, group, v * v)
    return count, total, sq


def group_mean_std(
    rewards: torch.Tensor, group: torch.Tensor, std: Literal["population", "unbiased"] = "population"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rollout (group mean, group std, group size), gathered back to rollouts."""
    count, total, sq = group_stats(rewards, group)
    mean = total / count.clamp(min=1)
    var = (sq / count.clamp(min=1) - mean * mean).clamp(min=0)
    if std == "unbiased":
        var = var * count / (count - 1).clamp(min=1)
    return mean[group], var.sqrt()[group], count[group]


def _baseline(mean: torch.Tensor, baseline: torch.Tensor | None, group: torch.Tensor) -> torch.Tensor:
    if baseline is None:
        return mean
    b = baseline.double()[group]
    return torch.where(torch.isnan(b), mean, b)


@register_advantage("grpo")
def grpo_advantage(
    rewards: torch.Tensor, group: torch.Tensor, baseline: torch.Tensor | None = None, cfg: AdvantageConfig | None = None
) -> torch.Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)``. Size-1 groups without a baseline get 0."""
    cfg = cfg or AdvantageConfig()
    std, eps = cfg.std, cfg.eps
    mean, sd, n = group_mean_std(rewards, group, std)
    # A group with zero spread is not divided at all (no 0/0, and no blow-up of a supplied baseline).
    adv = (rewards.double() - _baseline(mean, baseline, group)) / torch.where(sd > 0, sd + eps, torch.ones_like(sd))
    if baseline is None:
        adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv.float()


@register_advantage("dr_grpo")
def dr_grpo_advantage(
    rewards: torch.Tensor, group: torch.Tensor, baseline: torch.Tensor | None = None, cfg: AdvantageConfig | None = None
) -> torch.Tensor:
    """Dr. GRPO: ``r - mean_g`` (no std division, which up-weights near-degenerate groups)."""
    mean, _sd, n = group_mean_std(rewards, group)
    adv = rewards.double() - _baseline(mean, baseline, group)
    if baseline is None:
        adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv.float()


@register_advantage("rloo")
def rloo_advantage(
    rewards: torch.Tensor, group: torch.Tensor, baseline: torch.Tensor | None = None, cfg: AdvantageConfig | None = None
) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j`` = ``n/(n-1) (r_i - mean_g)``; size-1 groups get 0."""
    mean, _sd, n = group_mean_std(rewards, group)
    adv = (rewards.double() - mean) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).float()


@register_advantage("pool_mean")
def pool_mean_advantage(
    rewards: torch.Tensor, group: torch.Tensor, baseline: torch.Tensor | None = None, cfg: AdvantageConfig | None = None
) -> torch.Tensor:
    """Reinforce-Ada: ``r - p~`` with p~ the mean over *every* sample drawn for the prompt.

    ``baseline`` carries p~ per group (the sampler's pool statistics); without one it falls back to
    the kept rollouts' mean. ``normalize_std`` divides by the Bernoulli std ``sqrt(p~(1 - p~))``
    (off by default, as in the authors' script: with large pools 1/std explodes).
    """
    cfg = cfg or AdvantageConfig()
    mean, _sd, _n = group_mean_std(rewards, group)
    b = _baseline(mean, baseline, group)
    adv = rewards.double() - b
    if cfg.normalize_std:
        adv = adv / ((b * (1 - b)).clamp(min=0).sqrt() + cfg.eps)
    return adv.float()


@register_advantage("raft")
def raft_advantage(
    rewards: torch.Tensor, group: torch.Tensor, baseline: torch.Tensor | None = None, cfg: AdvantageConfig | None = None
) -> torch.Tensor:
    """RAFT (rejection-sampling fine-tuning): ``A = r`` on accepted rollouts (``r > threshold``), 0 otherwise.

    The GVM authors' ``compute_raft_outcome_advantage`` (RLHFlow/GVM ``core_algos.py``) is
    ``max(r, 0)`` (``model.advantage.threshold`` 0, the default): with rewards in {0, 1} only reward-1 samples get a gradient, each with weight 1,
    and the policy loss turns it into likelihood maximisation of the accepted samples. No baseline,
    no group statistics: ``group`` is unused. Rejected rollouts stay in the batch with A = 0 (as in
    the authors' token-mean, their tokens count in the denominator).
    """
    threshold = (cfg or AdvantageConfig()).threshold
    r = rewards.double()
    return torch.where(r > threshold, r, torch.zeros_like(r)).float()


raft_advantage.group_relative = False  # an all-correct group still gets A = 1: RAFT has no baseline
