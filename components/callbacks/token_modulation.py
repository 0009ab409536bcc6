"""DynaMO token-level advantage modulation (Fang et al. 2026, arXiv 2602.19208; code
``GithubX-F/DynaMO-RL`` ``dp_actor.py``, mode ``decay6_linearnorm``).

Each token's advantage is multiplied by two detached factors::

    A'_{i,t} = A_{i,t} * beta_comp_{i,t} * beta_stab_{i,t}

* **Compensation** (positive-advantage tokens only): confident tokens get a larger step, since the
  softmax gradient of a token shrinks as its probability approaches 1::

      beta_comp = 1 + (mu_max - 1) * (H_max - H_{i,t}) / (H_max - H_min)    if A > 0, else 1

* **Stabiliser**: damps the tokens whose update would move the policy entropy most. With
  ``Lambda = log pi + H`` and ``xi = I_clip * rho * A`` (``I_clip`` = 0 where the clipped surrogate
  has no gradient), the entropy change is estimated as ``dH = -xi * (pi * Lambda - E[pi * Lambda])``
  with the expectation replaced by the masked mean over the sequence (the full-vocabulary
  distribution is not kept); ``x = |dH| / max |dH|`` and::

      beta_stab = lambda_min + (1 - lambda_min) / (1 + exp(gamma * (x - tau)))

  With tau = 0.99 and x <= 1 the smallest factor reached is ~0.75 (at the single max token); tokens
  with x < 0.9 are untouched. A light damping of the top tokens, as in the authors' code.

Defaults are the authors' ``decay6_linearnorm`` (mu_max 1.2, lambda_min 0.6, tau 0.99, gamma 50);
their ``decay5_linearnorm`` is mu_max 1.4, lambda_min 0.6, tau 0.9.

Two forms, chosen by ``where``:

* ``where: micro_batch`` — **the authors' form** (``dp_actor.py``): the factors are computed inside
  the update, in every forwarded micro-batch of every mini-batch update (the
  ``SignalCallback.on_micro_batch`` hook), from that forward's entropy and the real ratio
  pi/pi_old, so the stabiliser's clip indicator acts once a batch feeds several updates; H_max,
  H_min and max |dH| are taken over *all* valid tokens of the micro-batch, zero-advantage tokens
  included. The authors' micro-batches hold every row, so this form needs
  ``model.skip_zero_advantage: false`` (a skipped row would change the statistics), and the
  factors depend on ``micro_batch_rows`` as the authors' do on their micro-batch size.
* ``where: batch`` (default) — ours, below.

Choices of ``where: batch`` where the reference is silent or differs (UNVERIFIED against the paper
body, which was not reachable; they are tested in ``tests/unit/callbacks/test_token_modulation.py``):

* **When**: the factors are computed once per generation batch, in ``on_advantages``, from the
  policy that sampled it (one no-grad forward over the rows with a non-zero advantage). The authors
  compute them inside every micro-batch of the update from that forward's entropy and ratio. With
  one PPO epoch and one mini-batch (every recipe here) the policy, the entropies and the ratios
  (rho = 1, so ``I_clip`` = 1) are the same; with several epochs the factors stay those of the
  rollout policy.
* **Over which tokens**: H_max, H_min and max |dH| are taken over the batch's tokens with a
  non-zero advantage, not over each micro-batch's valid tokens. The factors then do not depend on
  ``micro_batch_rows`` (the authors' pitfall: they change with dynamic batching), and skipping
  zero-advantage rows stays exact.
* ``H_max == H_min`` (no entropy spread) gives beta_comp = 1; ``max |dH| == 0`` gives x = 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from components.callbacks.base import SignalCallback
from components.errors import ConfigError

if TYPE_CHECKING:
    from components.algos.batch import TokenBatch
    from components.handle import StepHandle

WHERE = ("batch", "micro_batch")
# Diagnostics when no token carries an advantage (nothing is modulated).
_NEUTRAL = {"comp_mean": 1.0, "stab_mean": 1.0, "stab_min": 1.0, "factor_mean": 1.0, "dH_abs_mean": 0.0}


def dynamo_token_factors(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    ratio: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    mu_max: float = 1.2,
    lambda_min: float = 0.6,
    tau: float = 0.99,
    gamma: float = 50.0,
    stats_over: str = "nonzero",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token modulation factors ``beta_comp * beta_stab`` (``(N, T)``, detached, 1 off ``mask``).

    All inputs are ``(N, T)`` over response tokens. ``ratio`` is pi/pi_old per token (default 1:
    on-policy). Statistics (entropy range, max |dH|) are over the tokens in ``mask`` that have a
    non-zero advantage (``stats_over: nonzero``) or over every token in ``mask`` (``all``, the
    authors'). Returns the factors and scalar diagnostics.
    """
    with torch.no_grad():
        adv, logp, ent = advantages.float(), logp.float(), entropy.float()
        m = mask > 0
        act = m & (adv != 0)
        ones = torch.ones_like(adv)
        if not act.any():
            return ones, dict(_NEUTRAL)
        rho = ones if ratio is None else ratio.float()
        pool = m if stats_over == "all" else act  # the tokens the statistics are taken over

        # Compensation: linear in entropy, top at the most confident token, positive A only.
        h_act = ent[pool]
        h_max, h_min = h_act.max(), h_act.min()
        spread = h_max - h_min
        if spread > 1e-12:
            comp = 1 + (mu_max - 1) * (h_max - ent) / spread
        else:
            comp = ones.clone()
        comp = torch.where(act & (adv > 0), comp, ones)

        # Stabiliser: estimated entropy change of each token's update, normalised by its max.
        i_clip = ((adv > 0) & (rho <= 1 + clip_high)) | ((adv < 0) & (rho >= 1 - clip_low))
        xi = i_clip.float() * rho * adv
        pl = logp.exp() * (logp + ent)
        n_tok = m.sum(-1, keepdim=True).clamp(min=1)
        seq_mean = (pl * m).sum(-1, keepdim=True) / n_tok
        d_h = (-xi * (pl - seq_mean)).abs() * pool
        big = d_h.max()
        x = d_h / big if big > 0 else torch.zeros_like(d_h)
        stab = lambda_min + (1 - lambda_min) * torch.sigmoid(-gamma * (x - tau))
        stab = torch.where(act, stab, ones)

        factor = comp * stab
        info = {
            "comp_mean": float(comp[act].mean()),
            "stab_mean": float(stab[act].mean()),
            "stab_min": float(stab[act].min()),
            "factor_mean": float(factor[act].mean()),
            "dH_abs_mean": float(d_h[act].mean()),
        }
        return factor.to(advantages.dtype), info


