"""DRO's variance query filter (paper v1 §4.2.2) and our cheaper online variant.

Both read the cross-rollout spread of the reference-token log-probs, s_j (see
:mod:`components.rewards.r3`): a query whose reasonings all give the reference the same likelihood
(max_j s_j small) has nothing to compare, so R3's advantages are noise for it.

- :class:`PeriodicQueryFilter` is the paper's: once at the start of training (before the first
  update) and every ``every_n_steps`` steps, with the current policy, sample ``traces`` reasonings per training query and
  (1) drop queries that even their best trace cannot make likely: s_i = mean of the worst
  ``rho`` share of the reference tokens' ranks, and a query stays only if some trace has
  s_i < ``top_k`` (0 = the model's top-1 token);
  (2) of the survivors, drop the bottom ``drop_frac`` by max_j s_j;
  then carry forward ``carry_frac`` (the paper: 10%) of the previous round's set (of its queries
  scored this round, when ``max_queries`` scores only a subset). The kept set is
  applied by zeroing the draw weights of the dropped prompts in the DataModule's pool.
  ``every_n_steps: 0`` runs only the first round: a one-time pre-filter of the data.
  The paper gives neither rho, k, the fraction nor the interval; ours are the defaults below.
- :class:`OnlineVarianceFilter` is ours: no extra sampling; in the step a group is drawn, drop it
  when its max_j s_j (computed by R3 anyway) is below ``min_max_sigma``. It saves the update on
  that group, not its rollouts.

Both log how many queries they removed; the periodic filter logs its cost (tokens generated and
forwarded, seconds), which also count in ``budget/tokens`` and ``budget/tokens_forwarded``.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch

from components.callbacks.base import SignalCallback
from components.errors import ConfigError
from components.rewards.r3 import R3Reward, split_at_marker, token_spread, worst_rank_score
from components.types import Group, Prompt

if TYPE_CHECKING:
    from components.handle import StepHandle


class Pool(Protocol):
    """What a round reads and rewrites of the data module's training pool (its ``PromptPool``)."""

    prompts: list[Prompt]
    weights: torch.Tensor

# Per-step amounts a round adds (0 in steps without a round).
_ROUND_KEYS = (
    "dro/filter_stage1_dropped",
    "dro/filter_stage2_dropped",
    "dro/filter_carried",
    "dro/filter_tokens_generated",
    "dro/filter_tokens_forwarded",
    "budget/tokens",
    "budget/tokens_forwarded",
    "time/filter_s",
)
_TOTAL_OF = {
    "tokens_generated": "dro/filter_tokens_generated",
    "tokens_forwarded": "dro/filter_tokens_forwarded",
    "s": "time/filter_s",
}


def _r3_of(reward: Any, who: str) -> R3Reward:
    if not isinstance(reward, R3Reward):
        raise ConfigError(
            f"trainer.callbacks.{who}", "reads R3's cross-rollout spread: set model.reward to components.rewards.r3.R3Reward"
        )
    return reward


