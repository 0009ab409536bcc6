"""Step metrics across data-parallel ranks: counts are summed, the log-prob gap is the worst rank's."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from components.step.metrics import MAXED, SUMMED, reduce_across_ranks


def _two_ranks(other: dict[str, float]):
    """A module whose strategy reduces this rank's tensor with a second rank holding ``other``."""

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        keys = SUMMED if reduce_op == "sum" else MAXED
        theirs = torch.tensor([other.get(k, 0.0 if reduce_op == "sum" else -1.0) for k in keys], dtype=tensor.dtype)
        return tensor + theirs if reduce_op == "sum" else torch.maximum(tensor, theirs)

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    return SimpleNamespace(_trainer=trainer, trainer=trainer, device=torch.device("cpu"))


def test_counts_are_summed_and_the_gap_is_the_worst_ranks(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    m = {"budget/rollouts": 32.0, "rollout/logprob_gap_max": 2e-6, "loss/policy": 0.5}
    reduce_across_ranks(_two_ranks({"budget/rollouts": 32.0, "rollout/logprob_gap_max": 3.0}), m)
    assert m["budget/rollouts"] == 64.0 and m["rollout/logprob_gap_max"] == 3.0  # an off-policy rank shows
    assert m["loss/policy"] == 0.5  # rank 0's


def test_a_gap_measured_on_no_rank_stays_unlogged(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    m = {"budget/rollouts": 8.0}
    reduce_across_ranks(_two_ranks({"budget/rollouts": 8.0}), m)
    assert "rollout/logprob_gap_max" not in m
    m = {"budget/rollouts": 8.0}
    reduce_across_ranks(_two_ranks({"rollout/logprob_gap_max": 1e-6}), m)
    assert m["rollout/logprob_gap_max"] == 1e-6  # measured on the other rank only
