"""Rollout engines: turn contexts into sampled completions with the sampling policy's log-probs.

The interface is small so that Hugging Face ``generate`` (CPU, tests, small models) and vLLM (GPU,
:mod:`components.vllm_engine`) are interchangeable. An engine that holds its own copy of the weights
(vLLM) is told to sync after every optimizer step; the HF engine generates with the policy itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.errors import ConfigError
from components.types import Rollout


@dataclass
class SamplingParams:
    """How rollouts are sampled. ``temperature=0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8

    def validate(self, field: str = "model.sampling") -> None:
        if self.temperature < 0:
            raise ConfigError(f"{field}.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{field}.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{field}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


class RolloutEngine(ABC):
    """Generates ``n_each[i]`` completions of ``contexts[i]`` (token ids), returned in order."""

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Called once by the module with the policy and its tokenizer."""
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        """One list of rollouts per context (unscored: rewards are filled in by the reward)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trained weights into the engine. The HF engine generates with the policy itself,
        so it has nothing to do; engines with their own weights override this."""
        return None


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


class HFEngine(RolloutEngine):
    """Hugging Face ``generate`` on the policy module's own weights (no weight sync needed).

    Args:
        max_batch_rows: rows per ``generate`` call; larger batches are split.
        max_context_tokens: a context plus ``max_new_tokens`` longer than this is refused with a
            clear error (default: the model's ``max_position_embeddings``).
    """

    def __init__(self, max_batch_rows: int = 512, max_context_tokens: int | None = None) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_context_tokens = max_context_tokens

    def _limit(self) -> int | None:
        return self.max_context_tokens or getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        limit = self._limit()
        for c in contexts:
            if limit is not None and len(c) + params.max_new_tokens > limit:
                raise ConfigError(
                    "model.sampling.max_new_tokens",
                    f"a prompt of {len(c)} tokens plus {params.max_new_tokens} new tokens exceeds the model's "
                    f"context of {limit}; shorten the prompt template or lower max_new_tokens",
                )
        rows = [ci for ci, n in enumerate(n_each) for _ in range(n)]
        out: list[list[Rollout]] = [[] for _ in contexts]
        tok = self.tokenizer
        eos = tok.eos_token_id
        greedy = params.temperature == 0
        hf_cfg = HFGenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=0 if not greedy else None,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), self.max_batch_rows):
                chunk = rows[start : start + self.max_batch_rows]
                ids, mask = _left_pad([contexts[ci] for ci in chunk], tok.pad_token_id)
                ids, mask = ids.to(self.model.device), mask.to(self.model.device)
                res = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_cfg)
                new = res.sequences[:, ids.shape[1] :]
                # Log-prob of each chosen token under the *sampling* distribution (after temperature/top-p).
                lps = torch.stack(
                    [torch.log_softmax(s.float(), -1).gather(1, new[:, t : t + 1]).squeeze(1) for t, s in enumerate(res.scores)],
                    dim=1,
                )
                for r, ci in enumerate(chunk):
                    toks = new[r].tolist()
                    finished = eos in toks
                    length = toks.index(eos) + 1 if finished else len(toks)
                    toks = toks[:length]
                    text = tok.decode(toks[:-1] if finished else toks, skip_special_tokens=True)
                    out[ci].append(Rollout(toks, lps[r, :length].tolist(), text, finished))
        finally:
            self.model.train(was_training)
        return out
