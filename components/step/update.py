"""The update half of a training step: kept rollouts -> a token batch -> advantages -> mini-batch updates.

Everything here is a function of the batch, the handle and the configs; the module calls it in
this order:

    build_batch(groups)                      ragged groups -> padded (N, C + R) rows (components.algos.batch)
    compute_advantages(batch, cfg)           registered estimator x group weight x rollout weight
    Updater.run(batch, handle, optim)        old/ref log-probs once per batch, then
                                             ppo_epochs x num_minibatches shuffled mini-batches, each
                                             one optimizer update accumulated over micro-batches with
                                             exact aggregation (the registered loss gives each
                                             micro-batch's share)

The Lightning side (``manual_backward``, gradient clipping, the optimizer step through the
strategy) stays in the module, which hands the updater an :class:`OptimizerHooks`; the updater sees
the step only through its :class:`~components.handle.StepHandle`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from components.algos.advantages import AdvantageConfig, get_advantage
from components.algos.batch import TokenBatch
from components.algos.losses import LossConfig, LossInputs, get_policy_loss
from components.handle import StepHandle


def compute_advantages(batch: TokenBatch, cfg: AdvantageConfig) -> torch.Tensor:
    """Sequence advantages (the registered estimator ``cfg.name``, a pure function of rewards, group
    index, baselines and ``cfg``), times the group weight and the rollout's own weight, broadcast to
    the response tokens."""
    seq = get_advantage(cfg.name)(batch.rewards, batch.group, batch.baseline, cfg)
    if not torch.isfinite(seq).all():
        raise RuntimeError(f"non-finite advantages from estimator {cfg.name!r}: rewards={batch.rewards.tolist()}")
    seq = seq * batch.group_weight * batch.row_weight
    return seq.to(batch.response_mask.device).unsqueeze(1) * batch.response_mask


@dataclass
class OptimizerHooks:
    """How the update applies its gradients: the module's Lightning side, as plain callables.

    ``step(last)`` clips and applies one optimizer update (``last``: the generation batch's last
    one, which Lightning counts as the global step); ``sharded``: parameters are sharded over
    data-parallel ranks (every rank must then run the same forwards).
    """

    zero_grad: Callable[[], None]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[bool], None]
    sharded: bool = False


def minibatch_schedule(n: int, ppo_epochs: int, num_minibatches: int, group: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of every optimizer update of one generation batch, in order.

    ``ppo_epochs`` passes, each a fresh shuffle split into ``num_minibatches`` near-equal parts
    (empty parts dropped). With one epoch and one mini-batch the rows stay in order.

    With ``group`` (each row's group index) the shuffle is over whole groups, cut where the rows'
    running count is nearest ``k * n / num_minibatches``: each update sees every rollout of its
    groups, side by side, and forwards each group's shared context once (``shared_prompt``)
    instead of once per row. With fewer groups than mini-batches the rows are split instead, so that the number of updates does not change (it is
    ``num_minibatches`` whenever there are at least that many rows).
    """
    reuse = ppo_epochs > 1 or num_minibatches > 1
    out: list[torch.Tensor] = []
    by_group = False
    if group is not None and n and reuse:
        # ids 0..G-1 whatever ids were given, and each group's rows
        _, group, sizes = torch.unique(group.cpu(), return_inverse=True, return_counts=True)
        n_groups = len(sizes)
        by_group = n_groups >= num_minibatches
        members = list(torch.argsort(group, stable=True).split(sizes.tolist()))
    for _epoch in range(ppo_epochs):
        if not by_group:
            perm = torch.randperm(n) if reuse else torch.arange(n)
            out += [mb for mb in perm.tensor_split(num_minibatches) if len(mb)]
            continue
        gperm = torch.randperm(n_groups)
        ends = torch.cumsum(sizes[gperm], 0).double()  # ends[i]: rows up to and including group i
        # The k-th cut falls after the group whose running row count is nearest k * n / parts,
        # among the cuts that leave every part at least one group: always num_minibatches updates,
        # which FSDP needs (every rank runs as many forwards as the others).
        bounds = [0]
        for k in range(1, num_minibatches):
            lo, hi = bounds[-1] + 1, n_groups - (num_minibatches - k)
            bounds.append(lo + int((ends[lo - 1 : hi] - k * n / num_minibatches).abs().argmin()))
        bounds.append(n_groups)
        for a, b in zip(bounds[:-1], bounds[1:]):
            out.append(torch.cat([members[g] for g in gperm[a:b].tolist()]))
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

    ``minibatch_split``: ``group`` (default) makes each mini-batch whole groups (see
    :func:`minibatch_schedule`), ``row`` shuffles single rollouts into mini-batches.

    Rows whose advantage is zero on every token have exactly zero policy-loss gradient, so when
    there is no KL or entropy term (which would give them one) they are left out of the
    forward/backward pass (``skip_zero_advantage``), while still counting in the denominators: the
    same gradient for a fraction of the compute. Skipped rows never reach
    :meth:`~components.callbacks.base.SignalCallback.on_micro_batch`.

    With ``old_from_sampling`` the rows outside the first update take the engine's sampling
    log-probs as their old log-probs instead of a no-grad pass: the same numbers to float rounding
    when the engine samples from the policy itself (the HF engine, top-p 1, each rollout scored on
    the context it was sampled from), so one forward + backward per update is all the step runs.

    Logs ``rollout/logprob_gap_max`` / ``_mean`` (the engine's sampling log-probs against the
    trainer's before any update: over every row when old log-probs are recorded by a pass, else
    over the rows that are forwarded before the first update) and, with ``loss.tis_cap``, ``rollout/tis_weight_mean`` and
    ``rollout/tis_capped_frac``.
    """

    def __init__(
        self,
        loss_cfg: LossConfig,
        ppo_epochs: int = 1,
        num_minibatches: int = 1,
        micro_batch_rows: int = 512,
        skip_zero_advantage: bool = True,
        old_from_sampling: bool = False,
        minibatch_split: str = "group",
    ) -> None:
        self.loss_cfg, self.policy_loss = loss_cfg, get_policy_loss(loss_cfg.name)
        self.ppo_epochs, self.num_minibatches, self.micro_batch_rows = ppo_epochs, num_minibatches, micro_batch_rows
        self.skip_zero_advantage = skip_zero_advantage
        self.old_from_sampling = old_from_sampling
        self.minibatch_split = minibatch_split

    @property
    def reuses_batch(self) -> bool:
        """More than one update per generation batch: old log-probs must be recorded first."""
        return self.ppo_epochs > 1 or self.num_minibatches > 1

    def run(
        self, batch: TokenBatch, handle: StepHandle, optim: OptimizerHooks, callbacks: Sequence[Any] = ()
    ) -> dict[str, float]:
        """All updates of one generation batch; returns the step's loss, policy and cost metrics.

        ``callbacks``: signal callbacks whose ``on_micro_batch`` sees every forwarded micro-batch.
        """
        lc = self.loss_cfg
        n = batch.size
        # Under FSDP every rank must run the same number of forwards (each all-gathers the shards),
        # and which rows have a zero advantage differs by rank: the skip is single-device only.
        skip = self.skip_zero_advantage and lc.kl_coef == 0 and lc.entropy_coef == 0 and not optim.sharded
        runs = (batch.advantages != 0).any(-1).cpu() if skip else torch.ones(n, dtype=torch.bool)
        gap = _GapStats()
        # Under FSDP the rows are split, not the groups: equal row counts then give every rank the
        # same mini-batch sizes, hence the same number of micro-batch forwards (collectives).
        by_group = self.minibatch_split == "group" and not optim.sharded
        minibatches = minibatch_schedule(n, self.ppo_epochs, self.num_minibatches, batch.group if by_group else None)
        fill_old = None
        if self.reuses_batch:
            # The first update forwards its rows before the policy has moved: their log-probs there
            # are the old ones, recorded as they pass. Only the other rows need a no-grad pass.
            fill_old = torch.zeros(n, dtype=torch.bool)
            fill_old[minibatches[0][runs[minibatches[0]]]] = True
            batch.old_logprobs = torch.zeros_like(batch.response_mask)
            rest = (~fill_old).nonzero().squeeze(-1)
            if len(rest) and self.old_from_sampling:
                # The engine's log-probs are the policy's own before any update, to float rounding
                # (checked on the first update's rows: rollout/logprob_gap_*): no extra pass.
                batch.old_logprobs[rest] = batch.sampling_logprobs[rest]
            elif len(rest):
                batch.old_logprobs[rest] = self._logprobs(handle, batch, rest)[0]
                gap.add(batch.old_logprobs[rest], batch.sampling_logprobs[rest], batch.response_mask[rest])
        if handle.ref_policy is not None and lc.kl_coef > 0:
            batch.ref_logprobs = self._logprobs(handle, batch, torch.arange(n), handle.ref_policy)[0]
        mask = batch.response_mask
        norm_len = lc.norm_len or handle.sampling.max_new_tokens
        stats: dict[str, list[float]] = defaultdict(list)
        for update, mb in enumerate(minibatches, start=1):
            tok_den = mask[mb].sum().clamp(min=1)  # the aggregate's denominators: the whole mini-batch
            seq_den = (mask[mb].sum(-1) > 0).sum().clamp(min=1)
            optim.zero_grad()
            to_run = mb[runs[mb]]
            for rows in to_run.split(self.micro_batch_rows) if len(to_run) else ():  # split() of nothing gives one empty chunk
                loss = self.micro_loss(handle, batch, rows, tok_den, seq_den, norm_len, stats, gap, callbacks, fill_old)
                optim.backward(loss)
            optim.step(update == len(minibatches))
            fill_old = None  # recorded by the first update's forwards
        if not stats:  # no row had a non-zero advantage: the loss was exactly 0
            stats = {"loss/policy": [0.0], "loss/kl": [0.0], "policy/clip_frac": [0.0]}
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(gap.metrics())
        out["budget/optimizer_steps"] = float(len(minibatches))
        return out

    @torch.no_grad()
    def _logprobs(
        self, handle: StepHandle, batch: TokenBatch, rows: torch.Tensor, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad log-probs of ``rows`` in micro-batches of this update's size."""
        if not len(rows):
            empty = batch.response_mask[:0]
            return empty.clone(), empty.clone()
        parts = [handle.logprobs(batch, r, model) for r in rows.split(self.micro_batch_rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def micro_loss(
        self,
        handle: StepHandle,
        batch: TokenBatch,
        rows: torch.Tensor,
        tok_den: torch.Tensor,
        seq_den: torch.Tensor,
        norm_len: int,
        stats: dict[str, list[float]],
        gap: _GapStats | None = None,
        callbacks: Sequence[Any] = (),
        fill_old: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This micro-batch's share of its mini-batch's loss (backward of the sum of shares is exact).

        ``fill_old`` marks rows whose old log-probs are recorded from this forward (the policy has
        not moved yet); with one update per batch there are no stored old log-probs at all."""
        logp, entropy = handle.logprobs(batch, rows, grad=True)
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
            adv = cb.on_micro_batch(logp.detach(), old, entropy.detach(), adv, mask, handle)
        ref = batch.ref_logprobs[rows] if batch.ref_logprobs is not None else None
        inputs = LossInputs(logp, old, adv, mask, entropy, batch.sampling_logprobs[rows], ref, tok_den, seq_den, norm_len)
        loss, metrics = self.policy_loss(inputs, self.loss_cfg)
        for k, v in metrics.items():
            stats[k].append(v)
        return loss
