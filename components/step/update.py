"""The update half of a training step: kept rollouts -> a token batch -> advantages -> mini-batch updates.

Everything here is a function of the batch and the policy; :class:`~components.step.module.PolicyModule`
calls it in this order:

    build_batch(groups)                      ragged groups -> padded (N, C + R) rows, vectorised
    compute_advantages(batch, ...)           registered estimator x group weight x rollout weight
    Updater.run(batch, module)               old/ref log-probs once per batch, then
                                             ppo_epochs x num_minibatches shuffled mini-batches, each
                                             one optimizer update accumulated over micro-batches with
                                             exact aggregation

The module keeps the Lightning side (``manual_backward``, gradient clipping, the optimizer step
through the strategy), which :class:`Updater` reaches through the module it is given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from components.algos.losses import kl_k3, token_logprobs_and_entropy
from components.types import Group


@dataclass
class AdvantageConfig:
    """Which estimator (``grpo``, ``dr_grpo``, ``rloo``, ``pool_mean``) and its options."""

    name: str = "grpo"
    std: str = "population"  # "population" (N) or "unbiased" (N - 1), for grpo
    eps: float = 1e-6
    normalize_std: bool = False  # pool_mean only: divide by sqrt(p~(1 - p~))


@dataclass
class LossConfig:
    """Policy loss and its aggregation, KL and entropy terms."""

    name: str = "ppo_clip"
    agg: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # e.g. 3.0 or 10.0: caps the loss of negative-advantage tokens
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy of the policy (k3 estimator)
    entropy_coef: float = 0.0
    norm_len: int | None = None  # seq-mean-token-sum-norm divisor; default: max_new_tokens
    # Truncated importance sampling: multiply each token's policy-gradient term by
    # min(exp(old - sampling log-prob), tis_cap) (TRL / verl use 2-3). None: off.
    tis_cap: float | None = None


@dataclass
class TokenBatch:
    """The flattened rollouts that reach the loss: one row per rollout, ragged groups by index."""

    input_ids: torch.Tensor  # (N, C + R): left-padded context, right-padded response
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # (N, R) 1 on response tokens (EOS included)
    context_width: int
    group: torch.Tensor  # (N,) group index
    rewards: torch.Tensor  # (N,)
    group_weight: torch.Tensor  # (N,) prompt weight w(p) of each rollout's group
    row_weight: torch.Tensor  # (N,) per-rollout weight (Rollout.weight), 1 unless a sampler sets it
    baseline: torch.Tensor  # (G,) per-group baseline, NaN = estimator's own
    sampling_logprobs: torch.Tensor  # (N, R) from the engine
    advantages: torch.Tensor | None = None  # (N, R) per token
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Start of each segment in the concatenation of segments of these lengths."""
    return torch.cumsum(lengths, 0) - lengths


