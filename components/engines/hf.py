"""The Hugging Face engine: the policy's own weights, sampled by this project's decode loop (CPU,
tests, small models).

See :mod:`components.engines.base` for what "the sampling log-prob" means for every engine, and
:mod:`components.engines.decode` for the loop (one prefill per distinct context, an in-place KV
cache, ended rows dropped, one counter-based random stream per row).
"""

from __future__ import annotations

import torch
from transformers import StopStringCriteria

from components.engines.base import PolicyWeightsEngine, SamplingParams, rank_stream
from components.engines.decode import decode, derive_keys
from components.engines.hf_generate import HFGenerateEngine
from components.types import Rollout

_INT64 = (-(2**63), 2**63 - 1)


class HFEngine(PolicyWeightsEngine):
    """Samples on the policy module's own weights (no weight sync needed).

    Samples exactly what the loss assumes: ``softmax(logits / temperature)``, top-p truncated as
    transformers truncates, and nothing else (no repetition penalty, top-k, minimum length or any
    other field of the model's generation_config.json). The chosen token's log-prob is recorded
    step by step (memory O(rows x vocab), not O(steps x rows x vocab)). Generation stops at any EOS
    id the model declares and, optionally, at stop strings (``SamplingParams.stop``).

    Randomness: row ``j`` of context ``i`` draws from the stream of one 64-bit key. With ``keys``
    (one per context) that key is derived from ``(keys[i], j)``, so the rollouts depend on nothing
    else (not on the other contexts of the call, their order or the batch size): evaluation uses
    this. Without, every row's key is drawn from torch's global generator (one draw per row per
    call), so a run seeded and resumed with its RNG state samples the same rollouts; on
    data-parallel rank r > 0 they come from a stream of that rank's own (:func:`rank_stream`).

    Under FSDP over two or more ranks every forward is a collective, so every rank must run as many
    forwards as the others, while this loop stops when its own rows end. There the engine samples
    through transformers' ``generate`` (:class:`~components.engines.hf_generate.HFGenerateEngine`),
    which keeps sharded ranks in step (``synced_gpus``, on for FSDP-managed models); it takes no
    keys, so evaluation draws come from torch's generator as training's do (docs/operations.md).

    Args:
        max_batch_rows: rows per decode batch; larger calls are split (contexts of similar length
            together, a context's rollouts in one batch).
        max_context_tokens: a context plus ``max_new_tokens`` longer than this is refused with a
            clear error (default: the model's ``max_position_embeddings``).
    """

    keyed = True
    exact_logprobs = True

    def _lockstep_engine(self) -> HFGenerateEngine | None:
        """transformers' ``generate`` on the same weights when ranks must run in step, else None."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        from transformers.integrations.fsdp import is_fsdp_managed_module

        if not is_fsdp_managed_module(self.model):
            return None
        engine = HFGenerateEngine(self.max_batch_rows, self.max_context_tokens)
        engine.bind(self.model, self.tokenizer)
        return engine

    def _batches(self, contexts: list[list[int]], n_each: list[int]) -> list[list[int]]:
        """Context indices per decode batch: identical contexts share one prefill, contexts of
        similar length share a batch (little padding), at most ``max_batch_rows`` rows each unless
        one context alone asks for more."""
        order = sorted((i for i, n in enumerate(n_each) if n > 0), key=lambda i: len(contexts[i]))
        out: list[list[int]] = []
        cur: list[int] = []
        rows = 0
        for i in order:
            if cur and rows + n_each[i] > self.max_batch_rows:
                out.append(cur)
                cur, rows = [], 0
            cur.append(i)
            rows += n_each[i]
        return out + ([cur] if cur else [])

    @torch.no_grad()
    def generate(
        self, contexts: list[list[int]], n_each: list[int], params: SamplingParams, keys: torch.Tensor | None = None
    ) -> list[list[Rollout]]:
        """``keys``: optional int64 key per context (see the class docstring)."""
        lockstep = self._lockstep_engine()
        if lockstep is not None:
            return lockstep.generate(contexts, n_each, params)
        self.check_context(contexts, params)
        counts = torch.tensor(n_each, dtype=torch.long)
        total = int(counts.sum())
        if keys is None:  # one key per row from the global generator, in row order
            with rank_stream():  # every rank's generator is seeded alike: rank r > 0 draws its own
                row_keys = torch.randint(*_INT64, (total,), dtype=torch.long)
        else:
            ctx_of_row = torch.repeat_interleave(torch.arange(len(contexts)), counts)
            sample = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[ctx_of_row]
            row_keys = derive_keys(keys.to(torch.long)[ctx_of_row], sample)
        first_row = (torch.cumsum(counts, 0) - counts).tolist()
        out: list[list[Rollout]] = [[] for _ in contexts]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        stop = StopStringCriteria(tok, params.stop) if params.stop else None
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self._batches(contexts, n_each):
                # Identical contexts are prefilled once.
                distinct: dict[tuple[int, ...], int] = {}
                row_ctx: list[int] = []
                row_ids: list[int] = []
                for ci in batch:
                    d = distinct.setdefault(tuple(contexts[ci]), len(distinct))
                    row_ctx += [d] * n_each[ci]
                    row_ids += range(first_row[ci], first_row[ci] + n_each[ci])
                res = decode(
                    self.model,
                    [list(c) for c in distinct],
                    torch.tensor(row_ctx),
                    row_keys[torch.tensor(row_ids)],
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_new_tokens=params.max_new_tokens,
                    eos_ids=self.eos_ids,
                    pad_id=pad,
                    stop_check=(lambda ids, _n: stop(ids, None)) if stop is not None else None,
                )
                lengths, eos_end, finished = res.length.tolist(), res.ended_eos.tolist(), res.finished.tolist()
                toks = [t[:n] for t, n in zip(res.tokens.tolist(), lengths)]
                lps = [lp[:n] for lp, n in zip(res.logprobs.tolist(), lengths)]
                texts = tok.batch_decode([t[:-1] if e else t for t, e in zip(toks, eos_end)], skip_special_tokens=True)
                r = 0
                for ci in batch:
                    for _ in range(n_each[ci]):
                        out[ci].append(Rollout(toks[r], lps[r], texts[r], finished[r]))
                        r += 1
        finally:
            self.model.train(was_training)
        return out
