"""GVM allocation: rollouts in proportion to G_i / sqrt(p_i + α / p_i^(β-1)).

Paper: Yao et al., "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in
Rejection Sampling and RL" (arXiv 2505.02391); code ``RLHFlow/GVM`` (``em/stage_2_calc_sample_size.py``
``calc_sample_ratio``, ``em/stage_2_calc_acceptRates_grads.py`` ``calc_grad_logp``), reference §7.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from components.algos.batch import build_batch
from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.allocation import AllocationSampler, Plan, by_uid, largest_remainder
from components.samplers.base import make_group
from components.types import Group, Prompt, Rollout


def gvm_ratio(g: float, p: float, alpha: float = 1e-3, beta: float = 2.0) -> float:
    """``G / sqrt(p + α / p^(β-1))``; 0 when ``p <= 0`` or ``G <= 0`` (the code's rule)."""
    if p <= 0 or g <= 0:
        return 0.0
    return g / math.sqrt(p + alpha / p ** (beta - 1.0))


def embedding_grad_norms(handle: StepHandle, prompt: Prompt, context_ids: list[int], rollouts: list[Rollout]) -> list[float]:
    """``||∇_E (-Σ_t log π(y_t | x, y_<t))||_2`` per rollout, E the input-embedding matrix.

    Uses the step's own batching and log-prob path (``build_batch`` / ``handle.logprobs``), one
    forward for all rows and one ``torch.autograd.grad`` per row with respect to the embedding weight
    only. ``autograd.grad`` never writes ``.grad``, so the optimizer's state and any pending gradients
    are untouched; the embedding's ``.grad`` and ``requires_grad`` and the model's train/eval mode are
    restored anyway. Single-device only (a sharded embedding would need a gather).
    """
    if not rollouts:
        return []
    policy = handle.policy
    weight = policy.get_input_embeddings().weight
    saved_grad, saved_req, was_training = weight.grad, weight.requires_grad, policy.training
    group = Group(prompt=prompt, context_ids=list(context_ids), rollouts=list(rollouts))
    batch = build_batch([group], handle.tokenizer.pad_token_id, handle.device)
    norms: list[float] = []
    try:
        policy.eval()
        weight.requires_grad_(True)
        with torch.enable_grad():
            logp, _ = handle.logprobs(batch, torch.arange(batch.size), policy, grad=True)
            nll = -(logp * batch.response_mask).sum(-1)
            for j in range(batch.size):
                (g,) = torch.autograd.grad(nll[j], weight, retain_graph=j < batch.size - 1)
                norms.append(float(g.float().norm()))
    finally:
        weight.requires_grad_(saved_req)
        weight.grad = saved_grad
        policy.train(was_training)
    return norms


class GVMSampler(AllocationSampler):
    """GVM allocation: ``n_i ∝ G_i / sqrt(p_i + α / p_i^(β-1))`` (α = 1e-3, β = 2: ``G / sqrt(p + α/p)``).

    - ``p_i``: the prompt's pass rate from its history (counts decayed by ``decay`` per visit,
      keyed by the stable uid), plus this step's pilot rollouts when ``pilot > 0``. GVM itself
      estimates p from 8 fresh stage-1 samples per prompt; ``pilot: 8`` with ``decay: 0`` is that
      (at the cost of the whole budget), a smaller pilot plus history is the cheap middle.
    - ``G_i``: mean over accepted (``passed``) rollouts of the gradient norm of the sequence NLL with
      respect to the input-embedding matrix only, computed with the real policy (see
      :func:`embedding_grad_norms`). At most ``grad_samples`` accepted rollouts per prompt (in
      generation order); cached per uid and recomputed when older than ``refresh_every`` steps, from
      the pilot rollouts (before allocating) or else from the step's rollouts (used at later visits).
      Prompts with no G yet get the mean G of the batch's known prompts (of the whole cache if none;
      1 if the cache is empty).
    - Prompts with no history (and no pilot) get the mean ratio of the batch's known prompts
      (uniform if none is known).
    - Integerisation: floor ``n_min`` each, the rest in proportion to the ratio by largest remainder,
      summing exactly to ``rollouts_per_prompt x B`` (GVM's budget: stage-1 samples x prompts).

    ``p_i = 0`` gives ratio 0. GVM drops such prompts (n = 0): ``zero_budget_unsolved: true`` does
    that (their floor becomes 0; they still receive rollouts if every other prompt is at ``n_max``,
    because the budget is always spent). The default ``false`` keeps the floor ``n_min``, so a prompt
    that once looked unsolvable can still be re-estimated and learned (GVM's choice never trains on
    hard prompts, reference §7f).

    Choices where the reference is [UNVERIFIED] or the setting differs: the paper's exact
    Proposition 1 form (α, β) is unverified, the code's form is used; allocation is online per step
    (GVM recomputes once per EM iteration from a fresh data shard); p from decayed history or a
    pilot instead of a separate stage-1 pass; ``grad_samples`` caps the backward passes (GVM uses all
    accepted stage-1 samples); the gradient uses the policy's sampling temperature, like the loss.
    Without a policy on the handle (scripted unit-test handles) G is not computed and every prompt
    gets the mean G.

    **The authors' form** (``shards: k``; ``RLHFlow/GVM`` ``em/run_em.sh``, reference §7b): the
    training pool (the data module's ``train_pool``, shuffled once with ``shard_seed``) is split into
    ``k`` contiguous *shards* of ``ceil(|pool| / k)`` prompts, visited in turn (shard 0, 1, ..., k-1,
    0, ...: one EM iteration per shard, as GVM's ``numina_math_t``). When a shard starts, every one
    of its prompts gets ``stage1`` fresh *estimation* samples from the current policy; they are used
    for p_i (= passes / stage1, no history) and G_i (accepted ones, at most ``grad_samples``) and are
    **not trained on**. The allocation ``n_i ∝ G_i / sqrt(p_i + α/p_i)`` is normalised over the
    whole shard to ``rollouts_per_prompt x |shard|``, with no floor and no cap (p_i = 0 gives 0);
    each step then trains on the shard's next B prompts (B = the step's batch size; the data
    module's own draw only sets B) with their n_i, skipping prompts with n_i = 0, so a step's
    rollouts vary around ``rollouts_per_prompt x B``. Estimation samples are drawn through
    ``handle.sample``, so they are in ``budget/rollouts`` and ``budget/tokens`` (the compute spent), and
    also in ``budget/estimation_rollouts`` / ``budget/estimation_tokens`` (and the sampler's
    cumulative ``gvm/cum_estimation_tokens``): the authors' training-token count is
    ``budget/tokens - budget/estimation_tokens``. Requires ``n_min: 0``, ``n_max: null``,
    ``pilot: 0`` and no ``budget``. ``shards: null`` (default) is the online form above.

    Metrics (``gvm/``): the allocation summary of :class:`AllocationSampler` plus ``G_mean`` (over the
    batch's prompts with a G), ``G_known_frac``, ``p_mean`` (known p), ``unsolved_frac`` (known p = 0),
    ``unseen_frac``, ``grad_refreshed`` (prompts whose G was recomputed this step) and ``grad_time_s``.

    Args:
        rollouts_per_prompt, budget, n_min, n_max, pilot: see :class:`AllocationSampler`.
        alpha, beta: the regulariser of the ratio's denominator.
        zero_budget_unsolved: give prompts with p = 0 a floor of 0 (GVM's behaviour).
        refresh_every: recompute a prompt's G when its cached value is this many steps old (``handle.step``, the
            trainer's global step: one per generation batch).
        grad_samples: accepted rollouts per prompt used for G (>= 1).
        decay: the EMA factor applied to a prompt's counts at each visit (1: cumulative, 0: this visit only).
        shards: the authors' form: split the pool into this many shards visited in turn (null: online).
        stage1: estimation samples per prompt at the start of each shard (authors: 8).
        shard_seed: seed of the one shuffle of the pool before it is split.
    """

    prefix = "gvm"

    def __init__(
        self,
        rollouts_per_prompt: int = 8,
        budget: int | None = None,
        n_min: int = 1,
        n_max: int | None = None,
        pilot: int = 0,
        alpha: float = 1e-3,
        beta: float = 2.0,
        zero_budget_unsolved: bool = False,
        refresh_every: int = 10,
        grad_samples: int = 4,
        decay: float = 0.9,
        shards: int | None = None,
        stage1: int = 8,
        shard_seed: int = 0,
    ) -> None:
        super().__init__(rollouts_per_prompt=rollouts_per_prompt, budget=budget, n_min=n_min, n_max=n_max, pilot=pilot)
        f = "model.sampler."
        if not alpha >= 0:
            raise ConfigError(f + "alpha", f"must be >= 0, got {alpha}")
        if not beta >= 1:
            raise ConfigError(f + "beta", f"must be >= 1 (the denominator is p + alpha / p^(beta - 1)), got {beta}")
        if refresh_every < 1:
            raise ConfigError(f + "refresh_every", f"must be >= 1 step, got {refresh_every}")
        if grad_samples < 1:
            raise ConfigError(f + "grad_samples", f"must be >= 1, got {grad_samples}")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f + "decay", f"must be in [0, 1], got {decay}")
        if shards is not None:
            if shards < 1:
                raise ConfigError(f + "shards", f"must be >= 1 or null (the online form), got {shards}")
            if stage1 < 1:
                raise ConfigError(f + "stage1", f"must be >= 1 estimation samples per prompt, got {stage1}")
            for name, val, want in (("n_min", n_min, 0), ("n_max", n_max, None), ("pilot", pilot, 0), ("budget", budget, None)):
                if val != want:
                    raise ConfigError(f + name, f"must be {want} with shards (the authors' form: no floor, no cap), got {val}")
        self.shards, self.stage1, self.shard_seed = shards, stage1, shard_seed
        self.shard_index = -1  # the shard being trained on (-1: none started)
        self.shard_uids: list[str] = []  # its prompts, in visiting order
        self.cursor = 0  # position of the next prompt in the shard
        self.shard_alloc: dict[str, int] = {}  # uid -> n_i for the current shard
        self.shard_rates: dict[str, float] = {}  # uid -> p_i from the stage-1 samples
        self.estimation = [0, 0]  # cumulative [rollouts, tokens] of stage-1 samples
        self.alpha, self.beta, self.zero_budget_unsolved = alpha, beta, zero_budget_unsolved
        self.refresh_every, self.grad_samples, self.decay = refresh_every, grad_samples, decay
        self.counts: dict[str, list[float]] = {}  # uid -> [n, k], EMA-decayed
        self.grads: dict[str, list[float]] = {}  # uid -> [G, step it was computed at]
        self._refreshed: set[str] = set()  # uids whose G was recomputed this step
        self._grad_time = 0.0

    def setup(self, handle: StepHandle) -> None:
        try:
            _ = handle.policy.get_input_embeddings().weight
        except Exception as e:  # any failure means G cannot be computed
            raise ConfigError("model.model", f"GVM needs a policy with get_input_embeddings().weight ({e})") from e

    # ---- G, the gradient-norm estimate ----------------------------------------------------------
    def _stale(self, uid: str, step: int) -> bool:
        got = self.grads.get(uid)
        return got is None or step - int(got[1]) >= self.refresh_every

    def _refresh_grads(self, prompts: list[Prompt], outs: list[list[Rollout]], handle: StepHandle) -> None:
        if getattr(handle, "policy", None) is None:
            return
        t0 = time.perf_counter()
        for p, rs in zip(prompts, outs, strict=True):
            if p.uid in self._refreshed or not self._stale(p.uid, handle.step):
                continue
            accepted = [r for r in rs if r.passed][: self.grad_samples]
            if not accepted:
                continue
            norms = embedding_grad_norms(handle, p, handle.context_of(p), accepted)
            self.grads[p.uid] = [sum(norms) / len(norms), int(handle.step)]
            self._refreshed.add(p.uid)
        self._grad_time += time.perf_counter() - t0

    def _mean_g(self, prompts: list[Prompt]) -> float:
        known = [self.grads[p.uid][0] for p in prompts if p.uid in self.grads]
        if not known:
            known = [g for g, _ in self.grads.values()]
        return sum(known) / len(known) if known else 1.0

    # ---- AllocationSampler hooks ----------------------------------------------------------------
    def plan(self, prompts: list[Prompt], handle: StepHandle, pilot: list[list[Rollout]] | None) -> Plan:
        self._refreshed, self._grad_time = set(), 0.0
        if pilot is not None:
            self._refresh_grads(prompts, pilot, handle)
        rates: list[float | None] = []
        pooled = by_uid(prompts, pilot) if pilot is not None else {}
        for p in prompts:
            n, k = self.counts.get(p.uid, (0.0, 0.0))
            if p.uid in pooled:
                extra = pooled[p.uid]
                n, k = self.decay * n + len(extra), self.decay * k + sum(r.passed for r in extra)
            rates.append(k / n if n > 0 else None)
        g_mean = self._mean_g(prompts)
        g_used = [self.grads[p.uid][0] if p.uid in self.grads else g_mean for p in prompts]
        ratios = [
            None if rate is None else gvm_ratio(g, rate, self.alpha, self.beta) for g, rate in zip(g_used, rates, strict=True)
        ]
        known = [r for r in ratios if r is not None]
        fill = sum(known) / len(known) if known else 1.0
        shares = [fill if r is None else r for r in ratios]
        floors = None
        if self.zero_budget_unsolved:
            floors = [0 if rate is not None and rate <= 0 else self.n_min for rate in rates]
        b = len(prompts)
        handle.log("gvm/G_mean", sum(g_used) / b)
        handle.log("gvm/G_known_frac", sum(p.uid in self.grads for p in prompts) / b)
        handle.log("gvm/unseen_frac", sum(rate is None for rate in rates) / b)
        handle.log("gvm/unsolved_frac", sum(rate is not None and rate <= 0 for rate in rates) / b)
        seen = [rate for rate in rates if rate is not None]
        if seen:
            handle.log("gvm/p_mean", sum(seen) / len(seen))
        return Plan(shares=shares, pass_rates=rates, floors=floors)

    def observe(self, prompts: list[Prompt], outs: list[list[Rollout]], handle: StepHandle) -> None:
        for uid, rs in by_uid(prompts, outs).items():  # one visit per uid, even if it occurs twice in the batch
            n, k = self.counts.get(uid, (0.0, 0.0))
            self.counts[uid] = [self.decay * n + len(rs), self.decay * k + float(sum(r.passed for r in rs))]
        self._refresh_grads(prompts, outs, handle)
        handle.log("gvm/grad_refreshed", len(self._refreshed))
        handle.log("gvm/grad_time_s", self._grad_time)

    # ---- the authors' form: stage-1 estimation per data shard -----------------------------------
    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        if self.shards is None:
            return super().collect(prompts, handle)
        if not prompts:
            return []
        pool = self._pool(handle)
        if self.shard_index < 0 or self.cursor >= len(self.shard_uids):
            self._start_shard(pool, handle)
        take = [pool[u] for u in self.shard_uids[self.cursor : self.cursor + len(prompts)]]
        self.cursor += len(take)
        n_each = [self.shard_alloc[p.uid] for p in take]
        outs = self._sample(handle, take, n_each)
        groups = []
        for p, rs in zip(take, outs, strict=True):
            if rs:
                g = make_group(p, handle.context_of(p), rs)
                g.meta["alloc_n"] = len(rs)
                groups.append(g)
        self.observe(take, outs, handle)
        self.last_allocation = {p.uid: n for p, n in zip(take, n_each, strict=True)}
        self._log_allocation(handle, n_each, [self.shard_rates[p.uid] for p in take], outs, sum(n_each))
        handle.log("gvm/shard", self.shard_index)
        handle.log("gvm/cum_estimation_tokens", self.estimation[1])
        return groups

    def _pool(self, handle: StepHandle) -> dict[str, Prompt]:
        """The training pool by uid (``handle.train_prompts()``)."""
        prompts = handle.train_prompts()
        if not prompts:
            raise ConfigError("model.sampler.shards", "the authors' GVM form needs a training pool (data.train_size > 0)")
        return {p.uid: p for p in prompts}

    def shard_of(self, uids: list[str], index: int) -> list[str]:
        """Shard ``index`` of the pool: a seeded shuffle of the (sorted) uids, split into k contiguous parts."""
        order = sorted(uids)
        gen = torch.Generator().manual_seed(self.shard_seed)
        order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
        size = math.ceil(len(order) / self.shards)
        return order[index * size : (index + 1) * size]

    def _start_shard(self, pool: dict[str, Prompt], handle: StepHandle) -> None:
        """Next shard: stage-1 samples for all its prompts (not trained on), then its allocation."""
        for _ in range(self.shards):  # a shard may be empty when k > |pool|: skip it
            self.shard_index = (self.shard_index + 1) % self.shards
            self.shard_uids, self.cursor = self.shard_of(list(pool), self.shard_index), 0
            if self.shard_uids:
                break
        prompts = [pool[u] for u in self.shard_uids]
        outs = handle.sample(prompts, [self.stage1] * len(prompts))
        n_roll, n_tok = sum(len(rs) for rs in outs), sum(len(r.token_ids) for rs in outs for r in rs)
        self.estimation = [self.estimation[0] + n_roll, self.estimation[1] + n_tok]
        add = getattr(handle, "add_metrics", None)  # per-step sums beside budget/tokens
        if callable(add):
            add({"budget/estimation_rollouts": n_roll, "budget/estimation_tokens": n_tok})
        else:
            handle.log("budget/estimation_rollouts", n_roll)
            handle.log("budget/estimation_tokens", n_tok)
        self._refreshed, self._grad_time = set(), 0.0
        for p in prompts:  # every prompt's G is re-estimated from this shard's samples
            self.grads.pop(p.uid, None)
        self._refresh_grads(prompts, outs, handle)
        self.shard_rates = {p.uid: sum(r.passed for r in rs) / len(rs) for p, rs in zip(prompts, outs, strict=True)}
        g_mean = self._mean_g(prompts)
        ratios = [
            gvm_ratio(self.grads[p.uid][0] if p.uid in self.grads else g_mean, self.shard_rates[p.uid], self.alpha, self.beta)
            for p in prompts
        ]
        n = largest_remainder(ratios, self.rollouts_per_prompt * len(prompts), field="model.sampler.rollouts_per_prompt")
        self.shard_alloc = {p.uid: k for p, k in zip(prompts, n, strict=True)}
        handle.log("gvm/shard_prompts", len(prompts))
        handle.log("gvm/shard_zero_budget_frac", sum(k == 0 for k in n) / len(n))
        handle.log("gvm/grad_time_s", self._grad_time)

    # ---- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": {uid: [float(n), float(k)] for uid, (n, k) in self.counts.items()},
            "grads": {uid: [float(g), int(s)] for uid, (g, s) in self.grads.items()},
            "shard": {
                "index": int(self.shard_index),
                "uids": list(self.shard_uids),
                "cursor": int(self.cursor),
                "alloc": {u: int(k) for u, k in self.shard_alloc.items()},
                "rates": {u: float(r) for u, r in self.shard_rates.items()},
                "estimation": [int(x) for x in self.estimation],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(uid): [float(n), float(k)] for uid, (n, k) in state.get("counts", {}).items()}
        self.grads = {str(uid): [float(g), int(s)] for uid, (g, s) in state.get("grads", {}).items()}
        sh = state.get("shard", {})
        self.shard_index, self.cursor = int(sh.get("index", -1)), int(sh.get("cursor", 0))
        self.shard_uids = [str(u) for u in sh.get("uids", [])]
        self.shard_alloc = {str(u): int(k) for u, k in sh.get("alloc", {}).items()}
        self.shard_rates = {str(u): float(r) for u, r in sh.get("rates", {}).items()}
        self.estimation = [int(x) for x in sh.get("estimation", [0, 0])]
