"""The sampler slot: how many rollouts each prompt gets, and which ones are kept.

A sampler sees the step's prompts and a :class:`SamplingContext`, through which it generates and
scores rollouts (every sample drawn is counted in the budget there, so no sampler can forget to),
draws extra prompts, and logs its own metrics. It returns ragged :class:`~components.types.Group` s.

Samplers that keep per-prompt state key it by the stable prompt uid and implement
``state_dict``/``load_state_dict``; the module saves them in the Lightning checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from components.errors import ConfigError
from components.types import Group, Prompt, Rollout


class SamplingContext(Protocol):
    """What the module offers a sampler during one step."""

    step: int

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        """Generate and score ``n_each[i]`` rollouts of each prompt (counted in the budget)."""

    def context_of(self, prompt: Prompt) -> list[int]:
        """The bare prompt's token ids."""

    def draw_prompts(self, k: int) -> list[Prompt]:
        """``k`` further training prompts from the data stream."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text as the model sees it (e.g. a prompt with a hint added)."""

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """One free-text reply of the current policy per conversation (counted in the token budget)."""

    def log(self, name: str, value: float) -> None:
        """Log a method metric for this step (use the method's own prefix)."""


def make_group(prompt: Prompt, context: list[int], kept: list[Rollout], drawn: list[Rollout] | None = None) -> Group:
    """A group whose pool statistics cover ``drawn`` (default: the kept rollouts themselves)."""
    pool = kept if drawn is None else drawn
    return Group(
        prompt=prompt,
        context_ids=context,
        rollouts=kept,
        n_drawn=len(pool),
        n_pos=sum(r.passed for r in pool),
        reward_sum=sum(r.reward for r in pool),
    )


class Sampler(ABC):
    """Base class of all samplers."""

    def setup(self, module: Any) -> None:
        """Called once with the policy module: check the configuration against it here."""
        return None

    @abstractmethod
    def collect(self, prompts: list[Prompt], ctx: SamplingContext) -> list[Group]:
        """Rollout groups for this step."""

    def state_dict(self) -> dict[str, Any]:
        """Per-prompt state to checkpoint (keyed by prompt uid). Stateless samplers have none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


class FixedGroupSampler(Sampler):
    """Plain GRPO: ``group_size`` rollouts for every prompt, all kept."""

    def __init__(self, group_size: int = 8) -> None:
        if group_size < 1:
            raise ConfigError("model.sampler.group_size", f"must be >= 1, got {group_size}")
        self.group_size = group_size

    def collect(self, prompts: list[Prompt], ctx: SamplingContext) -> list[Group]:
        outs = ctx.sample(prompts, [self.group_size] * len(prompts))
        return [make_group(p, ctx.context_of(p), rs) for p, rs in zip(prompts, outs)]
