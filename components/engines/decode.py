"""The HF engine's generation loop: one prefill per distinct context, a static KV cache, finished rows
dropped, and one random stream per row.

Why not ``model.generate``: for the small models this project trains on CPU, generate's per-token
bookkeeping (a growing cache re-concatenated every step, masks rebuilt, logits processors) costs as
much as the model's arithmetic, and it prefills every rollout's context again although a group's
rollouts share it. Here:

* each distinct context is forwarded once and its KV cache copied to its rollouts' rows;
* the cache is written in place into buffers sized for the whole generation (never re-concatenated);
* a row that has ended (EOS, stop string) leaves the batch: later steps forward only live rows;
* every row draws its tokens from its own counter-based stream: one uniform per (row key, step)
  from an integer hash (:func:`row_uniforms`), turned into a token by inverse-CDF sampling from
  ``softmax(scores)``. That is exactly a draw from the same distribution as ``torch.multinomial``,
  and the recorded log-prob is the chosen token's ``log_softmax(scores)``; a row's tokens depend
  only on its key and the model, not on which rows share its batch (to float rounding: another batch
  shape can round the logits differently, and a uniform that falls on a token boundary can flip).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from components.engines import shared_prefix

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; int64 products wrap).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_STEP = -3335678366873096957  # 0xD1B54A32D192ED03


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (``>>`` is arithmetic for signed tensors)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor: a bijective, well-mixed hash of each element."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) (float64, 53 random bits) per row key, for decode step ``step``."""
    z = mix64(keys ^ mix64(torch.full_like(keys, step) * _STEP))
    return _shr(z, 11).double() * (1.0 / (1 << 53))


