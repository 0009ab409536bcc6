"""The policy module: one LightningModule that runs the curated GRPO-style training step.

``training_step`` reads top to bottom as the step in DESIGN.md:

    prompts -> sampler (engine + reward) -> signal callbacks (on_groups) -> advantages
            -> signal callbacks (on_advantages) -> policy loss -> optimizer step -> engine sync

Optimisation is manual (``automatic_optimization = False``) because one generation batch may be
used for several PPO epochs and mini-batches; Lightning still owns backward (``manual_backward``),
precision, gradient clipping, strategies, checkpointing and logging.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from components.algos.advantages import get_advantage
from components.algos.losses import get_aggregation, get_policy_loss
from components.callbacks.base import SignalCallback
from components.callbacks.lifecycle import rng_state, set_rng_state
from components.engines.base import RolloutEngine, SamplingParams
from components.engines.hf import HFEngine
from components.errors import ConfigError
from components.policy import encode_messages, encode_prompt, load_policy
from components.rewards.verifier import Reward, VerifierReward, score_guarded
from components.samplers.base import FixedGroupSampler, Sampler
from components.step.signal_health import log_signal_health
from components.step.update import (
    AdvantageConfig,
    LossConfig,
    TokenBatch,
    Updater,
    build_batch,
    compute_advantages,
    forward_logprobs,
)
from components.types import Group, Prompt, Rollout


@dataclass
class EvalConfig:
    """Held-out evaluation on the bare prompt."""

    samples: int = 4  # samples per item: pass@1 is their mean, pass@k uses the unbiased estimator
    temperature: float = 1.0
    at_start: bool = True  # evaluate before the first step (logged at step 0)


def _pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c passes (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


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


class PolicyModule(L.LightningModule):
    """GRPO-style RL with a swappable sampler, reward, engine, advantage and loss.

    Args:
        model: ``embedded:tiny`` (default), a local folder, ``pkg:<package>`` with a GGUF file, or a hub id.
        sampler: how many rollouts each prompt gets and which are kept.
        reward: scores rollouts (the task's own verifier by default).
        engine: generates rollouts (HF ``generate`` by default; vLLM on GPU).
        sampling: temperature, top-p and max new tokens of training rollouts.
        advantage: the advantage estimator.
        loss: the policy loss, aggregation, KL and entropy.
        optimizer: e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-4}}``.
        ppo_epochs: passes over each generation batch (old log-probs are kept, so ratios are real).
        num_minibatches: optimizer steps per epoch.
        micro_batch_rows: rows per forward/backward (gradient accumulation, exact aggregation).
        grad_clip: max gradient norm (0 disables).
        shared_prompt: forward each group's shared context once per micro-batch and the group's
            responses on top of its KV cache, instead of every row whole. Exact to float rounding
            and faster (``scripts/bench_vs_trl.py``), so on by default; ``false`` forwards whole rows.
        skip_zero_advantage: leave rollouts whose advantage is 0 on every token out of the
            forward/backward pass when that is exact (no KL, no entropy term): they have zero
            gradient, and still count in the aggregate's denominator. A pure speed-up.
        eval: held-out evaluation settings.
        chat_template: force the chat template on/off (default: use it if the tokenizer has one).
        num_threads: torch CPU threads (1 is fastest for small models on shared cores).
        log_completions_every_n_steps: sample completions table in MLflow (0 disables).
        export_dir: ``save_pretrained`` of the final policy when training ends (None disables).
    """

    def __init__(
        self,
        model: str = "embedded:tiny",
        sampler: Sampler = lazy_instance(FixedGroupSampler, group_size=8),
        reward: Reward = lazy_instance(VerifierReward),
        engine: RolloutEngine = lazy_instance(HFEngine),
        sampling: SamplingParams = SamplingParams(),
        advantage: AdvantageConfig = AdvantageConfig(),
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerCallable | None = None,
        ppo_epochs: int = 1,
        num_minibatches: int = 4,
        micro_batch_rows: int = 512,
        grad_clip: float = 1.0,
        skip_zero_advantage: bool = True,
        shared_prompt: bool = True,
        eval: EvalConfig = EvalConfig(),
        chat_template: bool | None = None,
        num_threads: int | None = 1,
        log_completions_every_n_steps: int = 50,
        export_dir: str | None = "outputs/final_policy",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        sampling.validate()
        for name, val in (
            ("model.ppo_epochs", ppo_epochs),
            ("model.num_minibatches", num_minibatches),
            ("model.micro_batch_rows", micro_batch_rows),
            ("model.eval.samples", eval.samples),
        ):
            if val < 1:
                raise ConfigError(name, f"must be >= 1, got {val}")
        if loss.tis_cap is not None and not loss.tis_cap > 0:
            raise ConfigError("model.loss.tis_cap", f"must be a positive number (e.g. 2.0) or null, got {loss.tis_cap}")
        self.advantage_fn = get_advantage(advantage.name)
        self.aggregate = get_aggregation(loss.agg)
        self.policy_loss = get_policy_loss(loss.name)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_name = model
        self.policy, self.tokenizer = load_policy(model)
        self.policy.train()  # from_pretrained returns eval mode
        self.sampler, self.reward, self.engine = sampler, reward, engine
        self.sampling, self.adv_cfg, self.loss_cfg, self.eval_cfg = sampling, advantage, loss, eval
        self.optimizer_fn = optimizer
        self.grad_clip, self.shared_prompt = grad_clip, shared_prompt
        self.chat_template = chat_template
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.export_dir = export_dir
        self.ref_policy = None
        if loss.kl_coef > 0:
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.updater = Updater(
            loss, self.aggregate, self.policy_loss, ppo_epochs, num_minibatches, micro_batch_rows, skip_zero_advantage
        )
        self.engine.bind(self.policy, self.tokenizer)
        # Per-prompt outcome history (for never-solved fraction), cumulative budget: checkpointed.
        self.prompt_history: dict[str, list[int]] = {}
        self.cumulative: dict[str, float] = defaultdict(float)
        self._context_cache: dict[str, list[int]] = {}
        self.reward_fault_last = ""  # the last reward fault's message (for RunGuard's stop message)
        self._step_metrics: dict[str, float] = {}
        self._eval_pass = MeanMetric()
        self._eval_tags: dict[str, MeanMetric] = {}
        self._eval_passk = MeanMetric()
        self.sampler.setup(self)

    @property
    def micro_batch_rows(self) -> int:
        """Rows per forward/backward (the update's and the no-grad log-prob passes')."""
        return self.updater.micro_batch_rows

    @micro_batch_rows.setter
    def micro_batch_rows(self, rows: int) -> None:
        self.updater.micro_batch_rows = rows

    # ---- Lightning plumbing -------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_fn is None:
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0)
        else:
            opt = self.optimizer_fn(params)
        return _fast_adam(opt)

    def configure_model(self) -> None:
        """Shard the policy with FSDP2 when running under ``ModelParallelStrategy``."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            raise ConfigError("data", "the policy module needs a PromptDataModule (set data: in the config)")
        self.reward.setup(dm, self.sampling.max_new_tokens)
        self._shard_pool(dm)

    def _shard_pool(self, dm: Any) -> None:
        """Several data-parallel ranks: each trains on its own slice of the prompt pool (every
        ``world_size``-th prompt), so a prompt is only ever seen by one rank and each rank's
        per-prompt state (sampler state, outcome history) is the whole truth about its prompts.
        Budget, gate and reward metrics are summed over ranks (:meth:`_reduce_across_ranks`)."""
        pool = getattr(dm, "train_pool", None)
        world = self.trainer.world_size
        if world <= 1 or pool is None or getattr(dm, "_sharded_for", None) == world:
            return
        rank = self.trainer.global_rank
        if len(pool.prompts) < world:
            raise ConfigError("data.train_size", f"a pool of {len(pool.prompts)} prompts cannot be shared by {world} ranks")
        dm.train_pool = type(pool)(pool.prompts[rank::world], pool.weights[rank::world].tolist())
        dm._sharded_for = world

    @property
    def signal_callbacks(self) -> list[SignalCallback]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, SignalCallback)]

    # ---- the sampling context offered to samplers ----------------------------------------------
    @property
    def step(self) -> int:
        return self.global_step

    def context_of(self, prompt: Prompt) -> list[int]:
        ctx = self._context_cache.get(prompt.uid)
        if ctx is None:
            ctx = self._context_cache[prompt.uid] = self.encode_text(prompt.text)
        return ctx

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self.trainer.datamodule.draw(k)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a prompt text as the model sees it (chat template when it has one)."""
        return encode_prompt(self.tokenizer, text, self.chat_template)

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """One free-text reply of the current policy per conversation (e.g. SAGE's self-written
        hints). The tokens count in ``budget/tokens`` (and ``budget/aux_tokens``): compute a method
        spends writing text is part of its cost."""
        contexts = [encode_messages(self.tokenizer, c, self.chat_template) for c in conversations]
        params = SamplingParams(temperature=temperature, top_p=self.sampling.top_p, max_new_tokens=max_new_tokens)
        params.validate("generate_text")
        outs = self.engine.generate(contexts, [1] * len(contexts), params)
        n_tok = sum(len(r.token_ids) for rs in outs for r in rs)
        fwd = n_tok + sum(len(c) for c in contexts)
        self._add_metrics({"budget/tokens": n_tok, "budget/aux_tokens": n_tok, "budget/tokens_forwarded": fwd})
        return [rs[0].text for rs in outs]

    def log_metric(self, name: str, value: float) -> None:
        self._step_metrics[name] = float(value)

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        """Generate and score rollouts; every sample drawn here counts in ``budget/*``."""
        if len(n_each) != len(prompts) or any(n < 0 for n in n_each):
            raise ValueError(f"sample(): n_each must give a count >= 0 per prompt, got {n_each} for {len(prompts)} prompts")
        contexts = contexts if contexts is not None else [self.context_of(p) for p in prompts]
        t0 = time.perf_counter()
        outs = self.engine.generate(contexts, n_each, self.sampling)
        t1 = time.perf_counter()
        n_err = n_nan = 0
        for p, rs in zip(prompts, outs):
            # A reward that raises or gives NaN scores the rollout as failed; RunGuard stops the run
            # once such faults pass their configured share.
            e, n, last = score_guarded(self.reward, p, rs)
            n_err, n_nan = n_err + e, n_nan + n
            self.reward_fault_last = last or self.reward_fault_last
            hist = self.prompt_history.setdefault(p.uid, [0, 0])
            hist[0] += len(rs)
            hist[1] += sum(r.passed for r in rs)
        t2 = time.perf_counter()
        n_scored = sum(len(rs) for rs in outs)
        for key, v in (("reward_scored", n_scored), ("reward_errors", n_err), ("reward_nan", n_nan)):
            self.cumulative[key] += v
        self._add_metrics(
            {
                "budget/rollouts": n_scored,
                "budget/tokens": sum(len(r.token_ids) for rs in outs for r in rs),
                "_reward_sum": sum(r.reward for rs in outs for r in rs),
                "reward/errors": n_err,
                "reward/nan": n_nan,
                "time/generate_s": t1 - t0,
                "time/score_s": t2 - t1,
            }
        )
        return outs

    def add_metrics(self, amounts: dict[str, float]) -> None:
        """Accumulate per-step sums (a step may call ``sample`` / ``generate_text`` many times).

        Samplers and rewards that run the policy or another model outside the module's own paths
        add the tokens they forward here: ``module.add_metrics({"budget/tokens_forwarded": n})``.
        """
        m = self._step_metrics
        for k, v in amounts.items():
            m[k] = m.get(k, 0) + v

    _add_metrics = add_metrics

    # ---- the training step --------------------------------------------------------------------
    def training_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        t_step = time.perf_counter()
        self._step_metrics = {}
        ctx = _SamplerView(self)

        groups = self.sampler.collect(prompts, ctx)  # how many rollouts, re-sampling, down-sampling
        self._log_gate(groups)
        for cb in self.signal_callbacks:  # filter / re-weight whole groups
            groups = cb.on_groups(groups, self)
        self.engine.sleep()  # the step's last generate is done: an engine sharing the device frees it

        t_update = time.perf_counter()
        batch = self.build_batch(groups) if groups else None
        if batch is not None:
            batch.advantages = self.compute_advantages(batch)
            for cb in self.signal_callbacks:  # per-token reshaping
                cb.on_advantages(batch, self)
            self._step_metrics.update(self.updater.run(batch, self, self.signal_callbacks))
            self.engine.sync_weights(self.policy)
        else:
            self._empty_step()
        self._step_metrics["time/update_s"] = time.perf_counter() - t_update
        log_signal_health(self, groups, batch)
        self._step_metrics["time/train_s"] = time.perf_counter() - t_step  # evaluation runs outside the step
        self._log_step(groups, batch)
        if self.log_completions_every_n_steps and self.global_step % self.log_completions_every_n_steps == 0:
            self._log_completions(groups)

    def build_batch(self, groups: list[Group]) -> TokenBatch:
        """Flatten ragged groups into padded tensors (see :func:`components.step.update.build_batch`)."""
        return build_batch(groups, self.tokenizer.pad_token_id, self.device)

    def compute_advantages(self, batch: TokenBatch) -> torch.Tensor:
        """Per-token advantages of ``batch`` (see :func:`components.step.update.compute_advantages`)."""
        return compute_advantages(batch, self.advantage_fn, self.adv_cfg)

    def _forward_logprobs(
        self, model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies of ``rows`` under ``model`` (with gradient if enabled);
        every token forwarded counts in ``budget/tokens_forwarded``."""
        logp, ent, n_tok = forward_logprobs(model, batch, rows, self.sampling.temperature or 1.0, self.shared_prompt)
        self.add_metrics({"budget/tokens_forwarded": n_tok})
        return logp, ent

    @torch.no_grad()
    def token_logprobs(
        self, batch: TokenBatch, rows: torch.Tensor | None = None, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies of ``rows`` (default: all) under ``model`` (default:
        the policy as it is now), without gradients, in micro-batches. For signal callbacks that
        need the current policy's view of the batch (e.g. DynaMO's entropy-based modulation)."""
        model = self.policy if model is None else model
        rows = torch.arange(batch.size) if rows is None else rows
        if not len(rows):
            empty = batch.response_mask[:0]
            return empty.clone(), empty.clone()
        parts = [self._forward_logprobs(model, batch, r) for r in rows.split(self.micro_batch_rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def optimizer_update(self, opt: Any, last: bool) -> None:
        """Clip, then apply one optimizer update of the gradients accumulated by ``manual_backward``.

        Lightning counts every ``LightningOptimizer.step`` as a global step. One generation batch is
        one step here (``max_steps``, checkpoint and sampler schedules count generation batches), so
        only the batch's ``last`` update goes through it; the earlier ones go straight through the
        strategy (which still applies the precision plugin, e.g. a grad scaler).
        """
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        if last:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure, model=self)

    def _empty_step(self) -> None:
        """No group reached the loss: take a no-op optimizer step (no gradients) so that the step
        still counts as one global step and ``max_steps`` is reached."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()

    # ---- metrics ------------------------------------------------------------------------------
    def _log_gate(self, groups: list[Group]) -> None:
        """Gate counts of the groups as the sampler returns them; fractions after the cross-rank sum."""
        m = self._step_metrics
        m["_gate_open"] = sum(g.is_mixed for g in groups)
        m["_gate_all_zero"] = sum(g.size > 0 and not any(r.passed for r in g.rollouts) for g in groups)
        m["_gate_all_one"] = sum(g.size > 0 and all(r.passed for r in g.rollouts) for g in groups)
        m["gate/groups"] = len(groups)
        sizes = [g.size for g in groups] or [0]
        m["_group_size_sum"] = sum(sizes)
        m["sampler/group_size_max"] = max(sizes)
        m["sampler/group_size_min"] = min(sizes)

    def _reduce_across_ranks(self, m: dict[str, float]) -> None:
        """Sum the step's counts over data-parallel ranks (one all-reduce), in place, so budget,
        gate and reward metrics (and the cumulative budget, which ``BudgetCap`` reads) are the
        run's, identical on every rank. Other metrics (losses, method diagnostics) stay rank 0's."""
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        vals = torch.tensor([float(m.get(k, 0.0)) for k in SUMMED], dtype=torch.float64, device=self.device)
        vals = self.trainer.strategy.reduce(vals, reduce_op="sum")
        m.update(zip(SUMMED, vals.tolist()))

    def _log_step(self, groups: list[Group], batch: TokenBatch | None) -> None:
        m = self._step_metrics
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
        self._reduce_across_ranks(m)
        n_groups, rows = max(m["gate/groups"], 1), max(m.pop("_batch_rows"), 1)
        for k in ("open", "all_zero", "all_one"):
            m[f"gate/{k}_frac"] = m.pop(f"_gate_{k}") / n_groups
        m["sampler/group_size_mean"] = m.pop("_group_size_sum") / n_groups
        m["reward/mean"] = m.pop("_reward_sum", 0.0) / max(m.get("budget/rollouts", 0), 1)
        m["signal/adv_energy"] = m.pop("_adv_sq_sum", 0.0) / rows
        m["signal/adv_abs_mean"] = m.pop("_adv_abs_sum", 0.0) / rows
        m.setdefault("budget/optimizer_steps", 0.0)
        for k in CUMULATIVE:
            self.cumulative[k] += m.get(f"budget/{k}", 0.0)
            m[f"budget/cum_{k}"] = self.cumulative[k]
        self.cumulative["train_s"] += m["time/train_s"]
        m["time/cum_train_s"] = self.cumulative["train_s"]
        m["budget/nonzero_token_share"] = self.cumulative["tokens_nonzero_adv"] / max(self.cumulative["tokens"], 1)
        seen = len(self.prompt_history)
        m["train/never_solved_frac"] = sum(1 for n, p in self.prompt_history.values() if p == 0) / max(seen, 1)
        m["train/prompts_seen"] = seen
        m["train/response_len"] = m["budget/tokens_in_loss"] / max(m["budget/rollouts_in_loss"], 1)
        self._emit(m)

    def _emit(self, m: dict[str, float]) -> None:
        """Write the step's metrics to every logger in one call.

        Lightning's ``self.log`` costs ~0.5 ms per key (result collection, syncing checks), about
        17 ms for the ~35 keys of a step; the step's metrics are plain floats already reduced where
        needed, so they go to the loggers directly, at the step Lightning would use (the index of
        the generation batch) and with its ``log_every_n_steps``. Only the progress bar's two keys
        go through ``self.log_dict`` (not to the loggers).
        """
        metrics = {k: float(v) for k, v in m.items() if not k.startswith("_")}
        bar = {k: metrics[k] for k in ("reward/mean", "gate/open_frac") if k in metrics}
        self.log_dict(bar, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        step = self.global_step - 1  # the optimizer step of this generation batch has been taken
        every = self.trainer.log_every_n_steps
        if every and ((step + 1) % every == 0 or self.trainer.should_stop):
            for lg in self.loggers:
                lg.log_metrics(metrics, step=step)

    def _log_completions(self, groups: list[Group]) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "experiment") or not hasattr(logger, "run_id"):
            return
        rows = {"step": [], "prompt": [], "answer": [], "completion": [], "reward": [], "passed": []}
        for g in groups[:8]:
            for r in g.rollouts[:4]:
                rows["step"].append(self.global_step)
                rows["prompt"].append(self.tokenizer.decode(g.context_ids, skip_special_tokens=True))
                rows["answer"].append(g.prompt.answer)
                rows["completion"].append(r.text)
                rows["reward"].append(r.reward)
                rows["passed"].append(bool(r.passed))
        # Extra per-rollout details (Rollout.meta, e.g. DRO's R3 token weights): one column each.
        shown = [r for g in groups[:8] for r in g.rollouts[:4]]
        for key in sorted({k for r in shown for k in r.meta}):
            rows[key] = [str(r.meta.get(key, "")) for r in shown]
        if rows["step"]:
            logger.experiment.log_table(logger.run_id, data=rows, artifact_file=f"completions/step_{self.global_step:06d}.json")

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _eval_prompts(self, prompts: list[Prompt]) -> None:
        params = SamplingParams(self.eval_cfg.temperature, 1.0, self.sampling.max_new_tokens, list(self.sampling.stop))
        k = self.eval_cfg.samples
        outs = self.engine.generate([self.context_of(p) for p in prompts], [k] * len(prompts), params)
        for p, rs in zip(prompts, outs):
            score_guarded(self.reward, p, rs)  # bare prompt, never a hint; a faulty reward scores a fail
            c = sum(r.passed for r in rs)
            self._eval_pass.update(torch.tensor(c / k), weight=1)
            self._eval_passk.update(torch.tensor(_pass_at_k(k, c, k)), weight=1)
            if p.tag not in self._eval_tags:
                self._eval_tags[p.tag] = MeanMetric().to(self.device)
            self._eval_tags[p.tag].update(torch.tensor(c / k))

    def _eval_results(self) -> dict[str, float]:
        res = {
            "eval/pass_at_1": float(self._eval_pass.compute()),
            f"eval/pass_at_{self.eval_cfg.samples}": float(self._eval_passk.compute()),
        }
        for tag, metric in sorted(self._eval_tags.items()):
            res[f"eval/pass_at_1/{tag}"] = float(metric.compute())
        for metric in [self._eval_pass, self._eval_passk, *self._eval_tags.values()]:
            metric.reset()
        return res

    def validation_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        self._eval_prompts(prompts)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._eval_results()
            return
        for k, v in self._eval_results().items():
            self.log(k, v, prog_bar=k == "eval/pass_at_1", batch_size=1)

    def _start_engine(self) -> None:
        """An engine with its own weights (vLLM) is built on this rank's device and loads the
        policy's current weights: at the start of training, after the checkpoint is restored."""
        self.engine.start(self.policy, device=self.device, rank=self.global_rank, world_size=self.trainer.world_size)
        self._engine_started = True

    def on_validation_start(self) -> None:
        if not getattr(self, "_engine_started", False):  # validate-only runs, sanity checks
            self._start_engine()

    def on_validation_end(self) -> None:
        self.engine.sleep()

    def on_train_start(self) -> None:
        self._start_engine()
        if self.eval_cfg.at_start and self.global_step == 0 and self.trainer.datamodule.heldout:
            dm = self.trainer.datamodule
            for start in range(0, len(dm.heldout), 256):
                self._eval_prompts(dm.heldout[start : start + 256])
            res = self._eval_results()
            for lg in self.loggers:
                lg.log_metrics(res, step=0)

    def on_train_end(self) -> None:
        if not self.export_dir:
            return
        state = None
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Sharded (FSDP2) parameters: gather full tensors on every rank (a collective), save on rank 0.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.trainer.is_global_zero:
            self.policy.save_pretrained(self.export_dir, state_dict=state)
            self.tokenizer.save_pretrained(self.export_dir)

    # ---- checkpointed state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every RNG that sampling and shuffling use is saved with the state, so a resumed run draws
        # what the uninterrupted run would have drawn. The HF engine samples from torch's global
        # RNG; an engine with its own generator saves it through state_dict().
        checkpoint["curate_rl"] = {
            "sampler": self.sampler.state_dict(),
            "prompt_history": self.prompt_history,
            "cumulative": dict(self.cumulative),
            "rng": rng_state(),
            "engine": self.engine.state_dict() if hasattr(self.engine, "state_dict") else {},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("curate_rl", {})
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.prompt_history = {k: list(v) for k, v in state.get("prompt_history", {}).items()}
        self.cumulative = defaultdict(float, state.get("cumulative", {}))
        if "rng" in state:
            set_rng_state(state["rng"])
        if state.get("engine") and hasattr(self.engine, "load_state_dict"):
            self.engine.load_state_dict(state["engine"])


def _fast_adam(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Adam/AdamW with neither ``fused`` nor ``foreach`` chosen: rebuild it fused (one kernel for all
    parameters; about 3x faster than the default per-parameter loop on CPU for the embedded model),
    or ``foreach`` for sharded (DTensor) parameters, where that is what FSDP2 supports. Any other
    optimizer, or one whose settings say otherwise, is returned unchanged."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or opt.state:
        return opt
    d = opt.defaults
    if d.get("fused") is not None or d.get("foreach") is not None or d.get("differentiable"):
        return opt
    from torch.distributed.tensor import DTensor

    params = [p for g in opt.param_groups for p in g["params"]]
    how = {"foreach": True} if any(isinstance(p, DTensor) for p in params) else {"fused": True}
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
    try:
        return type(opt)(groups, **how)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused kernel
        return opt


def _no_closure() -> None:
    """Gradients were already computed with ``manual_backward``."""
    return None


class _SamplerView:
    """The :class:`~components.samplers.base.SamplingContext` a sampler sees: a narrow view of the module."""

    def __init__(self, module: PolicyModule) -> None:
        self.step = module.global_step
        self.module = module

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        outs = self.module.sample(prompts, n_each, contexts)
        # Generation forwards each sampled context and every new token: both count as forwarded.
        # A reward that runs a model reports its own forwarded tokens in ``tokens_forwarded``.
        ctx_len = [len(c) for c in contexts] if contexts is not None else [len(self.module.context_of(p)) for p in prompts]
        fwd = sum(n * c for n, c in zip(n_each, ctx_len)) + sum(len(r.token_ids) for rs in outs for r in rs)
        reward = self.module.reward
        fwd += getattr(reward, "tokens_forwarded", 0)
        if hasattr(reward, "tokens_forwarded"):
            reward.tokens_forwarded = 0
        self.module.add_metrics({"budget/tokens_forwarded": fwd})
        return outs

    def add_metrics(self, amounts: dict[str, float]) -> None:
        """Per-step sums, e.g. ``{"budget/tokens_forwarded": n}`` for a sampler's own model passes."""
        self.module.add_metrics(amounts)

    def context_of(self, prompt: Prompt) -> list[int]:
        return self.module.context_of(prompt)

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self.module.draw_prompts(k)

    def encode(self, text: str) -> list[int]:
        return self.module.encode_text(text)

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        return self.module.generate_text(conversations, max_new_tokens, temperature)

    def log(self, name: str, value: float) -> None:
        self.module.log_metric(name, value)