class DynaMOModulation(SignalCallback):
    """DynaMO's token-level advantage modulation as a signal callback (see the module docstring).

    Add it to a recipe's ``trainer.callbacks`` (``recipes/dynamo.yaml`` pairs it with DynaMO's
    rollout allocation). Logs ``dynamo/comp_mean``, ``dynamo/stab_mean``, ``dynamo/stab_min``,
    ``dynamo/factor_mean`` (over the modulated tokens) and ``dynamo/dH_abs_mean``.

    Args:
        mu_max: compensation at the lowest-entropy positive token (authors: 1.2).
        lambda_min: floor of the stabiliser sigmoid (authors: 0.6).
        tau: sigmoid centre on the normalised entropy change (authors: 0.99).
        gamma: sigmoid steepness (authors: 50).
        where: ``batch`` (ours: once per step, before the updates) or ``micro_batch`` (the authors':
            inside every micro-batch of the update, real ratio, statistics over all its tokens).
    """

    def __init__(
        self, mu_max: float = 1.2, lambda_min: float = 0.6, tau: float = 0.99, gamma: float = 50.0, where: str = "batch"
    ) -> None:
        checks = (
            ("mu_max", mu_max, mu_max >= 1, ">= 1 (1 switches compensation off)"),
            ("lambda_min", lambda_min, 0 < lambda_min <= 1, "in (0, 1] (1 switches the stabiliser off)"),
            ("tau", tau, 0 < tau <= 1, "in (0, 1] (a point on the normalised entropy change)"),
            ("gamma", gamma, gamma > 0, "> 0"),
        )
        for name, val, ok, valid in checks:
            if not (isinstance(val, (int, float)) and math.isfinite(val) and ok):
                raise ConfigError(f"DynaMOModulation.{name}", f"must be {valid}, got {val!r}")
        if where not in WHERE:
            raise ConfigError("DynaMOModulation.where", f"must be one of {list(WHERE)}, got {where!r}")
        self.mu_max, self.lambda_min, self.tau, self.gamma = mu_max, lambda_min, tau, gamma
        self.where = where
        self._sums: dict[str, float] = {}
        self._n = 0
        self.clip = (0.2, 0.2)  # the loss's (clip_low, clip_high), read from the run's loss at setup

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        lc = getattr(pl_module, "loss_cfg", None)
        if lc is not None:
            self.clip = (lc.clip_low, lc.clip_high)
        if self.where != "micro_batch":
            return
        if not hasattr(SignalCallback, "on_micro_batch"):
            raise ConfigError("DynaMOModulation.where", "micro_batch needs the update's on_micro_batch hook, absent here")
        # The flag lives on the module's updater (model.skip_zero_advantage); reading it off the
        # module itself found nothing, so this guard never fired before.
        if getattr(getattr(pl_module, "updater", None), "skip_zero_advantage", False):
            raise ConfigError(
                "model.skip_zero_advantage",
                "must be false with DynaMOModulation where: micro_batch (its statistics cover every row)",
            )

    def on_micro_batch(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        entropy: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        handle: StepHandle,
    ) -> torch.Tensor:
        """The authors' form: factors from this micro-batch's forward and real ratio, over all its tokens."""
        if self.where != "micro_batch":
            return advantages
        factor, info = dynamo_token_factors(
            advantages, logp, entropy, mask, ratio=torch.exp((logp - old_logp).clamp(-20, 20)),
            clip_low=self.clip[0], clip_high=self.clip[1],
            mu_max=self.mu_max, lambda_min=self.lambda_min, tau=self.tau, gamma=self.gamma, stats_over="all",
        )  # fmt: skip
        # Diagnostics: the mean over the step's micro-batches, logged by on_train_batch_end.
        for k, v in info.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        for k, v in self._sums.items():
            handle.log(f"dynamo/{k}", v / self._n)
        return advantages * factor.detach()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sums, self._n = {}, 0

    def on_advantages(self, batch: TokenBatch, handle: StepHandle) -> None:
        if self.where == "micro_batch":
            return
        adv = batch.advantages
        rows = (adv != 0).any(-1).nonzero().squeeze(-1).cpu()
        if len(rows):
            logp, ent = handle.logprobs(batch, rows)  # no gradient
            idx = rows.to(adv.device)
            factor, info = dynamo_token_factors(
                adv[idx], logp, ent, batch.response_mask[idx],
                clip_low=self.clip[0], clip_high=self.clip[1],
                mu_max=self.mu_max, lambda_min=self.lambda_min, tau=self.tau, gamma=self.gamma,
            )  # fmt: skip
            adv[idx] = adv[idx] * factor
        else:
            info = dict(_NEUTRAL)
        for k, v in info.items():
            handle.log(f"dynamo/{k}", v)
