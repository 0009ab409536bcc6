"""Policy losses and loss aggregation: pure tensor functions, registered by name.

All per-token tensors are ``(N, T)`` over response tokens with a 0/1 ``mask``; ``N`` rollouts of any
mix of groups. Losses are returned as quantities to *minimise*.

A registered policy loss (``model.loss.name``) is the whole loss of one micro-batch:
``loss_fn(LossInputs, LossConfig) -> (loss, metrics)``. It is built from a per-token surrogate
(:func:`ppo_clip_tokens`, :func:`raft_vanilla_tokens`, each registered with
:func:`register_policy_loss`) by :func:`complete_loss`, which adds what
every surrogate shares: truncated importance sampling, the KL and entropy terms, and the
aggregation, taken as this micro-batch's share of its mini-batch so that accumulating the shares
over micro-batches gives exactly one mini-batch's loss. A new surrogate is one registered function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from components.errors import ConfigError


@dataclass
class LossConfig:
    """Policy loss and its aggregation, KL and entropy terms (``model.loss``)."""

    name: str = "ppo_clip"  # ppo_clip | raft_vanilla
    agg: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # e.g. 3.0 or 10.0: caps the loss of negative-advantage tokens
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy of the policy (k3 estimator)
    entropy_coef: float = 0.0
    norm_len: int | None = None  # seq-mean-token-sum-norm divisor; default: max_new_tokens
    # Truncated importance sampling: multiply each token's policy-gradient term by
    # min(exp(old - sampling log-prob), tis_cap) (TRL / verl use 2-3). None: off.
    tis_cap: float | None = None


@dataclass
class LossInputs:
    """One micro-batch's tensors, all ``(n, R)`` over response tokens, and its mini-batch's denominators."""

    logp: torch.Tensor  # the policy's log-probs now (with gradient)
    old_logp: torch.Tensor  # recorded before the generation batch's first update
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor  # the policy's entropy now (with gradient)
    sampling_logp: torch.Tensor  # the engine's log-probs of the sampled tokens
    ref_logp: torch.Tensor | None  # the frozen reference's (KL term), None without one
    tok_den: torch.Tensor  # response tokens in the whole mini-batch
    seq_den: torch.Tensor  # non-empty responses in the whole mini-batch
    norm_len: int  # the constant length of seq-mean-token-sum-norm


TokenLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
PolicyLossFn = Callable[[LossInputs, LossConfig], tuple[torch.Tensor, dict[str, float]]]
AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def _register(table: dict, name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        table[name] = fn
        return fn

    return deco


def get_aggregation(name: str) -> Callable[..., torch.Tensor]:
    if name not in AGGREGATIONS:
        raise ConfigError("model.loss.agg", f"unknown aggregation {name!r}; valid: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def register_policy_loss(name: str) -> Callable[[TokenLossFn], TokenLossFn]:
    """Register a per-token surrogate under ``name`` as a whole loss (see :func:`complete_loss`)."""

    def deco(tokens_fn: TokenLossFn) -> TokenLossFn:
        POLICY_LOSSES[name] = complete_loss(tokens_fn)
        return tokens_fn

    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
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


# ---- the registered losses: a surrogate completed with TIS, KL, entropy and aggregation ----------
def truncated_is_weight(old_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weight ``min(exp(old - sampling), cap)`` per token, detached.

    Corrects for the engine sampling from a slightly different distribution than the trainer's
    (vLLM's kernels, bf16): the policy-gradient term of each token is multiplied by it (TRL's
    ``vllm_importance_sampling_correction``, verl's TIS). ``old`` is the trainer's log-prob of
    the token before the update, ``sampling`` the engine's.
    """
    return torch.exp((old_logp - sampling_logp).detach()).clamp(max=cap)


def complete_loss(tokens_fn: TokenLossFn) -> PolicyLossFn:
    """The registered loss made of a per-token surrogate: see the module docstring."""

    def loss_fn(x: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
        aggregate = get_aggregation(cfg.agg)
        mask = x.mask
        pg, info = tokens_fn(
            x.logp, x.old_logp, x.advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip
        )
        w = None
        if cfg.tis_cap is not None:
            w = truncated_is_weight(x.old_logp, x.sampling_logp, cfg.tis_cap)
            pg = pg * w
        total = pg
        kl = None
        if x.ref_logp is not None:
            kl = kl_k3(x.logp, x.ref_logp)
            total = total + cfg.kl_coef * kl
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * x.entropy
        # This micro-batch's share of the mini-batch aggregate, so accumulation is exact.
        share = mask.sum() / x.tok_den if cfg.agg == "token-mean" else (mask.sum(-1) > 0).sum() / x.seq_den
        loss = aggregate(total, mask, norm_len=x.norm_len) * share
        with torch.no_grad():
            ntok = mask.sum().clamp(min=1)
            metrics = {
                "loss/policy": float(aggregate(pg, mask, norm_len=x.norm_len)),
                "policy/entropy": float((x.entropy * mask).sum() / ntok),
                "policy/clip_frac": float((info["clipped"] * mask).sum() / ntok),
                "policy/dual_clip_frac": float((info["dual_clipped"] * mask).sum() / ntok),
                "policy/ratio_mean": float((info["ratio"] * mask).sum() / ntok),
                "loss/kl": float((kl * mask).sum() / ntok) if kl is not None else 0.0,
            }
            if w is not None:
                metrics["rollout/tis_weight_mean"] = float((w * mask).sum() / ntok)
                metrics["rollout/tis_capped_frac"] = float(((w >= cfg.tis_cap) * mask).sum() / ntok)
        return loss, metrics

    loss_fn.tokens_fn = tokens_fn  # type: ignore[attr-defined]
    loss_fn.__doc__ = f"The whole micro-batch loss around :func:`{tokens_fn.__name__}`."
    return loss_fn


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


@register_policy_loss("ppo_clip")
def ppo_clip_tokens(
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


@register_policy_loss("raft_vanilla")
def raft_vanilla_tokens(
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
