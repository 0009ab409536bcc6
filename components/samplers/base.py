"""The sampler slot: how many rollouts each prompt gets, and which ones are kept.

A sampler sees the step's prompts and the step's :class:`~components.handle.StepHandle`, through
which it generates and scores rollouts (every sample drawn is counted in the budget there, so no sampler can forget to),
draws extra prompts, and logs its own metrics. It returns ragged :class:`~components.types.Group` s.

Samplers that keep per-prompt state key it by the stable prompt uid and implement
``state_dict``/``load_state_dict``; the module saves them in the Lightning checkpoint.

Context transforms (SAGE hinting; any prompt rewrite) wrap any sampler in one place:
:class:`TransformedSampler` hands its inner sampler a :class:`TransformedContext`, whose
``context_of`` and ``sample`` ask the :class:`ContextTransform` for the context of each draw. The
inner sampler is unchanged: it draws and builds its groups from ``handle.context_of(p)`` as always, so
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
from typing import Any

import torch

from components.engines.base import SamplingParams
from components.errors import ConfigError
from components.handle import StepHandle
from components.types import Group, Prompt, Rollout


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

    def setup(self, handle: StepHandle) -> None:
        """Called once with the step's handle: check the configuration against it here."""
        return None

    @abstractmethod
    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
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

    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        outs = handle.sample(prompts, [self.group_size] * len(prompts))
        return [make_group(p, handle.context_of(p), rs) for p, rs in zip(prompts, outs)]


class ContextTransform(ABC):
    """Chooses the context of each draw an inner sampler makes (e.g. the prompt plus a hint).

    Per step: :meth:`begin_step`; then for every ``sample`` call of the inner sampler,
    :meth:`prepare` (the call's prompts, so a transform can batch work such as one hint-writing
    call), :meth:`context` per prompt, the draw, and :meth:`after_draw` (which may re-draw some
    prompts in a new context and return their replacement rollouts); finally :meth:`end_step` with
    the inner sampler's groups. Per-step choices are keyed by prompt uid; per-prompt state kept
    across steps goes in ``state_dict``.
    """

    def setup(self, handle: StepHandle) -> None:
        """Called once with the step's handle (e.g. to read the model's context length)."""
        return None

    def begin_step(self, handle: StepHandle) -> None:
        """Start of a step: forget the previous step's choices."""
        return None

    def prepare(self, prompts: list[Prompt], handle: StepHandle) -> None:
        """Decide the context of the prompts about to be drawn (called before every draw)."""
        return None

    @abstractmethod
    def context(self, prompt: Prompt, handle: StepHandle) -> list[int]:
        """The context ``prompt`` is drawn from now (``handle.context_of(prompt)`` is the bare one)."""

    def after_draw(
        self, prompts: list[Prompt], n_each: list[int], outs: list[list[Rollout]], handle: StepHandle
    ) -> list[list[Rollout]]:
        """The rollouts the inner sampler receives for this draw (default: as drawn)."""
        return outs

    def end_step(self, groups: list[Group], handle: StepHandle) -> None:
        """End of a step: annotate the groups, update per-prompt state, log metrics."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class TransformedContext:
    """The :class:`StepHandle` an inner sampler sees under a :class:`ContextTransform`: the step's
    handle, with every draw's context (``context_of`` of a prompt, ``sample``) asked of the transform."""

    def __init__(self, handle: StepHandle, transform: ContextTransform) -> None:
        self.handle, self.transform = handle, transform

    def context_of(self, prompt: Prompt | str) -> list[int]:
        if isinstance(prompt, str):
            return self.handle.context_of(prompt)
        self.transform.prepare([prompt], self.handle)
        return self.transform.context(prompt, self.handle)

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        if contexts is not None:  # a sampler that builds its own contexts is left alone
            return self.handle.sample(prompts, n_each, contexts)
        self.transform.prepare(prompts, self.handle)
        outs = self.handle.sample(prompts, n_each, [self.transform.context(p, self.handle) for p in prompts])
        return self.transform.after_draw(prompts, n_each, outs, self.handle)

    # ---- the rest of the handle, unchanged ---------------------------------------------------------
    @property
    def policy(self) -> torch.nn.Module:
        return self.handle.policy

    @property
    def ref_policy(self) -> torch.nn.Module | None:
        return self.handle.ref_policy

    @property
    def tokenizer(self) -> Any:
        return self.handle.tokenizer

    @property
    def device(self) -> torch.device:
        return self.handle.device

    @property
    def sampling(self) -> SamplingParams:
        return self.handle.sampling

    @property
    def context_limit(self) -> int | None:
        return self.handle.context_limit

    @property
    def step(self) -> int:
        return self.handle.step

    def logprobs(self, batch: Any, rows: torch.Tensor | None = None, model: torch.nn.Module | None = None, grad: bool = False):
        return self.handle.logprobs(batch, rows, model, grad)

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams | None = None) -> list[list[Rollout]]:
        return self.handle.generate(contexts, n_each, params)

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        return self.handle.generate_text(conversations, max_new_tokens, temperature)

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self.handle.draw_prompts(k)

    def train_prompts(self) -> list[Prompt]:
        return self.handle.train_prompts()

    def add_metrics(self, amounts: dict[str, float]) -> None:
        self.handle.add_metrics(amounts)

    def log(self, name: str, value: float) -> None:
        self.handle.log(name, value)


class TransformedSampler(Sampler):
    """Any sampler (``inner``) whose every draw takes its context from ``transform``."""

    def __init__(self, inner: Sampler, transform: ContextTransform) -> None:
        self.inner, self.transform = inner, transform

    @property
    def downsamples(self) -> bool:  # type: ignore[override]
        return getattr(self.inner, "downsamples", False)

    def setup(self, handle: StepHandle) -> None:
        self.inner.setup(handle)
        self.transform.setup(handle)

    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        self.transform.begin_step(handle)
        groups = self.inner.collect(prompts, TransformedContext(handle, self.transform))
        self.transform.end_step(groups, handle)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "transform": self.transform.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.transform.load_state_dict(state.get("transform", {}))
