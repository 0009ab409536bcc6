"""Signal-health metrics, logged by every recipe: does the learning signal still exist, and is one
rollout carrying it?

Low cross-rollout variance is both a symptom and a driver of collapse, and a lone lucky success in
a hopeless group gets an outsized advantage. Once per step the module calls :func:`log_signal_health`
(after the update), which logs under ``health/``:

- ``distinct_completions`` / ``distinct_answers``: mean number of distinct completions (token ids)
  and distinct extracted answers per group; ``distinct_completion_frac`` / ``distinct_answer_frac``:
  the same divided by group size (1: every rollout differs); ``single_answer_frac``: groups of >= 2
  rollouts that all give one answer (the group can only be all-right or all-wrong).
- ``lone_groups_frac``: groups of >= 2 with exactly one success (a *lone success*) or exactly one
  failure (a *lone failure*); ``lone_adv_max``: the largest |advantage| (mean over the rollout's
  response tokens, after every signal callback) given to a lone rollout; ``lone_adv_max_share``: that
  rollout's share of the batch's advantage mass ``sum_tokens |A|`` (the weight the loss gives it);
  ``lone_mass_share``: all lone rollouts' share.
- drift from the initial policy, a mean per-token KL on rollouts (k3 estimator, as the loss's KL):
  ``kl_ref``: KL(pi_theta || pi_ref) on this step's rollouts, every step, when the run keeps a
  reference model (``loss.kl_coef > 0``; the reference is the initial policy), from the log-probs the
  update already computed; otherwise ``kl_init_probe``: KL(pi_init || pi_theta) on a fixed *probe* of
  the first step's rollouts (at most ``PROBE_ROWS``), whose initial log-probs are those the engine
  sampled them with; every ``PROBE_EVERY`` steps, one no-grad forward of the probe rows. No second
  model is kept. The probe lives on the module, not in the checkpoint: after a resume it is re-taken,
  and drift is measured from the resumed policy.

The pure parts (:func:`diversity`, :func:`lone_rollouts`, :func:`probe_kl`) take groups and tensors
and are tested on scripted groups. :func:`components.analysis.curves.plot_signal_health` draws the
series beside pass@1 for the ablation runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from components.algos.losses import kl_k3
from components.types import Group

PROBE_ROWS = 64  # rollouts kept as the drift probe
PROBE_EVERY = 10  # steps between probe forwards (the only extra compute of these metrics)


def diversity(groups: Sequence[Group], answer_of: Callable[[str], str] = str.strip) -> dict[str, float]:
    """Within-group diversity: distinct completions and distinct answers per group."""
    sized = [g for g in groups if g.size > 0]
    if not sized:
        return {}
    comp = [len({tuple(r.token_ids) for r in g.rollouts}) for g in sized]
    ans = [len({answer_of(r.text) for r in g.rollouts}) for g in sized]
    multi = [(a, g) for a, g in zip(ans, sized, strict=True) if g.size >= 2]
    b = len(sized)
    return {
        "distinct_completions": sum(comp) / b,
        "distinct_answers": sum(ans) / b,
        "distinct_completion_frac": sum(c / g.size for c, g in zip(comp, sized, strict=True)) / b,
        "distinct_answer_frac": sum(a / g.size for a, g in zip(ans, sized, strict=True)) / b,
        "single_answer_frac": sum(a == 1 for a, _ in multi) / len(multi) if multi else 0.0,
    }


def lone_rollouts(groups: Sequence[Group]) -> list[int]:
    """Row indices (in batch order: groups in order, rollouts in order) of lone successes and lone
    failures: the one passing (or the one failing) rollout of a group of >= 2."""
    rows, start = [], 0
    for g in groups:
        passed = [bool(r.passed) for r in g.rollouts]
        if g.size >= 2:
            if sum(passed) == 1:
                rows.append(start + passed.index(True))
            elif sum(passed) == g.size - 1:
                rows.append(start + passed.index(False))
        start += g.size
    return rows


def lone_advantage(groups: Sequence[Group], advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The largest |advantage| on a lone rollout and the shares of the advantage mass.

    ``advantages`` and ``mask`` are ``(N, T)`` per token, rows in batch order. A rollout's advantage is
    its mean over response tokens; its mass is ``sum_t |A_t|``.
    """
    n_groups = sum(g.size >= 2 for g in groups)
    rows = lone_rollouts(groups)
    adv, m = advantages.detach().float().cpu(), mask.detach().float().cpu()
    mass = (adv.abs() * m).sum(-1)
    total = float(mass.sum())
    out = {"lone_groups_frac": len(rows) / n_groups if n_groups else 0.0}
    if not rows:
        return {**out, "lone_adv_max": 0.0, "lone_adv_max_share": 0.0, "lone_mass_share": 0.0}
    idx = torch.tensor(rows)
    seq = (adv[idx] * m[idx]).sum(-1) / m[idx].sum(-1).clamp(min=1)
    j = int(seq.abs().argmax())
    return {
        **out,
        "lone_adv_max": float(seq.abs()[j]),
        "lone_adv_max_share": float(mass[idx[j]]) / total if total > 0 else 0.0,
        "lone_mass_share": float(mass[idx].sum()) / total if total > 0 else 0.0,
    }


def probe_kl(init_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token KL(pi_init || pi) on rollouts sampled from pi_init (k3: ``exp(d) - d - 1`` with
    ``d = log pi - log pi_init``, unbiased under pi_init and >= 0)."""
    m = mask.float()
    k = kl_k3(init_logprobs.float(), logprobs.float())
    return float((k * m).sum() / m.sum().clamp(min=1))


def _answer_fn(module: Any) -> Callable[[str], str]:
    from components.rewards.verifier import extract_answer

    how = getattr(getattr(module, "reward", None), "extract", "strip")
    return lambda text: extract_answer(text, how)


def _drift(module: Any, batch: Any) -> dict[str, float]:
    if batch.ref_logprobs is not None:  # a reference model exists: the update computed its log-probs
        now = batch.old_logprobs if batch.old_logprobs is not None else batch.sampling_logprobs
        return {"kl_ref": probe_kl(now.to(batch.ref_logprobs.device), batch.ref_logprobs, batch.response_mask)}
    probe = getattr(module, "_health_probe", None)
    if probe is None:
        rows = torch.arange(min(batch.size, PROBE_ROWS))
        probe = replace(
            batch,
            input_ids=batch.input_ids[rows],
            attention_mask=batch.attention_mask[rows],
            response_mask=batch.response_mask[rows],
            group=batch.group[rows],
            rewards=batch.rewards[rows],
            group_weight=batch.group_weight[rows],
            row_weight=batch.row_weight[rows],
            sampling_logprobs=batch.sampling_logprobs[rows],
            advantages=None,
            old_logprobs=None,
            ref_logprobs=None,
            extras={},
        )
        module._health_probe = probe
        return {"kl_init_probe": 0.0}
    if module.global_step % PROBE_EVERY:
        return {}
    logp, _ = module.handle.logprobs(probe)  # no gradient
    return {"kl_init_probe": probe_kl(probe.sampling_logprobs, logp, probe.response_mask)}


def log_signal_health(module: Any, groups: Sequence[Group], batch: Any) -> None:
    """Every ``health/`` metric of this step, into the module's step metrics (one call per step)."""
    stats = diversity(groups, _answer_fn(module))
    if batch is not None and batch.advantages is not None:
        stats.update(lone_advantage(groups, batch.advantages, batch.response_mask))
        stats.update(_drift(module, batch))
    for k, v in stats.items():
        module.handle.log(f"health/{k}", v)
