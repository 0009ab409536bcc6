"""Mask truncated completions out of the loss (TRL's ``mask_truncated_completions``).

A completion cut at ``max_new_tokens`` never reached its answer, so its reward says little about
its tokens. DRO trains with this mask (paper v1 §5.1, the Dr. GRPO loss settings). The advantages
are computed first over the whole group (the truncated rollouts still shape the baseline, as in
TRL); then the truncated rows' response mask and advantages are zeroed, so they add no gradient
and no tokens to the loss denominators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from components.callbacks.base import SignalCallback

if TYPE_CHECKING:
    from components.algos.batch import TokenBatch
    from components.handle import StepHandle


def truncated_rows(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``(N,)`` True where a non-empty response does not end with EOS (it was cut at the limit)."""
    n_tok = response_mask.sum(-1).long()
    last = response_ids.gather(-1, (n_tok - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (n_tok > 0) & (last != eos_id)


class MaskTruncated(SignalCallback):
    """Zero the loss mask and advantages of completions that ended without EOS."""

    def on_advantages(self, batch: TokenBatch, handle: StepHandle) -> None:
        resp = batch.input_ids[:, batch.context_width :]
        cut = truncated_rows(resp, batch.response_mask, handle.tokenizer.eos_token_id).to(batch.response_mask.device)
        batch.response_mask[cut] = 0
        batch.advantages[cut] = 0
        handle.log("loss/truncated_masked_frac", float(cut.float().mean()) if len(cut) else 0.0)
