"""The one narrow handle into the training step that every component receives.

Samplers, rewards (R3 included), the pass-rate pre-filter, the signal hooks (``on_groups``,
``on_advantages``, ``on_micro_batch``) and the updater are given a
:class:`StepHandle`, never the LightningModule or the Trainer, in the spirit of verl's
``core_algos`` (tensors and a config in, never a trainer). A component can then be tested with a
fake that has only these members (``tests/fakes.py``), and the house rules hold at run time, not
only in the imports: ``tests/unit/step/test_handle.py`` fails when a component reaches past it.
The policy module's own handle is :class:`~components.step.module_handle.ModuleHandle`.
Lightning's own lifecycle hooks (``setup``, ``on_train_start``, ...) keep their signatures.

Its members, grouped as the design names them:

- the policy: ``policy`` (trained), ``ref_policy`` (the frozen initial copy kept for the KL term;
  None without one: R3's frozen reward model shares it rather than holding a second copy),
  ``tokenizer``, ``device``;
- sampling settings: ``sampling`` (temperature, top-p, max new tokens, stops) and ``context_limit``
  (the longest context the engine takes, or None);
- the context of a prompt: ``context_of(prompt)`` gives the bare prompt's token ids and
  ``context_of(text)`` the ids of any prompt text (e.g. a prompt with a hint), chat template included;
- log-probs of rows under a given model: ``logprobs(batch, rows, model, grad)``;
- generation: ``generate`` (the engine's raw draws, not counted: the caller reports its own cost),
  ``sample`` (generate and score with the run's reward; every draw counted in ``budget/*``),
  ``generate_text`` (free-text replies, e.g. SAGE's self-written hints, counted), and the two reads
  of the prompt stream that samplers need, ``draw_prompts`` (DAPO's refills) and ``train_prompts``
  (the pool, e.g. GVM's shards);
- metrics: ``add_metrics`` (sums over the step) and ``log`` (one value);
- the step number: ``step`` (generation batches done).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from components.engines.base import SamplingParams
from components.types import Prompt, Rollout

if TYPE_CHECKING:
    from components.algos.batch import TokenBatch


class StepHandle(Protocol):
    """What a component may use of the training step (see the module docstring)."""

    policy: torch.nn.Module
    ref_policy: torch.nn.Module | None
    tokenizer: Any
    device: torch.device
    sampling: SamplingParams
    context_limit: int | None
    step: int

    def context_of(self, prompt: Prompt | str) -> list[int]:
        """Token ids of a prompt (the bare prompt) or of a prompt text, as the model sees it."""

    def logprobs(
        self,
        batch: TokenBatch,
        rows: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies ``(len(rows), R)`` of ``rows`` (default: all) under
        ``model`` (default: the policy as it is now), at the sampling temperature, in micro-batches;
        with ``grad`` the forward keeps its graph. Every token forwarded counts in the budget."""

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams | None = None) -> list[list[Rollout]]:
        """The engine's unscored draws (``params`` default: the run's sampling). Not counted."""

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        """Generate and score ``n_each[i]`` rollouts of each prompt (counted in the budget)."""

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """One free-text reply of the current policy per conversation (counted in the budget)."""

    def draw_prompts(self, k: int) -> list[Prompt]:
        """``k`` further training prompts from the data stream."""

    def train_prompts(self) -> list[Prompt]:
        """The training pool as it stands (this rank's share of it)."""

    def add_metrics(self, amounts: dict[str, float]) -> None:
        """Add to this step's sums (e.g. ``{"budget/tokens_forwarded": n}`` for a model's own passes)."""

    def log(self, name: str, value: float) -> None:
        """Log one value for this step (use the method's own prefix)."""
