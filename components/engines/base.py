"""Rollout engines: turn contexts into sampled completions with the sampling policy's log-probs.

The interface is small so that Hugging Face ``generate`` (CPU, tests, small models) and vLLM (GPU,
:mod:`components.engines.vllm`) are interchangeable. An engine that holds its own copy of the weights
(vLLM) is told to sync after every optimizer step; the HF engine generates with the policy itself.

What "the sampling log-prob" means, for both engines: the log-probability of the chosen token under
the distribution it was actually drawn from, i.e. ``log_softmax(logits / temperature)`` after top-p
truncation. The loss scores the same tokens with ``log_softmax(logits / temperature)`` of the policy
(no truncation), so with ``top_p = 1`` the two agree to float precision on the HF engine (the
``rollout/logprob_gap_*`` metrics are ~0), and with ``top_p < 1`` a gap of ``-log(kept mass)`` per
token is expected: the rollouts are then not exactly on-policy for the loss.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from components.errors import ConfigError
from components.types import Rollout


@dataclass
class SamplingParams:
    """How rollouts are sampled. ``temperature=0`` means greedy.

    ``stop``: optional stop strings; a rollout that produces one ends there (the token that
    completes it is kept, and the rollout counts as finished). EOS is always the full list of
    end-of-sequence ids the model declares (see :func:`eos_token_ids`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    stop: list[str] = field(default_factory=list)

    def validate(self, field: str = "model.sampling") -> None:
        if self.temperature < 0:
            raise ConfigError(f"{field}.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{field}.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{field}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"{field}.stop", f"must be a list of non-empty strings, got {self.stop!r}")


def data_parallel_rank() -> int:
    """This process's rank among the data-parallel ranks (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def rank_stream() -> Iterator[None]:
    """Random draws on data-parallel rank r > 0 come from a stream of its own (the HF engines'
    sampling).

    Every rank's global generator is seeded alike (``seed_everything``), so without this rank 1
    would sample with rank 0's uniforms. Rank 0 samples from the global generator as a single device
    does; rank r draws one seed from it and samples, inside a forked generator, from that seed
    mixed with r (reproducible from the checkpointed global state, like rank 0's draws)."""
    rank = data_parallel_rank()
    if rank == 0:
        yield
        return
    seed = int(torch.randint(0, 2**62, ()))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed + rank * 0x9E3779B97F4A7C15) % 2**63)
        yield


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every end-of-sequence id the model declares: its generation_config, its config and the
    tokenizer (chat models stop on a list, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ConfigError("model", "the model declares no EOS token (generation_config, config and tokenizer have none)")
    return ids


class RolloutEngine(ABC):
    """Generates ``n_each[i]`` completions of ``contexts[i]`` (token ids), returned in order.

    Lifecycle, called by the policy module: :meth:`bind` once with the policy; :meth:`start` when
    training (or evaluation) starts and again after a resume, so an engine with its own weights
    loads the policy's current ones; :meth:`generate` any number of times per step;
    :meth:`sleep` after the step's last generate (an engine sharing the device with training frees
    its memory); :meth:`sync_weights` after every optimizer step; :meth:`close` at teardown.
    """

    #: ``generate`` accepts ``keys`` (an int64 key per context): each rollout then draws from its own
    #: stream, derived from (its context's key, its sample number), whatever else is in the call.
    keyed: bool = False
    #: the sampling log-probs are the policy's own forward's to float rounding when top_p is 1 (the
    #: engine samples from the policy's weights at full precision): they may stand in for old log-probs.
    exact_logprobs: bool = False

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Called once by the module with the policy and its tokenizer."""
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        """One list of rollouts per context (unscored: rewards are filled in by the reward)."""

    def start(self, model: torch.nn.Module, *, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Training or evaluation starts (also after a resume). Engines with their own weights
        build themselves on ``device`` and load ``model``'s weights; the HF engine has nothing to do."""
        return None

    def sleep(self) -> None:
        """The step's last generate is done: free generation memory until the next one (no-op here)."""
        return None

    def close(self) -> None:
        """Training or evaluation is over (the module's ``teardown``): release what :meth:`start`
        built (no-op here). A later :meth:`start` builds it again."""
        return None

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trained weights into the engine. The HF engine generates with the policy itself,
        so it has nothing to do; engines with their own weights override this."""
        return None


class PolicyWeightsEngine(RolloutEngine):
    """An engine that samples with the policy module's own weights (nothing to sync): the shared
    set-up of the HF engines, the EOS ids and the context-length check.

    Args:
        max_batch_rows: rows per decode batch; larger calls are split.
        max_context_tokens: a context plus ``max_new_tokens`` longer than this is refused with a
            clear error (default: the model's ``max_position_embeddings``).
    """

    def __init__(self, max_batch_rows: int = 512, max_context_tokens: int | None = None) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_context_tokens = max_context_tokens

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().bind(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)

    def _limit(self) -> int | None:
        return self.max_context_tokens or getattr(self.model.config, "max_position_embeddings", None)

    def check_context(self, contexts: list[list[int]], params: SamplingParams) -> None:
        """Refuse a context that cannot fit ``max_new_tokens`` more tokens, naming the fix."""
        limit = self._limit()
        for c in contexts:
            if limit is not None and len(c) + params.max_new_tokens > limit:
                raise ConfigError(
                    "model.sampling.max_new_tokens",
                    f"a prompt of {len(c)} tokens plus {params.max_new_tokens} new tokens exceeds the model's "
                    f"context of {limit}; shorten the prompt template or lower max_new_tokens",
                )
