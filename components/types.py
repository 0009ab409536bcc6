"""The data that flows through one training step.

A :class:`Prompt` is a task item with a stable uid. The sampler draws :class:`Rollout` s for it and
returns :class:`Group` s. Groups are *ragged*: each has its own number of kept rollouts, and each
records the pool statistics of every sample drawn for it (``n_drawn``, ``n_pos``, ``reward_sum``),
not only of those kept, so pool-statistics corrections and budget accounting are exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def stable_uid(task: str, item_key: Any) -> str:
    """A uid that depends only on the task and the item, never on the step or the batch."""
    payload = json.dumps([task, item_key], sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


@dataclass
class Prompt:
    """One task item.

    ``text`` is the bare prompt shown to the model (already templated); ``answer`` is the gold answer;
    ``entry`` is the task's raw item, passed back to the task's own verifier; ``tag`` names the
    difficulty slice it belongs to (for per-slice evaluation); ``reference`` is an optional worked
    solution (used by hinting and reference-based rewards). ``answer_marker`` is set when the task
    answers in worked steps: the final answer is the text after the last marker (the verifier reads
    only that), and everything before it is the reasoning (see ``components.data.tasks.split_completion``).
    ``question`` is the task's bare question
    without the prompt template's instructions (reasoning-gym's ``question``, a file's prompt
    field), or None when unknown: SAGE fills its hint templates with it, not with ``text``.
    """

    uid: str
    task: str
    text: str
    answer: str
    entry: dict = field(default_factory=dict)
    tag: str = ""
    reference: str | None = None
    answer_marker: str | None = None
    question: str | None = None


@dataclass
class Rollout:
    """One sampled completion of one context."""

    token_ids: list[int]
    logprobs: list[float]  # log-probabilities of the sampling policy, one per token
    text: str
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    reward: float = 0.0
    passed: bool = False
    # Per-rollout weight multiplying this rollout's advantage (beside the group's prompt weight),
    # e.g. the inverse of its selection probability after label-dependent down-sampling.
    weight: float = 1.0
    # Per-rollout details a reward or sampler attaches for inspection (e.g. DRO's R3 token
    # weights); the sample-completions table prints one column per key.
    meta: dict = field(default_factory=dict)


@dataclass
class Group:
    """The rollouts kept for one prompt, with the statistics of every sample drawn for it.

    ``context_ids`` is the exact context the rollouts were sampled from (the prompt, plus a hint if a
    sampler added one): the loss sees this context. ``weight`` is a prompt weight that multiplies
    the advantages (w(p) of an f-objective; 1 by default). ``baseline`` is a sampler-supplied
    baseline (e.g. Reinforce-Ada's pool mean p~); None lets the advantage estimator use the kept
    rollouts.
    """

    prompt: Prompt
    context_ids: list[int]
    rollouts: list[Rollout]
    n_drawn: int = 0
    n_pos: int = 0
    reward_sum: float = 0.0
    weight: float = 1.0
    baseline: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.rollouts)

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]

    @property
    def pool_mean(self) -> float:
        """Mean reward over every sample drawn for this prompt (kept or not)."""
        return self.reward_sum / self.n_drawn if self.n_drawn else 0.0

    @property
    def is_mixed(self) -> bool:
        """True when the kept rewards are not all equal: the group carries a learning signal."""
        rs = self.rewards
        return len(rs) > 1 and max(rs) > min(rs)
