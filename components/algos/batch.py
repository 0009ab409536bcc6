"""The token batch of one step: ragged groups flattened by index, and the forward that scores its rows.

``build_batch`` turns the kept groups into padded ``(N, C + R)`` rows (each row keeps the context it
was sampled from); ``forward_logprobs`` gives the per-token log-probs and entropies of any rows of
it under any model, forwarding each group's shared context once when asked. Both are functions of
their arguments only; the module and the samplers that score rollouts (GVM) share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from components.algos.losses import token_logprobs_and_entropy
from components.types import Group


@dataclass
class TokenBatch:
    """The flattened rollouts that reach the loss: one row per rollout, ragged groups by index."""

    input_ids: torch.Tensor  # (N, C + R): left-padded context, right-padded response
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # (N, R) 1 on response tokens (EOS included)
    context_width: int
    group: torch.Tensor  # (N,) group index
    rewards: torch.Tensor  # (N,)
    group_weight: torch.Tensor  # (N,) prompt weight w(p) of each rollout's group
    row_weight: torch.Tensor  # (N,) per-rollout weight (Rollout.weight), 1 unless a sampler sets it
    baseline: torch.Tensor  # (G,) per-group baseline, NaN = estimator's own
    sampling_logprobs: torch.Tensor  # (N, R) from the engine
    advantages: torch.Tensor | None = None  # (N, R) per token
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Start of each segment in the concatenation of segments of these lengths."""
    return torch.cumsum(lengths, 0) - lengths


def build_batch(groups: list[Group], pad_id: int, device: torch.device | str = "cpu") -> TokenBatch:
    """Flatten ragged groups into padded tensors; each row keeps the context it was sampled from.

    Vectorised: the token lists are concatenated once and scattered into place with index
    arithmetic (one tensor per field, none per row). Contexts are left-padded to the widest, so
    every response starts at column ``context_width``; responses are right-padded.
    """
    rollouts = [r for g in groups for r in g.rollouts]
    sizes = torch.tensor([g.size for g in groups], dtype=torch.long)
    n = len(rollouts)
    group = torch.repeat_interleave(torch.arange(len(groups)), sizes)

    # Contexts: one left-padded row per group, gathered to its rollouts.
    ctx_len = torch.tensor([len(g.context_ids) for g in groups], dtype=torch.long)
    cw = int(ctx_len.max())
    ctx_flat = torch.tensor(list(chain.from_iterable(g.context_ids for g in groups)), dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(groups)), ctx_len)
    col = cw - ctx_len[seg] + (torch.arange(len(ctx_flat)) - _offsets(ctx_len)[seg])
    gctx = torch.full((len(groups), cw), pad_id, dtype=torch.long)
    gatt = torch.zeros((len(groups), cw), dtype=torch.long)
    gctx[seg, col] = ctx_flat
    gatt[seg, col] = 1

    # Responses: right-padded, scattered from one flat list.
    resp_len = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.long)
    rw = max(int(resp_len.max()) if n else 0, 1)
    tok_flat = torch.tensor(list(chain.from_iterable(r.token_ids for r in rollouts)), dtype=torch.long)
    lp_flat = torch.tensor(list(chain.from_iterable(r.logprobs for r in rollouts)), dtype=torch.float)
    rseg = torch.repeat_interleave(torch.arange(n), resp_len)
    rcol = torch.arange(len(tok_flat)) - _offsets(resp_len)[rseg]
    resp = torch.full((n, rw), pad_id, dtype=torch.long)
    rmask = torch.zeros((n, rw))
    slp = torch.zeros((n, rw))
    resp[rseg, rcol] = tok_flat
    rmask[rseg, rcol] = 1.0
    slp[rseg, rcol] = lp_flat

    ids = torch.cat([gctx[group], resp], 1)
    att = torch.cat([gatt[group], rmask.long()], 1)
    return TokenBatch(
        input_ids=ids.to(device),
        attention_mask=att.to(device),
        response_mask=rmask.to(device),
        context_width=cw,
        group=group,
        rewards=torch.tensor([r.reward for r in rollouts], dtype=torch.float),
        group_weight=torch.tensor([g.weight for g in groups], dtype=torch.float)[group],
        row_weight=torch.tensor([r.weight for r in rollouts], dtype=torch.float),
        baseline=torch.tensor([math.nan if g.baseline is None else g.baseline for g in groups], dtype=torch.double),
        sampling_logprobs=slp.to(device),
    )


def forward_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    rows: torch.Tensor,
    temperature: float = 1.0,
    shared_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-token log-probs and entropies ``(len(rows), R)`` of the response tokens of ``rows``
    under ``model``, and the number of tokens the forward pass processed.

    Columns that no row of ``rows`` uses (context padding on the left, response padding on the
    right) are cut before the forward and the outputs padded back with zeros, and the output head
    runs on response positions only. With ``shared_prompt`` the context of each group in ``rows``
    is forwarded once (see :func:`shared_prompt_logits`); otherwise every row is forwarded whole.
    """
    cw, rw = batch.context_width, batch.response_mask.shape[1]
    att = batch.attention_mask[rows]
    c0 = cw - int(att[:, :cw].sum(-1).max())  # first context column any row uses
    r1 = max(int(att[:, cw:].sum(-1).max()), 1)  # widest response among the rows
    ids, att = batch.input_ids[rows][:, c0 : cw + r1], att[:, c0 : cw + r1]
    c = cw - c0
    # Gradient checkpointing turns the KV cache off in training: forward whole rows then.
    if shared_prompt and not getattr(model, "is_gradient_checkpointing", False):
        logits, n_tok = shared_prompt_logits(model, ids, att, c, batch.group[rows])
    else:
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        # Logits at position t predict token t+1: the response's are at c - 1 ... c + r1 - 2.
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=r1 + 1).logits[:, :-1]
        n_tok = int(att.sum())
    logp, ent = token_logprobs_and_entropy(logits, ids[:, c:], temperature or 1.0)
    if r1 < rw:
        logp, ent = (torch.nn.functional.pad(x, (0, rw - r1)) for x in (logp, ent))
    return logp, ent, n_tok


def shared_prompt_logits(
    model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, c: int, group: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Logits predicting each response token, forwarding each group's shared context once.

    ``ids``/``att`` are ``(n, c + r)`` rows (left-padded context of width ``c``, right-padded
    response); rows of one ``group`` share their context (``build_batch`` gives every rollout of a
    group the group's ``context_ids``). One forward over the distinct contexts, with gradient,
    fills a KV cache; the cache is indexed out to the rows (its backward sums each row's gradient
    into its group's context), and the responses are forwarded on top of it. The result equals the
    plain forward's up to float rounding (``tests/unit/step/test_update.py``), for a fraction of the work
    when responses are short next to contexts. Returns ``(n, r, V)`` logits and the tokens forwarded.
    """
    g = group.to("cpu")
    uniq, inv = torch.unique(g, return_inverse=True)
    first = torch.empty(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(len(g)))
    inv, first = inv.to(ids.device), first.to(ids.device)
    p_ids, p_att = ids[first, :c], att[first, :c]
    p_pos = (p_att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=p_ids, attention_mask=p_att, position_ids=p_pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_select_indices(inv)
    r = ids.shape[1] - c
    r_pos = p_att.sum(-1, keepdim=True)[inv] + torch.arange(r, device=ids.device)
    logits = model(input_ids=ids[:, c:], attention_mask=att, position_ids=r_pos, past_key_values=cache).logits
    logits = torch.cat([out.logits[:, -1:][inv], logits[:, :-1]], 1)
    return logits, int(p_att.sum()) + int(att[:, c:].sum())