def build_batch(groups: list[Group], pad_id: int, device: torch.device | str = "cpu") -> TokenBatch:
    """Flatten ragged groups into padded tensors; each row keeps the context it was sampled from.

    Vectorised: the token lists are concatenated once and scattered into place with index
    arithmetic (one tensor per field, none per row). Contexts are left-padded to the widest, so
    every response starts at column ``context_width``; responses are right-padded.
    """
    rollouts = [r for g in groups for r in g.rollouts]
    sizes = torch.tensor([g.size for g in groups], dtype=torch.long)
    n = len(rollouts)
    group = torch.repeat_interleave(torch.arange(len(groups)), sizes)

    # Contexts: one left-padded row per group, gathered to its rollouts.
    ctx_len = torch.tensor([len(g.context_ids) for g in groups], dtype=torch.long)
    cw = int(ctx_len.max())
    ctx_flat = torch.tensor(list(chain.from_iterable(g.context_ids for g in groups)), dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(groups)), ctx_len)
    col = cw - ctx_len[seg] + (torch.arange(len(ctx_flat)) - _offsets(ctx_len)[seg])
    gctx = torch.full((len(groups), cw), pad_id, dtype=torch.long)
    gatt = torch.zeros((len(groups), cw), dtype=torch.long)
    gctx[seg, col] = ctx_flat
    gatt[seg, col] = 1

    # Responses: right-padded, scattered from one flat list.
    resp_len = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.long)
    rw = max(int(resp_len.max()) if n else 0, 1)
    tok_flat = torch.tensor(list(chain.from_iterable(r.token_ids for r in rollouts)), dtype=torch.long)
    lp_flat = torch.tensor(list(chain.from_iterable(r.logprobs for r in rollouts)), dtype=torch.float)
    rseg = torch.repeat_interleave(torch.arange(n), resp_len)
    rcol = torch.arange(len(tok_flat)) - _offsets(resp_len)[rseg]
    resp = torch.full((n, rw), pad_id, dtype=torch.long)
    rmask = torch.zeros((n, rw))
    slp = torch.zeros((n, rw))
    resp[rseg, rcol] = tok_flat
    rmask[rseg, rcol] = 1.0
    slp[rseg, rcol] = lp_flat

    ids = torch.cat([gctx[group], resp], 1)
    att = torch.cat([gatt[group], rmask.long()], 1)
    return TokenBatch(
        input_ids=ids.to(device),
        attention_mask=att.to(device),
        response_mask=rmask.to(device),
        context_width=cw,
        group=group,
        rewards=torch.tensor([r.reward for r in rollouts], dtype=torch.float),
        group_weight=torch.tensor([g.weight for g in groups], dtype=torch.float)[group],
        row_weight=torch.tensor([r.weight for r in rollouts], dtype=torch.float),
        baseline=torch.tensor([math.nan if g.baseline is None else g.baseline for g in groups], dtype=torch.double),
        sampling_logprobs=slp.to(device),
    )


def compute_advantages(batch: TokenBatch, advantage_fn: Callable[..., torch.Tensor], cfg: AdvantageConfig) -> torch.Tensor:
    """Sequence advantages (a pure function of rewards, group index, baselines), times the group
    weight and the rollout's own weight, broadcast to the response tokens."""
    seq = advantage_fn(
        batch.rewards, batch.group, baseline=batch.baseline, std=cfg.std, eps=cfg.eps, normalize_std=cfg.normalize_std
    )
    if not torch.isfinite(seq).all():
        raise RuntimeError(f"non-finite advantages from estimator {cfg.name!r}: rewards={batch.rewards.tolist()}")
    seq = seq * batch.group_weight * batch.row_weight
    return seq.to(batch.response_mask.device).unsqueeze(1) * batch.response_mask