class OnlineVarianceFilter(SignalCallback):
    """Ours: drop a group whose max_j s_j is below ``min_max_sigma`` in the step it is drawn."""

    def __init__(self, min_max_sigma: float = 0.05) -> None:
        if not min_max_sigma >= 0:
            raise ConfigError("OnlineVarianceFilter.min_max_sigma", f"must be >= 0, got {min_max_sigma}")
        self.min_max_sigma = min_max_sigma
        self.total_dropped = 0

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        _r3_of(getattr(pl_module, "reward", None), "OnlineVarianceFilter")

    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        kept = [g for g in groups if g.rollouts and g.rollouts[0].meta.get("r3_max_sigma", 0.0) >= self.min_max_sigma]
        dropped = len(groups) - len(kept)
        self.total_dropped += dropped
        handle.log("dro/online_filter_dropped", dropped)
        handle.log("dro/online_filter_dropped_frac", dropped / max(len(groups), 1))
        return kept

    def state_dict(self) -> dict[str, Any]:
        return {"total_dropped": self.total_dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_dropped = int(state.get("total_dropped", 0))


class PeriodicQueryFilter(SignalCallback):
    """The paper's two-stage filter, run at the first step (before any update) and every ``every_n_steps`` steps.

    Args:
        every_n_steps: rounds after the first (0: only the first round).
        traces: reasoning traces sampled per query (the paper: 16 or 32).
        rho: share of each trace's reference tokens, the worst-ranked, whose ranks are averaged.
        top_k: a query stays in stage 1 if some trace's averaged worst rank is below this.
        drop_frac: share of stage-1 survivors dropped by the smallest max_j s_j.
        carry_frac: share of the previous round's set carried forward (the paper: 0.1), taken over
            the queries this round scored.
        max_queries: score at most this many queries per round (a random subset; the others keep
            their status); None scores the whole pool as the paper does.
        chunk: prompts per generation call.
        seed: seeds the carry-forward and subset draws.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        traces: int = 16,
        rho: float = 0.2,
        top_k: int = 10,
        drop_frac: float = 0.3,
        carry_frac: float = 0.1,
        max_queries: int | None = None,
        chunk: int = 64,
        seed: int = 0,
    ) -> None:
        for name, v, ok in (
            ("every_n_steps", every_n_steps, every_n_steps >= 0),
            ("traces", traces, traces >= 2),
            ("rho", rho, 0 < rho <= 1),
            ("top_k", top_k, top_k >= 1),
            ("drop_frac", drop_frac, 0 <= drop_frac < 1),
            ("carry_frac", carry_frac, 0 <= carry_frac <= 1),
            ("chunk", chunk, chunk >= 1),
        ):
            if not ok:
                raise ConfigError(f"PeriodicQueryFilter.{name}", f"invalid value {v}")
        if max_queries is not None and max_queries < 1:
            raise ConfigError("PeriodicQueryFilter.max_queries", f"must be >= 1 or null, got {max_queries}")
        self.every_n_steps, self.traces, self.rho, self.top_k = every_n_steps, traces, rho, top_k
        self.drop_frac, self.carry_frac, self.max_queries, self.chunk = drop_frac, carry_frac, max_queries, chunk
        self.rng = random.Random(seed)
        self.kept: set[str] | None = None  # uids in the current training set (None: never filtered)
        self.rounds = 0
        self.last_round_step = -1
        self._orig_weights: torch.Tensor | None = None
        self._pending: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.reward: R3Reward | None = None  # the run's R3 reward, found at setup

    # ---- one round (pure enough to test on a scripted policy) -----------------------------------
    def select(self, prompts: list[Prompt], handle: StepHandle) -> dict[str, Any]:
        """Score ``prompts`` with ``traces`` fresh reasonings each under the current policy and return
        the uids that survive both stages, with counts and costs."""
        reward = _r3_of(self.reward, "PeriodicQueryFilter")
        n_gen = n_fwd = 0
        best_rank: dict[str, float] = {}
        max_sigma: dict[str, float] = {}
        for start in range(0, len(prompts), self.chunk):
            part = prompts[start : start + self.chunk]
            outs = handle.generate([handle.context_of(p) for p in part], [self.traces] * len(part))
            for p, rs in zip(part, outs):
                n_gen += sum(len(r.token_ids) for r in rs)
                n_fwd += self.traces * len(handle.context_of(p)) + sum(len(r.token_ids) for r in rs)  # generation
                splits = [split_at_marker(r.text, reward.marker_of(p)) for r in rs]
                lp, ranks, _, fwd = reward.group_logprobs(p, splits, model=handle.policy, ranks=True)
                n_fwd += fwd
                best_rank[p.uid] = float(worst_rank_score(ranks, self.rho).min())
                max_sigma[p.uid] = float(token_spread(lp).max())
        stage1 = [p.uid for p in prompts if best_rank[p.uid] < self.top_k]
        order = sorted(stage1, key=lambda u: max_sigma[u], reverse=True)
        n_drop2 = int(math.floor(self.drop_frac * len(order)))
        stage2 = order[: len(order) - n_drop2]
        return {
            "kept": stage2,
            "stage1_dropped": len(prompts) - len(stage1),
            "stage2_dropped": n_drop2,
            "tokens_generated": n_gen,
            "tokens_forwarded": n_fwd,
            "best_rank": best_rank,
            "max_sigma": max_sigma,
        }

    def run_round(self, handle: StepHandle, pool: Pool) -> None:
        """One round over ``pool`` (the data module's training pool), whose weights it rewrites."""
        t0 = time.perf_counter()
        if self._orig_weights is None:
            self._orig_weights = pool.weights.clone()
        all_uids = [p.uid for p in pool.prompts]
        prev = set(all_uids) if self.kept is None else set(self.kept)
        cand = list(pool.prompts)
        if self.max_queries is not None and len(cand) > self.max_queries:
            cand = self.rng.sample(cand, self.max_queries)
        res = self.select(cand, handle)
        scored = {p.uid for p in cand}
        new = set(res["kept"]) | {u for u in prev if u not in scored}  # unscored queries keep their status
        # The paper carries forward a share of the previous set; with ``max_queries`` only part of it
        # was scored this round, and a share of the whole set would take back what the round dropped
        # (at recipes/dro.yaml's defaults: 95 dropped of 256 scored, 93 carried back). The share is
        # of the previous set's queries scored now (all of it without max_queries: the paper's rule).
        carry_pool = sorted(prev - new)
        n_carry = min(len(carry_pool), int(round(self.carry_frac * len(prev & scored))))
        carried = set(self.rng.sample(carry_pool, n_carry))
        new |= carried
        if not new:  # never leave the stream empty: keep the previous set
            new = prev
        self.kept = new
        self._apply(pool)
        self.rounds += 1
        self.last_round_step = handle.step
        for k, v in (
            ("dro/filter_stage1_dropped", res["stage1_dropped"]),
            ("dro/filter_stage2_dropped", res["stage2_dropped"]),
            ("dro/filter_carried", len(carried)),
            ("dro/filter_tokens_generated", res["tokens_generated"]),
            ("dro/filter_tokens_forwarded", res["tokens_forwarded"]),
            ("budget/tokens", res["tokens_generated"]),
            ("budget/tokens_forwarded", res["tokens_forwarded"]),
            ("time/filter_s", time.perf_counter() - t0),
        ):
            self._pending[k] = self._pending.get(k, 0) + v

    def _apply(self, pool: Pool) -> None:
        mask = torch.tensor([p.uid in self.kept for p in pool.prompts], dtype=self._orig_weights.dtype)
        pool.weights = self._orig_weights * mask

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.reward = _r3_of(getattr(pl_module, "reward", None), "PeriodicQueryFilter")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.kept is not None:  # resumed: re-apply the restored set
            pool = trainer.datamodule.train_pool
            self._orig_weights = pool.weights.clone()
            self._apply(pool)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # The first round runs at the first step, after the module's start-of-training hooks (the
        # engine is started and the step-0 evaluation has run, so the filter's sampling does not
        # shift it); that step's prompts were already drawn from the unfiltered pool.
        step = pl_module.global_step
        first = self.kept is None
        periodic = self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_round_step
        if first or periodic:
            self.run_round(pl_module.handle, trainer.datamodule.train_pool)

    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        # A round runs before the step's metrics are reset, so its counts and costs are reported
        # here; every key is written every step (0 without a round: Lightning repeats the last
        # value of a key that a step does not log).
        pending, self._pending = self._pending, {}
        handle.add_metrics({k: pending.get(k, 0) for k in _ROUND_KEYS})
        for k in ("tokens_generated", "tokens_forwarded", "s"):
            self.totals[k] = self.totals.get(k, 0.0) + pending.get(_TOTAL_OF[k], 0.0)
            handle.log(f"dro/filter_cum_{k}", self.totals[k])
        handle.log("dro/filter_rounds", self.rounds)
        handle.log("dro/filter_pool", len(self.kept) if self.kept is not None else 0)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": sorted(self.kept) if self.kept is not None else None,
            "rounds": self.rounds,
            "totals": dict(self.totals),
            "last_round_step": self.last_round_step,
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = set(state["kept"]) if state.get("kept") is not None else None
        self.rounds = int(state.get("rounds", 0))
        self.totals = dict(state.get("totals", {}))
        self.last_round_step = int(state.get("last_round_step", -1))
        if "rng" in state:
            rng = state["rng"]
            self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
