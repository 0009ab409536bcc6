"""The step's metrics: gate counts, budget, signal, cumulative totals, and their way to the loggers.

The functions take the policy module (``components.step.module.PolicyModule``) itself: they are the
Lightning side of the step, not a component.

Every recipe logs the same core set (DESIGN.md "Metrics"), so recipes compare on one table. Counts
are summed over data-parallel ranks before they are logged or accumulated; the cumulative budget
is checkpointed with the module (``module.cumulative``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch

from components.types import Group

if TYPE_CHECKING:
    from components.algos.batch import TokenBatch

# Per-step budget counters that also accumulate (``budget/cum_<name>``), checkpointed with the run.
CUMULATIVE = (
    "rollouts",
    "tokens",
    "rollouts_in_loss",
    "tokens_in_loss",
    "rollouts_nonzero_adv",
    "tokens_nonzero_adv",
    "tokens_forwarded",
    "optimizer_steps",
)

# Per-step counts summed over data-parallel ranks before they are logged or accumulated.
SUMMED = (
    "budget/rollouts",
    "budget/tokens",
    "budget/aux_tokens",
    "budget/rollouts_in_loss",
    "budget/tokens_in_loss",
    "budget/rollouts_nonzero_adv",
    "budget/tokens_nonzero_adv",
    "budget/tokens_forwarded",
    "_reward_sum",
    "gate/groups",
    "_gate_open",
    "_gate_all_zero",
    "_gate_all_one",
    "_group_size_sum",
    "_batch_rows",
    "_adv_sq_sum",
    "_adv_abs_sum",
)

# Per-step maxima over data-parallel ranks: every rank samples with its own engine, and the run is
# on-policy only if each of them is.
MAXED = ("rollout/logprob_gap_max",)


def log_gate(m: dict[str, float], groups: list[Group]) -> None:
    """Gate counts of the groups as the sampler returns them; fractions after the cross-rank sum."""
    m["_gate_open"] = sum(g.is_mixed for g in groups)
    m["_gate_all_zero"] = sum(g.size > 0 and not any(r.passed for r in g.rollouts) for g in groups)
    m["_gate_all_one"] = sum(g.size > 0 and all(r.passed for r in g.rollouts) for g in groups)
    m["gate/groups"] = len(groups)
    sizes = [g.size for g in groups] or [0]
    m["_group_size_sum"] = sum(sizes)
    m["sampler/group_size_max"] = max(sizes)
    m["sampler/group_size_min"] = min(sizes)


def reduce_across_ranks(module: L.LightningModule, m: dict[str, float]) -> None:
    """Sum the step's counts over data-parallel ranks (one all-reduce), in place, so budget,
    gate and reward metrics (and the cumulative budget, which ``BudgetCap`` reads) are the
    run's, identical on every rank; take the maximum of the :data:`MAXED` ones (a second
    all-reduce). Other metrics (losses, method diagnostics) stay rank 0's."""
    if module._trainer is None or module.trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return
    vals = torch.tensor([float(m.get(k, 0.0)) for k in SUMMED], dtype=torch.float64, device=module.device)
    vals = module.trainer.strategy.reduce(vals, reduce_op="sum")
    m.update(zip(SUMMED, vals.tolist()))
    # -1: not measured on that rank this step (no batch); these metrics are >= 0 when measured
    peaks = torch.tensor([float(m.get(k, -1.0)) for k in MAXED], dtype=torch.float64, device=module.device)
    peaks = module.trainer.strategy.reduce(peaks, reduce_op="max")
    m.update({k: v for k, v in zip(MAXED, peaks.tolist()) if v >= 0})


