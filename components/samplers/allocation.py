"""Allocation samplers: how many rollouts each prompt gets, from a fixed per-step budget.

Two pure integer-allocation routines, shared by every allocation method and tested in isolation:

- :func:`largest_remainder`: per-prompt floors first, then the rest of the budget in proportion to
  real-valued shares, capped per prompt (water-filling the caps), rounded by largest remainder so the
  integers sum *exactly* to the budget. Reinforce-Ada-Est and GVM integerise this way.
- :func:`water_fill`: DynaMO's routine (``get_rollout_n_per_prompt``, reference §5a steps 1-6):
  exploration budget for prompts with little history, top-up to ``n_min``, priority-proportional
  water-filling up to ``n_max``, round-robin for whatever no eligible prompt can take.

Both raise :class:`~components.errors.ConfigError` naming the field when the budget is impossible
(below the sum of floors or above the sum of caps).

:class:`AllocationSampler` is the base of the allocation samplers. A subclass only says how much each
prompt *deserves* (real-valued shares, plus the pass-rate estimates behind them) and how it learns
from outcomes; the base owns the budget, the optional pilot round, integerisation, generation and
the metrics. It calls ``handle.sample(prompts, n_each)`` once (twice with a pilot round) with
per-prompt counts, and the engine hands rollouts back grouped per prompt, so a rollout can never be
attached to another prompt's answer or group (the row-misalignment pitfall of reference §5f).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.base import Sampler, make_group
from components.types import Group, Prompt, Rollout

BUDGET_FIELD = "model.sampler.rollouts_per_prompt"


def _impossible(field: str, budget: int, lo: int, hi: int, n: int) -> ConfigError:
    return ConfigError(
        field,
        f"impossible budget: {budget} rollouts for {n} prompts, but the per-prompt floors need at least {lo} "
        f"and the caps allow at most {hi}; choose a budget in [{lo}, {hi}] (or loosen n_min / n_max)",
    )


def largest_remainder(
    shares: Sequence[float],
    budget: int,
    floors: Sequence[int] | None = None,
    caps: Sequence[int | None] | None = None,
    field: str = BUDGET_FIELD,
) -> list[int]:
    """Integers ``n_i`` in ``[floors_i, caps_i]`` with ``sum(n) == budget`` exactly.

    Every prompt first gets its floor; the rest ``R = budget - sum(floors)`` is split in proportion to
    ``shares`` (real targets ``x_i = floor_i + R_i``). A prompt whose target passes its cap is fixed
    at the cap and the excess re-split among the others (water-filling). When every prompt still
    below its cap has share 0, the rest is split evenly among them (the budget is always spent).
    The real targets are rounded by largest remainder (ties: lower index first).

    ``caps`` entries of None mean "no cap". Raises ConfigError(``field``) when
    ``budget < sum(floors)`` or ``budget > sum(caps)``.
    """
    n = len(shares)
    fl = [0] * n if floors is None else [int(f) for f in floors]
    if len(fl) != n or (caps is not None and len(caps) != n):
        raise ValueError(f"largest_remainder: {n} shares but {len(fl)} floors and {len(caps or [])} caps")
    cp = [max(budget, f) if caps is None or caps[i] is None else int(caps[i]) for i, f in enumerate(fl)]
    if any(f < 0 for f in fl) or any(c < f for f, c in zip(fl, cp, strict=True)):
        raise ValueError(f"largest_remainder: need 0 <= floor <= cap per prompt, got floors={fl} caps={cp}")
    if any(not math.isfinite(s) or s < 0 for s in shares):
        raise ValueError(f"largest_remainder: shares must be finite and >= 0, got {list(shares)}")
    if budget < sum(fl) or budget > sum(cp):
        raise _impossible(field, budget, sum(fl), sum(cp), n)
    x = [float(f) for f in fl]
    free = [i for i in range(n) if cp[i] > fl[i]]
    rest = float(budget - sum(fl))
    while rest > 1e-9 and free:
        total = sum(shares[i] for i in free)
        w = {i: (shares[i] / total if total > 0 else 1.0 / len(free)) for i in free}
        over = [i for i in free if x[i] + rest * w[i] > cp[i]]
        if not over:
            for i in free:
                x[i] += rest * w[i]
            break
        for i in over:
            rest -= cp[i] - x[i]
            x[i] = float(cp[i])
        free = [i for i in free if i not in set(over)]
    out = [min(max(math.floor(v + 1e-9), f), c) for v, f, c in zip(x, fl, cp, strict=True)]
    left = budget - sum(out)
    order = sorted(range(n), key=lambda i: (-(x[i] - out[i]), i))
    while left > 0:  # one pass normally suffices; more only guard against float drift
        for i in order:
            if left == 0:
                break
            if out[i] < cp[i]:
                out[i] += 1
                left -= 1
    while left < 0:  # float drift the other way: take back from the smallest remainders
        for i in reversed(order):
            if left == 0:
                break
            if out[i] > fl[i]:
                out[i] -= 1
                left += 1
    return out


def water_fill(
    priorities: Sequence[float],
    budget: int,
    n_min: int,
    n_max: int,
    sample_counts: Sequence[int] | None = None,
    initial_budget: int = 4,
    field: str = BUDGET_FIELD,
) -> list[int]:
    """DynaMO's allocation (``get_rollout_n_per_prompt``), summing exactly to ``budget``.

    1. ``budget`` must lie in ``[B n_min, B n_max]`` (the released code clips it silently; here an
       impossible budget is a ConfigError naming ``field``).
    2. Exploration: a prompt with ``sample_count < initial_budget`` gets ``initial_budget - count``
       (capped at n_max); if these do not fit they are scaled down, each still floored at n_min.
    3. Every prompt is topped up to ``n_min``.
    4. The rest is water-filled in proportion to priority among *eligible* prompts (priority > 1e-8,
       not exploring, below n_max), capped at n_max, rounded by largest remainder.
    5. What no eligible prompt can take is handed out round-robin (index order) to prompts below n_max.
    """
    b = len(priorities)
    if n_min < 0 or n_max < n_min:
        raise ValueError(f"water_fill: need 0 <= n_min <= n_max, got {n_min}, {n_max}")
    if budget < b * n_min or budget > b * n_max:
        raise _impossible(field, budget, b * n_min, b * n_max, b)
    counts = [initial_budget] * b if sample_counts is None else [int(c) for c in sample_counts]
    exploring = [c < initial_budget for c in counts]
    n = [n_min] * b
    extra = [max(0, min(n_max, initial_budget - c) - n_min) if e else 0 for c, e in zip(counts, exploring, strict=True)]
    room = budget - b * n_min
    if sum(extra) > room:
        extra = largest_remainder([float(e) for e in extra], room, caps=extra, field=field)
    n = [a + e for a, e in zip(n, extra, strict=True)]
    room -= sum(extra)
    eligible = [not e and p > 1e-8 and k < n_max for e, p, k in zip(exploring, priorities, n, strict=True)]
    capacity = sum(n_max - k for k, ok in zip(n, eligible, strict=True) if ok)
    if room > 0 and capacity > 0:
        give = min(room, capacity)
        add = largest_remainder(
            [float(p) if ok else 0.0 for p, ok in zip(priorities, eligible, strict=True)],
            give,
            caps=[n_max - k if ok else 0 for k, ok in zip(n, eligible, strict=True)],
            field=field,
        )
        n = [k + a for k, a in zip(n, add, strict=True)]
        room -= give
    while room > 0:
        for i in range(b):
            if room == 0:
                break
            if n[i] < n_max:
                n[i] += 1
                room -= 1
    return n


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation, None when undefined (fewer than 2 points or a constant series)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    return sxy / math.sqrt(sxx * syy)


def by_uid(prompts: Sequence[Prompt], outs: Sequence[Sequence[Rollout]]) -> dict[str, list[Rollout]]:
    """Every rollout of this call per prompt uid. A batch drawn with replacement can hold a prompt
    twice; per-prompt state must see one visit with all of its rollouts, not two."""
    pooled: dict[str, list[Rollout]] = {}
    for p, rs in zip(prompts, outs, strict=True):
        pooled.setdefault(p.uid, []).extend(rs)
    return pooled


@dataclass
class Plan:
    """What a subclass says about this step's prompts.

    ``shares``: real-valued, >= 0, how much of the budget each prompt deserves (only ratios matter).
    ``pass_rates``: the pass-rate estimate behind each share (None: no estimate), for the metrics.
    ``floors`` / ``caps``: optional per-prompt overrides of the sampler's n_min / n_max (totals per
    prompt, pilot samples included).
    """

    shares: list[float]
    pass_rates: list[float | None]
    floors: list[int] | None = None
    caps: list[int | None] | None = None


class AllocationSampler(Sampler):
    """Base of the allocation samplers: a fixed budget per step, split unevenly across prompts.

    Per step: budget ``= rollouts_per_prompt x len(prompts)`` (or ``budget`` when set); optionally a
    pilot round of ``pilot`` rollouts per prompt (kept in the group, counted in the budget);
    :meth:`plan` gives real shares; :meth:`integerise` turns them into counts (floors ``n_min``,
    caps ``n_max``, exact sum); one ``handle.sample`` call with those counts; one group per prompt that
    got at least one rollout; :meth:`observe` updates per-prompt state from every rollout drawn.

    Metrics under ``<prefix>/``: ``budget``, ``n_min``, ``n_max``, ``n_mean``, ``n_std``,
    ``zero_budget_frac``, ``n_phat_corr`` (Pearson correlation of n_i with the estimated pass rate
    that drove it; omitted when undefined), ``pass_rate_top`` / ``pass_rate_bottom`` (this step's
    observed pass rate of the quarter of prompts with the most / fewest rollouts).

    Args:
        rollouts_per_prompt: the average budget per prompt.
        budget: total rollouts per step; overrides ``rollouts_per_prompt x len(prompts)``.
        n_min: per-prompt floor (pilot included).
        n_max: per-prompt cap (pilot included); None: no cap.
        pilot: rollouts per prompt drawn first, before the allocation (0: none).
    """

    prefix = "alloc"

    def __init__(
        self, rollouts_per_prompt: int = 8, budget: int | None = None, n_min: int = 1, n_max: int | None = None, pilot: int = 0
    ) -> None:
        f = "model.sampler."
        if rollouts_per_prompt < 1:
            raise ConfigError(f + "rollouts_per_prompt", f"must be >= 1, got {rollouts_per_prompt}")
        if budget is not None and budget < 1:
            raise ConfigError(f + "budget", f"must be >= 1 or null (rollouts_per_prompt x prompts), got {budget}")
        if n_min < 0:
            raise ConfigError(f + "n_min", f"must be >= 0, got {n_min}")
        if n_max is not None and n_max < max(n_min, 1):
            raise ConfigError(f + "n_max", f"must be >= max(n_min, 1) = {max(n_min, 1)} or null (no cap), got {n_max}")
        if pilot < 0:
            raise ConfigError(f + "pilot", f"must be >= 0, got {pilot}")
        if budget is None:
            if n_min > rollouts_per_prompt:
                raise ConfigError(
                    f + "rollouts_per_prompt",
                    f"impossible budget: {rollouts_per_prompt} per prompt on average is below the floor n_min={n_min}",
                )
            if n_max is not None and n_max < rollouts_per_prompt:
                raise ConfigError(
                    f + "rollouts_per_prompt",
                    f"impossible budget: {rollouts_per_prompt} per prompt on average is above the cap n_max={n_max}",
                )
            if pilot > rollouts_per_prompt:
                raise ConfigError(
                    f + "pilot", f"must be <= rollouts_per_prompt={rollouts_per_prompt} (the pilot is part of the budget)"
                )
        if n_max is not None and pilot > n_max:
            raise ConfigError(f + "pilot", f"must be <= n_max={n_max}, got {pilot}")
        self.rollouts_per_prompt = rollouts_per_prompt
        self.budget = budget
        self.n_min = n_min
        self.n_max = n_max
        self.pilot = pilot
        self.last_allocation: dict[str, int] = {}  # uid -> n_i of the last step (for inspection; not state)

    # ---- what subclasses implement ------------------------------------------------------------
    @abstractmethod
    def plan(self, prompts: list[Prompt], handle: StepHandle, pilot: list[list[Rollout]] | None) -> Plan:
        """Real-valued shares for this step's prompts (``pilot``: the pilot rollouts, if any)."""

    @abstractmethod
    def observe(self, prompts: list[Prompt], outs: list[list[Rollout]], handle: StepHandle) -> None:
        """Update per-prompt state from every rollout drawn this step (pilot included); see :func:`by_uid`
        for prompts that occur twice in one batch."""

    def finish_group(self, group: Group) -> None:
        """Last touch on a group before it is returned (e.g. set a baseline)."""
        return None

    def integerise(self, plan: Plan, budget: int, floors: list[int], caps: list[int | None], prompts: list[Prompt]) -> list[int]:
        """Counts for the post-pilot round; floors, caps and budget already exclude the pilot."""
        return largest_remainder(plan.shares, budget, floors, caps, field=self._budget_field)

    # ---- the step -----------------------------------------------------------------------------
    @property
    def _budget_field(self) -> str:
        return "model.sampler." + ("budget" if self.budget is not None else "rollouts_per_prompt")

    def total_budget(self, num_prompts: int) -> int:
        return self.budget if self.budget is not None else self.rollouts_per_prompt * num_prompts

    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        if not prompts:
            return []
        b = len(prompts)
        budget = self.total_budget(b)
        pilot_outs: list[list[Rollout]] | None = None
        if self.pilot:
            if self.pilot * b > budget:
                raise ConfigError(
                    "model.sampler.pilot", f"a pilot of {self.pilot} x {b} prompts exceeds the step budget {budget}"
                )
            pilot_outs = self._sample(handle, prompts, [self.pilot] * b)
        plan = self.plan(prompts, handle, pilot_outs)
        if len(plan.shares) != b or len(plan.pass_rates) != b:
            raise RuntimeError(f"{type(self).__name__}.plan returned {len(plan.shares)} shares for {b} prompts")
        floors = plan.floors if plan.floors is not None else [self.n_min] * b
        caps = plan.caps if plan.caps is not None else [self.n_max] * b
        k = self.pilot
        rest_floors = [max(0, f - k) for f in floors]
        rest_caps = [None if c is None else max(0, c - k) for c in caps]
        n_rest = self.integerise(plan, budget - k * b, rest_floors, rest_caps, prompts)
        if len(n_rest) != b or sum(n_rest) != budget - k * b or min(n_rest) < 0:
            raise RuntimeError(f"{type(self).__name__}: allocation {n_rest} does not spend {budget - k * b} over {b} prompts")
        outs = self._sample(handle, prompts, n_rest)
        if pilot_outs is not None:
            outs = [a + o for a, o in zip(pilot_outs, outs, strict=True)]
        groups = []
        for p, rs in zip(prompts, outs, strict=True):
            if not rs:
                continue  # a prompt allocated 0 rollouts produces no group
            g = make_group(p, handle.context_of(p), rs)
            g.meta["alloc_n"] = len(rs)
            self.finish_group(g)
            groups.append(g)
        self.observe(prompts, outs, handle)
        n_total = [len(rs) for rs in outs]
        self.last_allocation = {p.uid: n for p, n in zip(prompts, n_total, strict=True)}
        self._log_allocation(handle, n_total, plan.pass_rates, outs, budget)
        return groups

    @staticmethod
    def _sample(handle: StepHandle, prompts: list[Prompt], n_each: list[int]) -> list[list[Rollout]]:
        """One ``handle.sample`` call for the prompts with n > 0; rollouts come back grouped per prompt."""
        idx = [i for i, n in enumerate(n_each) if n > 0]
        out: list[list[Rollout]] = [[] for _ in prompts]
        if not idx:
            return out
        got = handle.sample([prompts[i] for i in idx], [n_each[i] for i in idx])
        if len(got) != len(idx):
            raise RuntimeError(f"sample() returned {len(got)} rollout lists for {len(idx)} prompts")
        for i, rs in zip(idx, got, strict=True):
            if len(rs) != n_each[i]:
                raise RuntimeError(f"sample() returned {len(rs)} rollouts for prompt {prompts[i].uid}, asked for {n_each[i]}")
            out[i] = list(rs)
        return out

    def _log_allocation(
        self, handle: StepHandle, n: list[int], pass_rates: list[float | None], outs: list[list[Rollout]], budget: int
    ) -> None:
        pre = self.prefix
        mean = sum(n) / len(n)
        handle.log(f"{pre}/budget", budget)
        handle.log(f"{pre}/n_min", min(n))
        handle.log(f"{pre}/n_max", max(n))
        handle.log(f"{pre}/n_mean", mean)
        handle.log(f"{pre}/n_std", math.sqrt(sum((x - mean) ** 2 for x in n) / len(n)))
        handle.log(f"{pre}/zero_budget_frac", sum(x == 0 for x in n) / len(n))
        known = [(x, p) for x, p in zip(n, pass_rates, strict=True) if p is not None]
        corr = pearson([x for x, _ in known], [p for _, p in known])
        if corr is not None:
            handle.log(f"{pre}/n_phat_corr", corr)
        drawn = sorted(((x, sum(r.passed for r in rs) / x) for x, rs in zip(n, outs, strict=True) if x > 0), key=lambda t: -t[0])
        if len(drawn) >= 2:
            q = max(1, len(drawn) // 4)
            handle.log(f"{pre}/pass_rate_top", sum(p for _, p in drawn[:q]) / q)
            handle.log(f"{pre}/pass_rate_bottom", sum(p for _, p in drawn[-q:]) / q)
