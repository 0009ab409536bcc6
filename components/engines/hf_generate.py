"""transformers' own ``generate`` on the policy's weights: the HF engine before its decode loop.

Kept as the reference the loop is measured and checked against (``scripts/bench_eval.py``;
``tests/unit/engines/test_engines.py`` checks both on-policy and at stop strings), for FSDP over two
or more ranks (where :class:`~components.engines.hf.HFEngine` delegates to it: transformers keeps
sharded ranks in step), and for a model whose architecture the loop's cache does not cover
(``model.engine: components.engines.hf_generate.HFGenerateEngine``). It samples from torch's global
generator with ``torch.multinomial``; it takes no per-row keys. See :mod:`components.engines.base`
for what "the sampling log-prob" means for every engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from components.engines.base import PolicyWeightsEngine, SamplingParams, rank_stream
from components.types import Rollout


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


class _SampleLogprobs(LogitsProcessor):
    """Applies temperature and top-p itself, then records the chosen token's log-prob.

    transformers runs user logits processors *before* its own temperature / top-p warpers, so this
    processor does the warping (and HF's warpers are switched off): it is the last thing that
    touches the scores before HF samples from ``softmax(scores)``. The token chosen at step t is only
    visible at step t+1 (as ``input_ids[:, -1]``), so the processor keeps the previous step's
    log-probs (one ``(rows, vocab)`` tensor, never one per step) and :meth:`finish` reads the last.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.warpers: list[LogitsProcessor] = []
        if temperature > 0 and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if temperature > 0 and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.prev: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.chosen.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of ``new_tokens``, the tokens generated after the context."""
        if self.prev is not None:
            self.chosen.append(self.prev.gather(1, new_tokens[:, -1:]).squeeze(1))
        self.prev = None
        out = (
            torch.stack(self.chosen, dim=1) if self.chosen else new_tokens.new_zeros((new_tokens.shape[0], 0), dtype=torch.float)
        )
        if out.shape[1] != new_tokens.shape[1]:
            raise RuntimeError(f"recorded {out.shape[1]} log-probs for {new_tokens.shape[1]} generated tokens")
        return out


class _FirstStop(StoppingCriteria):
    """Wraps a stop-string criterion and records, per row, how many new tokens it had when a stop
    string first appeared (-1: never)."""

    def __init__(self, inner: StoppingCriteria, context_width: int) -> None:
        self.inner = inner
        self.context_width = context_width
        self.stop_at: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        # Only the generated part: a stop string is matched in what the model wrote, never across
        # the end of the context (as the decode loop and vLLM match it).
        done = self.inner(input_ids[:, self.context_width :], scores, **kwargs)
        if self.stop_at is None:
            self.stop_at = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        newly = done & (self.stop_at < 0)
        self.stop_at[newly] = input_ids.shape[1] - self.context_width
        return done


@contextlib.contextmanager
def _no_model_generation_defaults(model: PreTrainedModel) -> Iterator[None]:
    """transformers fills every generation field left unset (None) from the model's own
    generation_config.json (e.g. Qwen's repetition_penalty 1.05, top_k 20, top_p 0.8). Fields whose
    "off" value is None (min_p, suppress_tokens, bad_words_ids, forced_*_token_id, ...) cannot be
    switched off by a value, so during our call the model's generation_config is a blank one."""
    saved = model.generation_config
    model.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerateEngine(PolicyWeightsEngine):
    """Hugging Face ``generate`` on the policy module's own weights (no weight sync needed).

    Samples exactly what the loss assumes: every sampling knob is set explicitly (repetition penalty
    1, no n-gram ban, no minimum length, no top-k, temperature and top-p as given, even at their
    default values) and nothing is taken from the model's generation_config.json. The chosen
    token's log-prob is computed step by step (no ``output_scores``: memory stays O(rows x vocab),
    not O(steps x rows x vocab)). Generation stops at any EOS id the model declares and, optionally,
    at stop strings (``SamplingParams.stop``).

    Args:
        max_batch_rows: rows per ``generate`` call; larger batches are split.
        max_context_tokens: a context plus ``max_new_tokens`` longer than this is refused with a
            clear error (default: the model's ``max_position_embeddings``).
    """

    def _hf_config(self, params: SamplingParams) -> HFGenerationConfig:
        pad = self.tokenizer.pad_token_id
        return HFGenerationConfig(
            do_sample=params.temperature > 0,
            # Temperature and top-p are applied by _SampleLogprobs; HF's own warpers stay off.
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            min_length=0,
            renormalize_logits=False,
            remove_invalid_values=False,
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=pad if pad is not None else self.eos_ids[0],
            use_cache=True,
            output_scores=False,
            output_logits=False,
            return_dict_in_generate=False,
        )

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        self.check_context(contexts, params)
        rows = [ci for ci, n in enumerate(n_each) for _ in range(n)]
        out: list[list[Rollout]] = [[] for _ in contexts]
        tok = self.tokenizer
        hf_cfg = self._hf_config(params)
        eos = torch.tensor(self.eos_ids)
        was_training = self.model.training
        self.model.eval()
        try:
            with rank_stream():  # rank r > 0: a stream of its own
                for start in range(0, len(rows), self.max_batch_rows):
                    chunk = rows[start : start + self.max_batch_rows]
                    ids, mask = _left_pad([contexts[ci] for ci in chunk], hf_cfg.pad_token_id)
                    ids, mask = ids.to(self.model.device), mask.to(self.model.device)
                    recorder = _SampleLogprobs(params.temperature, params.top_p)
                    stops = StoppingCriteriaList()
                    first_stop = None
                    if params.stop:
                        first_stop = _FirstStop(StopStringCriteria(tok, params.stop), ids.shape[1])
                        stops.append(first_stop)
                    with _no_model_generation_defaults(self.model):
                        seqs = self.model.generate(
                            input_ids=ids,
                            attention_mask=mask,
                            generation_config=hf_cfg,
                            logits_processor=LogitsProcessorList([recorder]),
                            stopping_criteria=stops,
                        )
                    new = seqs[:, ids.shape[1] :]
                    lps = recorder.finish(new).cpu()
                    new = new.cpu()
                    steps = new.shape[1]
                    # Length of each rollout: up to and including the first EOS or stop-string token.
                    is_eos = torch.isin(new, eos)
                    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, steps + 1)
                    stop_len = torch.full_like(first_eos, steps + 1)
                    if first_stop is not None and first_stop.stop_at is not None:
                        at = first_stop.stop_at.cpu()
                        stop_len = torch.where(at > 0, at, stop_len)
                    length = torch.minimum(torch.minimum(first_eos, stop_len), torch.full_like(first_eos, steps))
                    for r, ci in enumerate(chunk):
                        n = int(length[r])
                        toks = new[r, :n].tolist()
                        ended_eos = int(first_eos[r]) <= n
                        finished = ended_eos or int(stop_len[r]) <= n
                        text = tok.decode(toks[:-1] if ended_eos else toks, skip_special_tokens=True)
                        out[ci].append(Rollout(toks, lps[r, :n].tolist(), text, finished))
        finally:
            self.model.train(was_training)
        return out
