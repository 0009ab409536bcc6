"""Decode-time attention over a context shared by several rollouts, read once per context.

A group's rollouts share their context, which is most of every row's KV cache when answers are
short. Copying the context's keys and values to each row (what a batch of rows needs for ordinary
attention) costs a copy of the cache per row at the start and re-reads the same context once per
row at every step; for small models on CPU that memory traffic is as large as the arithmetic.

Here the cache keeps the context part once per distinct context, ``(contexts, kv_heads, C, d)``,
and each row's generated part on its own, ``(rows, kv_heads, steps, d)``. The attention scores of
a row are its scores against its context's keys (the rows of one context as one batched product:
every context's keys are read once) and against its own generated keys, put side by side before
one softmax, so the result is ordinary attention over ``context + generated`` (the same numbers up
to float rounding). Registered with transformers as an attention implementation, switched on only
around the decode steps of :func:`components.engines.decode.decode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import DynamicLayer

NAME = "curate_shared_prefix"


@dataclass
class RowLayout:
    """Where each live row sits: its context and its slot among that context's rows (``slots`` per
    context), and the additive mask of the contexts' left padding ``(contexts, C)``."""

    context: torch.Tensor  # (rows,) long
    slot: torch.Tensor  # (rows,) long
    slots: int
    pad_bias: torch.Tensor  # (contexts, C): 0 on tokens, -inf on left padding

    @property
    def grouped(self) -> torch.Tensor:
        """Each row's index in the ``(contexts * slots)`` grouped layout."""
        return self.context * self.slots + self.slot

    def select(self, keep: torch.Tensor) -> None:
        self.context, self.slot = self.context[keep], self.slot[keep]


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache: the prefilled contexts' keys and values once each, every row's generated
    keys and values in a step-major buffer ``(steps, rows, kv_heads, d)`` written in place.

    Step-major because a fresh buffer's pages are only touched when written: each step writes one
    contiguous block, where a row-major buffer would touch every page of it at the first step.
    """

    def __init__(self, prefix: DynamicLayer, layout: RowLayout, rows: int, steps: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = prefix.dtype, prefix.device, True
        self.layout = layout
        self.pk, self.pv = prefix.keys.contiguous(), prefix.values.contiguous()
        h = self.pk.shape[1]
        self.sk = self.pk.new_empty((steps, rows, h, self.pk.shape[-1]))
        self.sv = self.pv.new_empty((steps, rows, h, self.pv.shape[-1]))
        self.n = 0
        self._views()

    def _views(self) -> None:
        self.keys = self.sk[: self.n].permute(1, 2, 0, 3)  # (rows, kv_heads, n, d)
        self.values = self.sv[: self.n].permute(1, 2, 0, 3)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[-2]
        self.sk[self.n : self.n + q] = key_states.permute(2, 0, 1, 3)
        self.sv[self.n : self.n + q] = value_states.permute(2, 0, 1, 3)
        self.n += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.pk.shape[-2] + self.n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        sk = self.sk.new_empty((self.sk.shape[0], len(indices), *self.sk.shape[2:]))
        sv = self.sv.new_empty((self.sv.shape[0], len(indices), *self.sv.shape[2:]))
        sk[: self.n], sv[: self.n] = self.sk[: self.n, indices], self.sv[: self.n, indices]
        self.sk, self.sv = sk, sv
        self._views()


_ACTIVE: list[list[SharedPrefixLayer]] = []  # the cache of the decode step running now (one at a time)


def _attention(
    attn: torch.nn.Module,  # the attention layer (transformers passes it positionally)
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query`` (rows, heads, 1, d) against the row's context (shared) and its generated tokens."""
    layer = _ACTIVE[-1][attn.layer_idx]
    lay = layer.layout
    rows, heads, q_len, d = query.shape
    u, kv_heads, c, _ = layer.pk.shape
    r = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    scale = scaling if scaling is not None else d**-0.5
    q = (query[:, :, 0] * scale).reshape(rows, kv_heads, r, d)
    idx = lay.grouped
    # Context part, grouped by context: (contexts, kv_heads, slots * r, C), each context's keys read once.
    qg = q.new_zeros((u * lay.slots, kv_heads, r, d))
    qg[idx] = q
    qg = qg.view(u, lay.slots, kv_heads, r, d).transpose(1, 2).reshape(u, kv_heads, lay.slots * r, d)
    sp = torch.matmul(qg, layer.pk.transpose(-1, -2)) + lay.pad_bias[:, None, None, :]
    sp = sp.view(u, kv_heads, lay.slots, r, c).transpose(1, 2).reshape(u * lay.slots, kv_heads, r, c)[idx]
    # Generated part, per row: (rows, kv_heads, r, steps).
    ss = torch.matmul(q, key.transpose(-1, -2))
    w = torch.softmax(torch.cat([sp, ss], -1).float(), -1).to(q.dtype)
    wp, ws = w[..., :c], w[..., c:]
    out = torch.matmul(ws, value)
    wg = wp.new_zeros((u * lay.slots, kv_heads, r, c))
    wg[idx] = wp
    wg = wg.view(u, lay.slots, kv_heads, r, c).transpose(1, 2).reshape(u, kv_heads, lay.slots * r, c)
    og = torch.matmul(wg, layer.pv).view(u, kv_heads, lay.slots, r, -1).transpose(1, 2)
    out = out + og.reshape(u * lay.slots, kv_heads, r, -1)[idx]
    return out.reshape(rows, 1, heads, -1), None


AttentionInterface.register(NAME, _attention)


def supported(model: PreTrainedModel) -> bool:
    """Plain full attention (no sliding window, no logit soft-capping) through transformers'
    attention interface: what :func:`_attention` computes exactly."""
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    return bool(getattr(model, "_can_set_attn_implementation", lambda: False)())


@contextlib.contextmanager
def active(model: PreTrainedModel, layers: list[SharedPrefixLayer]) -> Iterator[None]:
    """The model attends with :func:`_attention` over ``layers`` while inside."""
    before = model.config._attn_implementation
    _ACTIVE.append(layers)
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.pop()
