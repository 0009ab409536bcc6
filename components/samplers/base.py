"""The sampler slot: how many rollouts each prompt gets, and which ones are kept.

A sampler sees the step's prompts and a :class:`SamplingContext`, through which it generates and
scores rollouts (every sample drawn is counted in the budget there, so no sampler can forget to),
draws extra prompts, and logs its own metrics. It returns ragged :class:`~components.types.Group` s.

Samplers that keep per-prompt state key it by the stable prompt uid and implement
``state_dict``/``load_state_dict``; the module saves them in the Lightning checkpoint.

Context transforms (SAGE hinting; any prompt rewrite) wrap any sampler in one place:
:class:`TransformedSampler` hands its inner sampler a :class:`TransformedContext`, whose
``context_of`` and ``sample`` ask the :class:`ContextTransform` for the context of each draw. The
inner sampler is unchanged: it draws and builds its groups from ``ctx.context_of(p)`` as always, so
its groups carry the transformed context the rollouts were sampled from, and the loss sees it.
Evaluation never goes through a sampler, so it always sees the bare prompt.

One context per group: a transform gives a prompt one context per step at a time, and when it
changes a prompt's context after a draw (SAGE's hinted re-draw of a collapsed probe) it does so
inside that same ``sample`` call and replaces the rollouts it returns. So the inner sampler never
sees the superseded draw: its pool statistics (``n_drawn``, ``n_pos``, Ada-Seq's p~, allocation
counts) restart for the new context, and every rollout of a group shares its ``context_ids``.
The superseded rollouts still count in ``budget/*`` (the module counts every draw).
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

    downsamples = False  # True: keeps fewer rollouts than it draws (PODS refuses such an inner sampler)

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


class ContextTransform(ABC):
    """Chooses the context of each draw an inner sampler makes (e.g. the prompt plus a hint).

    Per step: :meth:`begin_step`; then for every ``sample`` call of the inner sampler,
    :meth:`prepare` (the call's prompts, so a transform can batch work such as one hint-writing
    call), :meth:`context` per prompt, the draw, and :meth:`after_draw` (which may re-draw some
    prompts in a new context and return their replacement rollouts); finally :meth:`end_step` with
    the inner sampler's groups. Per-step choices are keyed by prompt uid; per-prompt state kept
    across steps goes in ``state_dict``.
    """

    def setup(self, module: Any) -> None:
        """Called once with the policy module (e.g. to read the model's context length)."""
        return None

    def begin_step(self, ctx: SamplingContext) -> None:
        """Start of a step: forget the previous step's choices."""
        return None

    def prepare(self, prompts: list[Prompt], ctx: SamplingContext) -> None:
        """Decide the context of the prompts about to be drawn (called before every draw)."""
        return None

    @abstractmethod
    def context(self, prompt: Prompt, ctx: SamplingContext) -> list[int]:
        """The context ``prompt`` is drawn from now (``ctx.context_of(prompt)`` is the bare one)."""

    def after_draw(
        self, prompts: list[Prompt], n_each: list[int], outs: list[list[Rollout]], ctx: SamplingContext
    ) -> list[list[Rollout]]:
        """The rollouts the inner sampler receives for this draw (default: as drawn)."""
        return outs

    def end_step(self, groups: list[Group], ctx: SamplingContext) -> None:
        """End of a step: annotate the groups, update per-prompt state, log metrics."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class TransformedContext:
    """The :class:`SamplingContext` an inner sampler sees under a :class:`ContextTransform`."""

    def __init__(self, ctx: SamplingContext, transform: ContextTransform) -> None:
        self.ctx, self.transform = ctx, transform
        self.step = ctx.step

    def context_of(self, prompt: Prompt) -> list[int]:
        self.transform.prepare([prompt], self.ctx)
        return self.transform.context(prompt, self.ctx)

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        if contexts is not None:  # a sampler that builds its own contexts is left alone
            return self.ctx.sample(prompts, n_each, contexts)
        self.transform.prepare(prompts, self.ctx)
        outs = self.ctx.sample(prompts, n_each, [self.transform.context(p, self.ctx) for p in prompts])
        return self.transform.after_draw(prompts, n_each, outs, self.ctx)

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self.ctx.draw_prompts(k)

    def encode(self, text: str) -> list[int]:
        return self.ctx.encode(text)

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        return self.ctx.generate_text(conversations, max_new_tokens, temperature)

    def log(self, name: str, value: float) -> None:
        self.ctx.log(name, value)


class TransformedSampler(Sampler):
    """Any sampler (``inner``) whose every draw takes its context from ``transform``."""

    def __init__(self, inner: Sampler, transform: ContextTransform) -> None:
        self.inner, self.transform = inner, transform

    @property
    def downsamples(self) -> bool:  # type: ignore[override]
        return getattr(self.inner, "downsamples", False)

    def setup(self, module: Any) -> None:
        self.inner.setup(module)
        self.transform.setup(module)

    def collect(self, prompts: list[Prompt], ctx: SamplingContext) -> list[Group]:
        self.transform.begin_step(ctx)
        groups = self.inner.collect(prompts, TransformedContext(ctx, self.transform))
        self.transform.end_step(groups, ctx)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "transform": self.transform.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.transform.load_state_dict(state.get("transform", {}))