def log_step(module: L.LightningModule, groups: list[Group], batch: TokenBatch | None) -> None:
    """Finish the step's metrics (in-loss budget, signal, cross-rank sums, cumulative totals) and emit them."""
    m = module.step_metrics
    m["budget/rollouts_in_loss"] = sum(g.size for g in groups)
    m["budget/tokens_in_loss"] = sum(len(r.token_ids) for g in groups for r in g.rollouts)
    m["_batch_rows"] = batch.size if batch is not None else 0
    if batch is not None:
        nz = (batch.advantages != 0).any(-1).cpu()
        seq_adv = (batch.advantages.sum(-1) / batch.response_mask.sum(-1).clamp(min=1)).cpu()
        m["_adv_sq_sum"] = float((seq_adv**2).sum())
        m["_adv_abs_sum"] = float(seq_adv.abs().sum())
        m["budget/rollouts_nonzero_adv"] = float(nz.sum())
        m["budget/tokens_nonzero_adv"] = float(batch.response_mask.sum(-1).cpu()[nz].sum())
    else:
        m["budget/rollouts_nonzero_adv"] = m["budget/tokens_nonzero_adv"] = 0.0
    reduce_across_ranks(module, m)
    n_groups, rows = max(m["gate/groups"], 1), max(m.pop("_batch_rows"), 1)
    for k in ("open", "all_zero", "all_one"):
        m[f"gate/{k}_frac"] = m.pop(f"_gate_{k}") / n_groups
    m["sampler/group_size_mean"] = m.pop("_group_size_sum") / n_groups
    m["reward/mean"] = m.pop("_reward_sum", 0.0) / max(m.get("budget/rollouts", 0), 1)
    m["signal/adv_energy"] = m.pop("_adv_sq_sum", 0.0) / rows
    m["signal/adv_abs_mean"] = m.pop("_adv_abs_sum", 0.0) / rows
    m.setdefault("budget/optimizer_steps", 0.0)
    for k in CUMULATIVE:
        module.cumulative[k] += m.get(f"budget/{k}", 0.0)
        m[f"budget/cum_{k}"] = module.cumulative[k]
    module.cumulative["train_s"] += m["time/train_s"]
    m["time/cum_train_s"] = module.cumulative["train_s"]
    m["budget/nonzero_token_share"] = module.cumulative["tokens_nonzero_adv"] / max(module.cumulative["tokens"], 1)
    seen = len(module.prompt_history)
    m["train/never_solved_frac"] = sum(1 for n, p in module.prompt_history.values() if p == 0) / max(seen, 1)
    m["train/prompts_seen"] = seen
    m["train/response_len"] = m["budget/tokens_in_loss"] / max(m["budget/rollouts_in_loss"], 1)
    emit(module, m)


def emit(module: L.LightningModule, m: dict[str, float]) -> None:
    """Write the step's metrics to every logger in one call.

    Lightning's ``self.log`` costs ~0.5 ms per key (result collection, syncing checks), about
    17 ms for the ~35 keys of a step; the step's metrics are plain floats already reduced where
    needed, so they go to the loggers directly, at the step Lightning would use (the index of
    the generation batch) and with its ``log_every_n_steps``. Only the progress bar's two keys
    go through ``module.log_dict`` (not to the loggers).
    """
    metrics = {k: float(v) for k, v in m.items() if not k.startswith("_")}
    bar = {k: metrics[k] for k in ("reward/mean", "gate/open_frac") if k in metrics}
    module.log_dict(bar, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
    step = module.global_step - 1  # the optimizer step of this generation batch has been taken
    every = module.trainer.log_every_n_steps
    if every and ((step + 1) % every == 0 or module.trainer.should_stop):
        for lg in module.loggers:
            lg.log_metrics(metrics, step=step)


def log_completions(module: L.LightningModule, groups: list[Group]) -> None:
    """A table of sample completions (8 groups x 4 rollouts) in MLflow."""
    logger = module.logger
    if logger is None or not hasattr(logger, "experiment") or not hasattr(logger, "run_id"):
        return
    rows = {"step": [], "prompt": [], "answer": [], "completion": [], "reward": [], "passed": []}
    for g in groups[:8]:
        for r in g.rollouts[:4]:
            rows["step"].append(module.global_step)
            rows["prompt"].append(module.tokenizer.decode(g.context_ids, skip_special_tokens=True))
            rows["answer"].append(g.prompt.answer)
            rows["completion"].append(r.text)
            rows["reward"].append(r.reward)
            rows["passed"].append(bool(r.passed))
    # Extra per-rollout details (Rollout.meta, e.g. DRO's R3 token weights): one column each.
    shown = [r for g in groups[:8] for r in g.rollouts[:4]]
    for key in sorted({k for r in shown for k in r.meta}):
        rows[key] = [str(r.meta.get(key, "")) for r in shown]
    if rows["step"]:
        logger.experiment.log_table(logger.run_id, data=rows, artifact_file=f"completions/step_{module.global_step:06d}.json")
