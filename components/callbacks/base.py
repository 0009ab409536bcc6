"""Signal callbacks: Lightning callbacks with two extra hooks that the policy module calls.

``on_groups`` filters or re-weights whole groups after sampling and scoring; ``on_advantages``
reshapes per-token advantages before the loss. They run in the order they appear in
``trainer.callbacks``. Being Lightning callbacks, they also get every lifecycle hook and have their
``state_dict`` saved in checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from components.samplers.selection import population_std
from components.types import Group


class SignalCallback(L.Callback):
    """Base class: both hooks default to leaving the signal unchanged."""

    def on_groups(self, groups: list[Group], module: Any) -> list[Group]:
        return groups

    def on_advantages(self, batch: Any, module: Any) -> None:
        """``batch`` is a :class:`components.module.TokenBatch`; modify ``batch.advantages`` in place."""
        return None


class ZeroVarianceFilter(SignalCallback):
    """Drop groups whose kept rewards have (almost) no spread: they carry no GRPO signal.

    This is the query filter at its simplest (DAPO's filter without re-sampling). It saves update
    compute, not rollouts: the rollouts were already drawn. ``min_std`` > 0 also drops groups with a
    tiny spread (population std of rewards).
    """

    def __init__(self, min_std: float = 0.0) -> None:
        self.min_std = min_std

    def on_groups(self, groups: list[Group], module: Any) -> list[Group]:
        kept = [g for g in groups if g.size >= 2 and population_std(g.rewards) > self.min_std]
        module.log_metric("filter/dropped_frac", 1 - len(kept) / max(len(groups), 1))
        return kept
