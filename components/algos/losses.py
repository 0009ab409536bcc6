"""Policy losses and loss aggregation: pure tensor functions, registered by name.

All per-token tensors are ``(N, T)`` over response tokens with a 0/1 ``mask``; ``N`` rollouts of any
mix of groups. Losses are returned as quantities to *minimise*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.errors import ConfigError

AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}


def _register(table: dict, name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        table[name] = fn
        return fn

    return deco


def get_aggregation(name: str) -> Callable[..., torch.Tensor]:
    if name not in AGGREGATIONS:
        raise ConfigError("model.loss.agg", f"unknown aggregation {name!r}; valid: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def get_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    if name not in POLICY_LOSSES:
        raise ConfigError("model.loss.name", f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


# ---- aggregation ------------------------------------------------------------------------------
@_register(AGGREGATIONS, "token-mean")
def token_mean(x: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """DAPO: every valid token in the batch has equal weight."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


@_register(AGGREGATIONS, "seq-mean-token-mean")
def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """GRPO: average each sequence over its own tokens, then average sequences."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    has = (mask.sum(-1) > 0).to(x.dtype)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


@_register(AGGREGATIONS, "seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(x: torch.Tensor, mask: torch.Tensor, norm_len: int | None = None, **_: object) -> torch.Tensor:
    """Dr. GRPO: sum each sequence's tokens, divide by a *constant* length, average sequences.

    ``norm_len`` should be the maximum generation length (a constant, as Dr. GRPO prescribes); it
    defaults to the padded width of ``mask``, which is only constant if rollouts are padded to it.

    The average is over sequences with at least one response token, as in ``seq-mean-token-mean``.
    The module splits a mini-batch into micro-batches and weights each by its share of non-empty
    rows; dividing by all rows here made the gradient depend on that split as soon as one response
    was empty. TRL divides by all rows, but its completions always hold at least the EOS token, so
    the two agree on every batch TRL can produce.
    """
    denom = float(norm_len) if norm_len else float(mask.shape[-1])
    per_seq = (x * mask).sum(-1) / denom
    has = (mask.sum(-1) > 0).to(x.dtype)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


# ---- per-token pieces -------------------------------------------------------------------------
def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of the distribution, at sampling temperature."""
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref): ``exp(d) - d - 1`` with ``d = ref - logp``; >= 0.

    The plain estimator, as TRL with ``use_bias_correction_kl=False``: no importance correction by
    the ratio pi/pi_old when the batch is reused over several updates."""
    d = (ref_logp - logp).clamp(-20, 20)
    return d.exp() - d - 1


@_register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate ``max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))``.

    ``clip_high > clip_low`` is DAPO's clip-higher. ``dual_clip = c > 1`` caps the loss of
    negative-advantage tokens at ``-A c`` (verl's ``clip_ratio_c``). Returns the per-token loss and
    per-token indicators for logging.
    """
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_tok = (clipped > unclipped).float()
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        dual_tok = ((advantages < 0) & (loss > -advantages * dual_clip)).float()
        loss = torch.where(advantages < 0, capped, loss)
    else:
        dual_tok = torch.zeros_like(loss)
    return loss, {"ratio": ratio.detach(), "clipped": clipped_tok, "dual_clipped": dual_tok}


@_register(POLICY_LOSSES, "raft_vanilla")
def raft_vanilla_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla RAFT: per-token ``-A log pi`` (no importance ratio, no clip), the GVM authors'
    ``compute_policy_loss_vanilla`` (``policy_loss=vanilla``). With the ``raft`` advantage this is
    supervised fine-tuning on the accepted samples. RAFT++ is ``ppo_clip`` (importance sampling and
    clipping, the authors' ``policy_loss=plusplus``) with the same advantage; the two agree at ratio 1
    and differ once a generation batch is used for several updates. The clip settings are accepted
    and only reported (the ratio and what the clip *would* do), as in the authors' code.
    """
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    loss = -advantages * logp
    would_clip = (-advantages * ratio.clamp(1 - clip_low, 1 + clip_high) > -advantages * ratio).float()
    return loss, {"ratio": ratio.detach(), "clipped": would_clip, "dual_clipped": torch.zeros_like(loss)}