def forward_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    rows: torch.Tensor,
    temperature: float = 1.0,
    shared_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-token log-probs and entropies ``(len(rows), R)`` of the response tokens of ``rows``
    under ``model``, and the number of tokens the forward pass processed.

    Columns that no row of ``rows`` uses (context padding on the left, response padding on the
    right) are cut before the forward and the outputs padded back with zeros, and the output head
    runs on response positions only. With ``shared_prompt`` the context of each group in ``rows``
    is forwarded once (see :func:`shared_prompt_logits`); otherwise every row is forwarded whole.
    """
    cw, rw = batch.context_width, batch.response_mask.shape[1]
    att = batch.attention_mask[rows]
    c0 = cw - int(att[:, :cw].sum(-1).max())  # first context column any row uses
    r1 = max(int(att[:, cw:].sum(-1).max()), 1)  # widest response among the rows
    ids, att = batch.input_ids[rows][:, c0 : cw + r1], att[:, c0 : cw + r1]
    c = cw - c0
    # Gradient checkpointing turns the KV cache off in training: forward whole rows then.
    if shared_prompt and not getattr(model, "is_gradient_checkpointing", False):
        logits, n_tok = shared_prompt_logits(model, ids, att, c, batch.group[rows])
    else:
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        # Logits at position t predict token t+1: the response's are at c - 1 ... c + r1 - 2.
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=r1 + 1).logits[:, :-1]
        n_tok = int(att.sum())
    logp, ent = token_logprobs_and_entropy(logits, ids[:, c:], temperature or 1.0)
    if r1 < rw:
        logp, ent = (torch.nn.functional.pad(x, (0, rw - r1)) for x in (logp, ent))
    return logp, ent, n_tok


def shared_prompt_logits(
    model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, c: int, group: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Logits predicting each response token, forwarding each group's shared context once.

    ``ids``/``att`` are ``(n, c + r)`` rows (left-padded context of width ``c``, right-padded
    response); rows of one ``group`` share their context (``build_batch`` gives every rollout of a
    group the group's ``context_ids``). One forward over the distinct contexts, with gradient,
    fills a KV cache; the cache is indexed out to the rows (its backward sums each row's gradient
    into its group's context), and the responses are forwarded on top of it. The result equals the
    plain forward's up to float rounding (``tests/test_update.py``), for a fraction of the work
    when responses are short next to contexts. Returns ``(n, r, V)`` logits and the tokens forwarded.
    """
    g = group.to("cpu")
    uniq, inv = torch.unique(g, return_inverse=True)
    first = torch.empty(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(len(g)))
    inv, first = inv.to(ids.device), first.to(ids.device)
    p_ids, p_att = ids[first, :c], att[first, :c]
    p_pos = (p_att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=p_ids, attention_mask=p_att, position_ids=p_pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_select_indices(inv)
    r = ids.shape[1] - c
    r_pos = p_att.sum(-1, keepdim=True)[inv] + torch.arange(r, device=ids.device)
    logits = model(input_ids=ids[:, c:], attention_mask=att, position_ids=r_pos, past_key_values=cache).logits
    logits = torch.cat([out.logits[:, -1:][inv], logits[:, :-1]], 1)
    return logits, int(p_att.sum()) + int(att[:, c:].sum())


def truncated_is_weight(old_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weight ``min(exp(old - sampling), cap)`` per token, detached.

    Corrects for the engine sampling from a slightly different distribution than the trainer's
    (vLLM's kernels, bf16): the policy-gradient term of each token is multiplied by it (TRL's
    ``vllm_importance_sampling_correction``, verl's TIS). ``old`` is the trainer's log-prob of
    the token before the update, ``sampling`` the engine's.
    """
    return torch.exp((old_logp - sampling_logp).detach()).clamp(max=cap)


def minibatch_schedule(n: int, ppo_epochs: int, num_minibatches: int) -> list[torch.Tensor]:
    """Row indices of every optimizer update of one generation batch, in order.

    ``ppo_epochs`` passes, each a fresh shuffle split into ``num_minibatches`` near-equal parts
    (empty parts dropped). With one epoch and one mini-batch the rows stay in order.
    """
    reuse = ppo_epochs > 1 or num_minibatches > 1
    out: list[torch.Tensor] = []
    for _epoch in range(ppo_epochs):
        perm = torch.randperm(n) if reuse else torch.arange(n)
        out += [mb for mb in perm.tensor_split(num_minibatches) if len(mb)]
    return out


class _GapStats:
    """|engine sampling log-prob - trainer log-prob| over response tokens, before any update."""

    def __init__(self) -> None:
        self.max, self.sum, self.count = 0.0, 0.0, 0.0

    def add(self, trainer_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> None:
        gap = (trainer_logp.detach() - sampling_logp).abs() * mask
        self.max = max(self.max, float(gap.max())) if gap.numel() else self.max
        self.sum += float(gap.sum())
        self.count += float(mask.sum())

    def metrics(self) -> dict[str, float]:
        return {"rollout/logprob_gap_max": self.max, "rollout/logprob_gap_mean": self.sum / max(self.count, 1.0)}


class Updater:
    """PPO epochs x mini-batches of clipped-surrogate updates with exact aggregation over
    micro-batches.

    Each mini-batch is one optimizer update; its aggregate's denominators (tokens, or sequences)
    are those of the whole mini-batch, and every micro-batch contributes its share, so the
    accumulated gradient equals one forward/backward over the mini-batch. With more than one update
    per batch, old log-probs are recorded once per generation batch before the policy moves: the
    first update's rows from that update's own forward, every other row by one no-grad pass.

    Rows whose advantage is zero on every token have exactly zero policy-loss gradient, so when
    there is no KL or entropy term (which would give them one) they are left out of the
    forward/backward pass (``skip_zero_advantage``), while still counting in the denominators: the
    same gradient for a fraction of the compute. Skipped rows never reach
    :meth:`~components.callbacks.base.SignalCallback.on_micro_batch`.

    Logs ``rollout/logprob_gap_max`` / ``_mean`` (the engine's sampling log-probs against the
    trainer's before any update: over every row when old log-probs are recorded, else over the
    rows that are forwarded) and, with ``loss.tis_cap``, ``rollout/tis_weight_mean`` and
    ``rollout/tis_capped_frac``.
    """

    def __init__(
        self,
        loss_cfg: LossConfig,
        aggregate: Callable[..., torch.Tensor],
        policy_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
        ppo_epochs: int,
        num_minibatches: int,
        micro_batch_rows: int,
        skip_zero_advantage: bool,
    ) -> None:
        self.loss_cfg, self.aggregate, self.policy_loss = loss_cfg, aggregate, policy_loss
        self.ppo_epochs, self.num_minibatches, self.micro_batch_rows = ppo_epochs, num_minibatches, micro_batch_rows
        self.skip_zero_advantage = skip_zero_advantage

    @property
    def reuses_batch(self) -> bool:
        """More than one update per generation batch: old log-probs must be recorded first."""
        return self.ppo_epochs > 1 or self.num_minibatches > 1

    def run(self, batch: TokenBatch, module: Any, callbacks: list[Any] = ()) -> dict[str, float]:
        """All updates of one generation batch; returns the step's loss, policy and cost metrics.

        ``callbacks``: signal callbacks whose ``on_micro_batch`` sees every forwarded micro-batch.
        """
        lc = self.loss_cfg
        opt = module.optimizers()
        n = batch.size
        # Under FSDP every rank must run the same number of forwards (each all-gathers the shards),
        # and which rows have a zero advantage differs by rank: the skip is single-device only.
        trainer = getattr(module, "_trainer", None)
        sharded = trainer is not None and trainer.world_size > 1
        skip = self.skip_zero_advantage and lc.kl_coef == 0 and lc.entropy_coef == 0 and not sharded
        runs = (batch.advantages != 0).any(-1).cpu() if skip else torch.ones(n, dtype=torch.bool)
        gap = _GapStats()
        minibatches = minibatch_schedule(n, self.ppo_epochs, self.num_minibatches)
        fill_old = None
        if self.reuses_batch:
            # The first update forwards its rows before the policy has moved: their log-probs there
            # are the old ones, recorded as they pass. Only the other rows need a no-grad pass.
            fill_old = torch.zeros(n, dtype=torch.bool)
            fill_old[minibatches[0][runs[minibatches[0]]]] = True
            batch.old_logprobs = torch.zeros_like(batch.response_mask)
            rest = (~fill_old).nonzero().squeeze(-1)
            if len(rest):
                batch.old_logprobs[rest] = module.token_logprobs(batch, rest)[0]
                gap.add(batch.old_logprobs[rest], batch.sampling_logprobs[rest], batch.response_mask[rest])
        if module.ref_policy is not None:
            batch.ref_logprobs = module.token_logprobs(batch, model=module.ref_policy)[0]
        mask = batch.response_mask
        norm_len = lc.norm_len or module.sampling.max_new_tokens
        stats: dict[str, list[float]] = defaultdict(list)
        for update, mb in enumerate(minibatches, start=1):
            tok_den = mask[mb].sum().clamp(min=1)  # the aggregate's denominators: the whole mini-batch
            seq_den = (mask[mb].sum(-1) > 0).sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            to_run = mb[runs[mb]]
            for rows in to_run.split(self.micro_batch_rows) if len(to_run) else ():  # split() of nothing gives one empty chunk
                loss = self.micro_loss(module, batch, rows, tok_den, seq_den, norm_len, stats, gap, callbacks, fill_old)
                module.manual_backward(loss)
            module.optimizer_update(opt, last=update == len(minibatches))
            fill_old = None  # recorded by the first update's forwards
        if not stats:  # no row had a non-zero advantage: the loss was exactly 0
            stats = {"loss/policy": [0.0], "loss/kl": [0.0], "policy/clip_frac": [0.0]}
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(gap.metrics())
        out["budget/optimizer_steps"] = float(len(minibatches))
        return out

    def micro_loss(
        self,
        module: Any,
        batch: TokenBatch,
        rows: torch.Tensor,
        tok_den: torch.Tensor,
        seq_den: torch.Tensor,
        norm_len: int,
        stats: dict[str, list[float]],
        gap: _GapStats | None = None,
        callbacks: list[Any] = (),
        fill_old: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This micro-batch's share of its mini-batch's loss (backward of the sum of shares is exact).

        ``fill_old`` marks rows whose old log-probs are recorded from this forward (the policy has
        not moved yet); with one update per batch there are no stored old log-probs at all."""
        lc = self.loss_cfg
        logp, entropy = module._forward_logprobs(module.policy, batch, rows)
        mask = batch.response_mask[rows]
        adv = batch.advantages[rows]
        if batch.old_logprobs is None or (fill_old is not None and bool(fill_old[rows].all())):
            old = logp.detach()  # before the batch's first update: these are the old log-probs
            if batch.old_logprobs is not None:
                batch.old_logprobs[rows] = old
            if gap is not None:
                gap.add(old, batch.sampling_logprobs[rows], mask)
        else:
            old = batch.old_logprobs[rows]
        for cb in callbacks:  # per-micro-batch reshaping with the real ratio (DynaMO's authors' form)
            adv = cb.on_micro_batch(logp.detach(), old, entropy.detach(), adv, mask, module)
        pg, info = self.policy_loss(logp, old, adv, mask, clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip)
        if lc.tis_cap is not None:
            w = truncated_is_weight(old, batch.sampling_logprobs[rows], lc.tis_cap)
            pg = pg * w
        total = pg
        kl = None
        if batch.ref_logprobs is not None:
            kl = kl_k3(logp, batch.ref_logprobs[rows])
            total = total + lc.kl_coef * kl
        if lc.entropy_coef:
            total = total - lc.entropy_coef * entropy
        # Each micro-batch's share of the mini-batch aggregate, so accumulation is exact.
        share = mask.sum() / tok_den if lc.agg == "token-mean" else (mask.sum(-1) > 0).sum() / seq_den
        loss = self.aggregate(total, mask, norm_len=norm_len) * share
        with torch.no_grad():
            ntok = mask.sum().clamp(min=1)
            stats["loss/policy"].append(float(self.aggregate(pg, mask, norm_len=norm_len)))
            stats["policy/entropy"].append(float((entropy * mask).sum() / ntok))
            stats["policy/clip_frac"].append(float((info["clipped"] * mask).sum() / ntok))
            stats["policy/dual_clip_frac"].append(float((info["dual_clipped"] * mask).sum() / ntok))
            stats["policy/ratio_mean"].append(float((info["ratio"] * mask).sum() / ntok))
            stats["loss/kl"].append(float((kl * mask).sum() / ntok) if kl is not None else 0.0)
            if lc.tis_cap is not None:
                stats["rollout/tis_weight_mean"].append(float((w * mask).sum() / ntok))
                stats["rollout/tis_capped_frac"].append(float(((w >= lc.tis_cap) * mask).sum() / ntok))
        return loss