def derive_keys(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keys of sub-streams: one per (``base`` key, ``index``), e.g. (an item's key, its sample number)."""
    return mix64(base ^ mix64(index * _GOLDEN + 1))


class _BufferLayer(DynamicLayer):
    """A cache layer written in place into a buffer sized for the whole generation.

    transformers' dynamic layer re-concatenates the whole cache at every step (a copy of it per
    token) and its static layer attends over the whole buffer, empty tail included; this one
    writes each step's keys and values into its slot and hands attention views of the filled part.
    """

    @classmethod
    def from_prefill(cls, layer: DynamicLayer, rows: torch.Tensor, total: int) -> _BufferLayer:
        """The prefilled ``layer`` copied to ``rows`` (a context index per row), room for ``total`` positions."""
        new = cls()
        new.dtype, new.device, new.is_initialized = layer.dtype, layer.device, True
        k, v = layer.keys, layer.values
        n = k.shape[-2]
        new.kbuf = k.new_empty((len(rows), k.shape[1], total, k.shape[-1]))
        new.vbuf = v.new_empty((len(rows), v.shape[1], total, v.shape[-1]))
        new.kbuf[:, :, :n] = k[rows]
        new.vbuf[:, :, :n] = v[rows]
        new._view(n)
        return new

    def _view(self, n: int) -> None:
        self.n = n
        self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[-2]
        self.kbuf[:, :, self.n : self.n + q] = key_states
        self.vbuf[:, :, self.n : self.n + q] = value_states
        self._view(self.n + q)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Only the filled part is copied; the tail of the new buffers is written before it is read.
        kbuf, vbuf = (
            self.kbuf.new_empty((len(indices), *self.kbuf.shape[1:])),
            self.vbuf.new_empty((len(indices), *self.vbuf.shape[1:])),
        )
        kbuf[:, :, : self.n] = self.kbuf[indices, :, : self.n]
        vbuf[:, :, : self.n] = self.vbuf[indices, :, : self.n]
        self.kbuf, self.vbuf = kbuf, vbuf
        self._view(self.n)


@dataclass
class Decoded:
    """The loop's output for ``rows`` rows: generated tokens (right-padded with ``pad``), their
    sampling log-probs, each row's length (up to and including the token that ended it) and
    whether it ended by EOS or stop string (False: cut at ``max_new_tokens``)."""

    tokens: torch.Tensor  # (rows, steps) long
    logprobs: torch.Tensor  # (rows, steps) float
    length: torch.Tensor  # (rows,) long
    finished: torch.Tensor  # (rows,) bool
    ended_eos: torch.Tensor  # (rows,) bool: the last token is an EOS id


def _left_pad(seqs: list[list[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(seqs)), lens)
    col = torch.arange(len(flat)) - (torch.cumsum(lens, 0) - lens)[row] + (width - lens)[row]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ids[row, col] = flat
    mask[row, col] = 1
    return ids, mask


def sample_step(
    logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its sampling log-prob) per row from next-token ``logits`` (rows, vocab).

    Scores are ``logits / temperature`` then top-p truncated (transformers' own warper, so the
    truncation is the one ``generate`` applied); the token is drawn by inverse CDF with the row's
    uniform for this step; the log-prob is the chosen token's ``log_softmax(scores)``. Greedy
    (``temperature == 0``): the argmax, with its ``log_softmax(logits)``.
    """
    scores = logits.float()
    if temperature == 0:
        tok = scores.argmax(-1)
        return tok, torch.log_softmax(scores, -1).gather(1, tok[:, None]).squeeze(1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    logp = torch.log_softmax(scores, -1)
    cdf = torch.cumsum(logp.exp(), -1, dtype=torch.float64)  # float64: exact enough for a 150k vocabulary
    target = row_uniforms(keys, step) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp(max=logits.shape[1] - 1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    contexts: list[list[int]],
    row_context: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    stop_check=None,
) -> Decoded:
    """Sample ``len(row_context)`` rollouts: row ``r`` continues ``contexts[row_context[r]]`` with
    the random stream of ``keys[r]``.

    ``stop_check(generated, n_new)`` (optional) is called after each step with the live rows'
    generated tokens ``(live, n_new)`` (never the context) and returns a bool per live row: a stop string has
    just been completed (the row ends, finished, keeping that token).
    """
    device = model.device
    rows = len(row_context)
    width = max(len(c) for c in contexts)
    ctx_ids, ctx_mask = _left_pad(contexts, pad_id, width)
    total = width + max_new_tokens
    cache = DynamicCache(config=model.config)
    pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ctx_ids.to(device),
        attention_mask=ctx_mask.to(device),
        position_ids=pos.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    rc = row_context.to(device)
    logits = out.logits[:, -1][rc]
    next_pos = ctx_mask.sum(-1).to(device)[rc]
    shared = shared_prefix.supported(model)
    if shared:
        # The contexts' cache stays once per context; attention reads it once per context per step.
        counts = torch.bincount(row_context, minlength=len(contexts))
        order = torch.sort(row_context, stable=True).indices
        slot = torch.empty_like(row_context)
        slot[order] = torch.arange(rows) - (torch.cumsum(counts, 0) - counts)[row_context[order]]
        bias = torch.zeros(ctx_mask.shape, dtype=out.logits.dtype).masked_fill(ctx_mask == 0, float("-inf"))
        layout = shared_prefix.RowLayout(rc, slot.to(device), int(counts.max()), bias.to(device))
        cache.layers = [shared_prefix.SharedPrefixLayer(layer, layout, rows, max_new_tokens) for layer in cache.layers]
        attending = shared_prefix.active(model, cache.layers)
        mask = None
    else:
        # Every rollout of a context starts from the context's cache: copy it to the rows. Layers of
        # another kind (sliding windows) are copied as they are and keep their own update.
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                cache.layers[i] = _BufferLayer.from_prefill(layer, rc, total)
            else:
                layer.batch_select_indices(rc)
        attending = contextlib.nullcontext()
        mask = torch.zeros((rows, total), dtype=torch.long, device=device)
        mask[:, :width] = ctx_mask.to(device)[rc]
    history = None
    if stop_check is not None:
        history = torch.cat([ctx_ids.to(device)[rc], torch.full((rows, max_new_tokens), pad_id, device=device)], 1)
    with attending:
        return _loop(
            model, cache, logits, next_pos, mask, history, keys, width, shared,
            (temperature, top_p, max_new_tokens, eos_ids, pad_id, stop_check),
        )  # fmt: skip


def _loop(
    model: PreTrainedModel,
    cache: DynamicCache,
    logits: torch.Tensor,
    next_pos: torch.Tensor,
    mask: torch.Tensor | None,
    history: torch.Tensor | None,
    keys: torch.Tensor,
    width: int,
    shared: bool,
    settings: tuple,
) -> Decoded:
    """The decode steps of :func:`decode`, from the prefill's last logits."""
    temperature, top_p, max_new_tokens, eos_ids, pad_id, stop_check = settings
    device = logits.device
    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
    logprobs = torch.zeros((rows, max_new_tokens))
    length = torch.full((rows,), max_new_tokens, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    ended_eos = torch.zeros(rows, dtype=torch.bool)
    eos = torch.tensor(eos_ids)
    live = torch.arange(rows)  # the original row of each batch row
    live_keys = keys.to(device)
    alive = torch.ones(rows, dtype=torch.bool)  # batch rows that have not ended
    for step in range(max_new_tokens):
        tok, lp = sample_step(logits, temperature, top_p, live_keys, step)
        tok_cpu, lp_cpu = tok.cpu(), lp.float().cpu()
        at = live[alive]
        tokens[at, step], logprobs[at, step] = tok_cpu[alive], lp_cpu[alive]
        is_eos = torch.isin(tok_cpu, eos) & alive
        done = is_eos
        if history is not None:
            history[:, width + step] = tok
            # Only the generated part: a stop string is matched in what the model wrote, never
            # across the end of the context (as vLLM matches it).
            done = done | (stop_check(history[:, width : width + step + 1], step + 1).cpu() & alive)
        if bool(done.any()):
            length[live[done]] = step + 1
            finished[live[done]] = True
            ended_eos[live[is_eos]] = True
        alive = alive & ~done
        n_alive = int(alive.sum())
        if n_alive == 0 or step == max_new_tokens - 1:
            break
        if mask is not None:
            mask[:, width + step] = 1
        # Rows that ended leave the batch. With copied contexts, copying the cache costs about a
        # fifth of a decode step per row, so ended rows ride along until they are a quarter of it;
        # with shared contexts only the rows' generated part is copied.
        if n_alive < len(alive) and (shared or 4 * (len(alive) - n_alive) >= len(alive)):
            keep = alive.nonzero().squeeze(1)
            live, alive = live[keep], alive[keep]
            keep = keep.to(device)
            live_keys, tok, next_pos = live_keys[keep], tok[keep], next_pos[keep]
            mask = mask[keep] if mask is not None else None
            history = history[keep] if history is not None else None
            cache.batch_select_indices(keep)
            if shared:
                cache.layers[0].layout.select(keep)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask[:, : width + step + 1] if mask is not None else None,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return Decoded(tokens, logprobs, length, finished, ended_eos)
