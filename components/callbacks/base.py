"""Signal callbacks: Lightning callbacks with three extra hooks that the policy module calls.

Each hook receives the step's :class:`~components.handle.StepHandle`, never the module.
``on_groups`` filters or re-weights whole groups after sampling and scoring; ``on_advantages``
reshapes per-token advantages before the loss, once per generation batch; ``on_micro_batch``
reshapes them inside the update, once per forwarded micro-batch of every mini-batch update, with
the policy's current log-probs (so with the real ratio pi / pi_old when a batch feeds several
updates). They run in the order they appear in ``trainer.callbacks``. Being Lightning callbacks, they also get every lifecycle hook and have their
``state_dict`` saved in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch

from components.algos.selection import population_std
from components.types import Group

if TYPE_CHECKING:
    from components.algos.batch import TokenBatch
    from components.handle import StepHandle


class SignalCallback(L.Callback):
    """Base class: every hook defaults to leaving the signal unchanged."""

    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        return groups

    def on_advantages(self, batch: TokenBatch, handle: StepHandle) -> None:
        """Modify ``batch.advantages`` (per token) in place."""
        return None

    def on_micro_batch(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        entropy: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        handle: StepHandle,
    ) -> torch.Tensor:
        """Per-token advantages for this micro-batch's loss; return them (default: unchanged).

        All tensors are ``(rows, R)`` over response tokens: ``logp`` and ``entropy`` the policy's
        now (detached, at the sampling temperature), ``old_logp`` the log-probs recorded before the
        batch's first update (equal to ``logp`` with one update per batch), so ``exp(logp -
        old_logp)`` is the ratio the loss sees; ``mask`` 1 on response tokens. Return a new tensor
        rather than editing ``advantages`` in place (it is a view of the batch's). Called inside
        the gradient computation: the returned advantages must not require grad. With
        ``skip_zero_advantage`` on, rows whose advantages are all zero are never forwarded and so
        never reach this hook.
        """
        return advantages


class ZeroVarianceFilter(SignalCallback):
    """Drop groups whose kept rewards have (almost) no spread: they carry no GRPO signal.

    This is the query filter at its simplest (DAPO's filter without re-sampling). It saves update
    compute, not rollouts: the rollouts were already drawn. ``min_std`` > 0 also drops groups with a
    tiny spread (population std of rewards).
    """

    def __init__(self, min_std: float = 0.0) -> None:
        self.min_std = min_std

    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        kept = [g for g in groups if g.size >= 2 and population_std(g.rewards) > self.min_std]
        handle.log("filter/dropped_frac", 1 - len(kept) / max(len(groups), 1))
        return kept
