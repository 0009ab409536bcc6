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
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from components.advantages import get_advantage
from components.callbacks.base import SignalCallback
from components.engine import HFEngine, RolloutEngine, SamplingParams
from components.errors import ConfigError
from components.losses import get_aggregation, get_policy_loss, kl_k3, token_logprobs_and_entropy
from components.policy import encode_messages, encode_prompt, load_policy
from components.rewards import Reward, VerifierReward
from components.samplers.base import FixedGroupSampler, Sampler
from components.types import Group, Prompt, Rollout


@dataclass
class AdvantageConfig:
    """Which estimator (``grpo``, ``dr_grpo``, ``rloo``, ``pool_mean``) and its options."""

    name: str = "grpo"
    std: str = "population"  # "population" (N) or "unbiased" (N - 1), for grpo
    eps: float = 1e-6
    normalize_std: bool = False  # pool_mean only: divide by sqrt(p~(1 - p~))


@dataclass
class LossConfig:
    """Policy loss and its aggregation, KL and entropy terms."""

    name: str = "ppo_clip"
    agg: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # e.g. 3.0 or 10.0: caps the loss of negative-advantage tokens
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy of the policy (k3 estimator)
    entropy_coef: float = 0.0
    norm_len: int | None = None  # seq-mean-token-sum-norm divisor; default: max_new_tokens


@dataclass
class EvalConfig:
    """Held-out evaluation on the bare prompt."""

    samples: int = 4  # samples per item: pass@1 is their mean, pass@k uses the unbiased estimator
    temperature: float = 1.0
    at_start: bool = True  # evaluate before the first step (logged at step 0)


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


def _pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c passes (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


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
        num_minibatches: int = 1,
        micro_batch_rows: int = 512,
        grad_clip: float = 1.0,
        skip_zero_advantage: bool = True,
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
        self.ppo_epochs, self.num_minibatches, self.micro_batch_rows = ppo_epochs, num_minibatches, micro_batch_rows
        self.grad_clip, self.skip_zero_advantage = grad_clip, skip_zero_advantage
        self.chat_template = chat_template
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.export_dir = export_dir
        self.ref_policy = None
        if loss.kl_coef > 0:
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.engine.bind(self.policy, self.tokenizer)
        # Per-prompt outcome history (for never-solved fraction), cumulative budget: checkpointed.
        self.prompt_history: dict[str, list[int]] = {}
        self.cumulative: dict[str, float] = defaultdict(float)
        self._context_cache: dict[str, list[int]] = {}
        self._step_metrics: dict[str, float] = {}
        self._eval_pass = MeanMetric()
        self._eval_tags: dict[str, MeanMetric] = {}
        self._eval_passk = MeanMetric()
        self.sampler.setup(self)

    # ---- Lightning plumbing -------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_fn is None:
            return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0)
        return self.optimizer_fn(params)

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
        self._add_metrics({"budget/tokens": n_tok, "budget/aux_tokens": n_tok})
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
        for p, rs in zip(prompts, outs):
            self.reward.score(p, rs)
            hist = self.prompt_history.setdefault(p.uid, [0, 0])
            hist[0] += len(rs)
            hist[1] += sum(r.passed for r in rs)
        t2 = time.perf_counter()
        self._add_metrics(
            {
                "budget/rollouts": sum(len(rs) for rs in outs),
                "budget/tokens": sum(len(r.token_ids) for rs in outs for r in rs),
                "_reward_sum": sum(r.reward for rs in outs for r in rs),
                "time/generate_s": t1 - t0,
                "time/score_s": t2 - t1,
            }
        )
        return outs

    def _add_metrics(self, amounts: dict[str, float]) -> None:
        """Accumulate per-step sums (a step may call ``sample`` / ``generate_text`` many times)."""
        m = self._step_metrics
        for k, v in amounts.items():
            m[k] = m.get(k, 0) + v

    # ---- the training step --------------------------------------------------------------------
    def training_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        self._step_metrics = {}
        ctx = _SamplerView(self)

        groups = self.sampler.collect(prompts, ctx)  # how many rollouts, re-sampling, down-sampling
        self._log_gate(groups)
        for cb in self.signal_callbacks:  # filter / re-weight whole groups
            groups = cb.on_groups(groups, self)

        t_update = time.perf_counter()
        batch = self.build_batch(groups) if groups else None
        if batch is not None:
            batch.advantages = self.compute_advantages(batch)
            for cb in self.signal_callbacks:  # per-token reshaping
                cb.on_advantages(batch, self)
            self.update(batch)
            self.engine.sync_weights(self.policy)
        else:
            self._empty_step()
        self._step_metrics["time/update_s"] = time.perf_counter() - t_update
        self._log_step(groups, batch)
        if self.log_completions_every_n_steps and self.global_step % self.log_completions_every_n_steps == 0:
            self._log_completions(groups)

    def build_batch(self, groups: list[Group]) -> TokenBatch:
        """Flatten ragged groups into padded tensors; each row keeps the context it was sampled from."""
        rows = [(gi, g.context_ids, r) for gi, g in enumerate(groups) for r in g.rollouts]
        pad = self.tokenizer.pad_token_id
        cw = max(len(c) for _, c, _ in rows)
        rw = max(max(len(r.token_ids) for _, _, r in rows), 1)
        n = len(rows)
        ids = torch.full((n, cw + rw), pad, dtype=torch.long)
        att = torch.zeros((n, cw + rw), dtype=torch.long)
        rmask = torch.zeros((n, rw))
        slp = torch.zeros((n, rw))
        for i, (_, c, r) in enumerate(rows):
            ids[i, cw - len(c) : cw] = torch.tensor(c)
            att[i, cw - len(c) : cw] = 1
            L_ = len(r.token_ids)
            ids[i, cw : cw + L_] = torch.tensor(r.token_ids, dtype=torch.long)
            att[i, cw : cw + L_] = 1
            rmask[i, :L_] = 1
            slp[i, :L_] = torch.tensor(r.logprobs)
        return TokenBatch(
            input_ids=ids.to(self.device),
            attention_mask=att.to(self.device),
            response_mask=rmask.to(self.device),
            context_width=cw,
            group=torch.tensor([gi for gi, _, _ in rows]),
            rewards=torch.tensor([r.reward for _, _, r in rows], dtype=torch.float),
            group_weight=torch.tensor([groups[gi].weight for gi, _, _ in rows], dtype=torch.float),
            row_weight=torch.tensor([r.weight for _, _, r in rows], dtype=torch.float),
            baseline=torch.tensor([math.nan if g.baseline is None else g.baseline for g in groups], dtype=torch.double),
            sampling_logprobs=slp.to(self.device),
        )

    def compute_advantages(self, batch: TokenBatch) -> torch.Tensor:
        """Sequence advantages (a pure function of rewards, group index, baselines), times the
        group weight and the rollout's own weight, broadcast to the response tokens."""
        a = self.adv_cfg
        seq = self.advantage_fn(
            batch.rewards, batch.group, baseline=batch.baseline, std=a.std, eps=a.eps, normalize_std=a.normalize_std
        )
        if not torch.isfinite(seq).all():
            raise RuntimeError(f"non-finite advantages from estimator {a.name!r}: rewards={batch.rewards.tolist()}")
        seq = seq * batch.group_weight * batch.row_weight
        return seq.to(self.device).unsqueeze(1) * batch.response_mask

    def _forward_logprobs(
        self, model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, att = batch.input_ids[rows], batch.attention_mask[rows]
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
        cw = batch.context_width
        # Logits at position t predict token t+1: the response starts at cw.
        resp_logits = logits[:, cw - 1 : -1]
        return token_logprobs_and_entropy(resp_logits, ids[:, cw:], self.sampling.temperature or 1.0)

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

    def update(self, batch: TokenBatch) -> None:
        """PPO epochs x mini-batches of clipped-surrogate updates, with exact aggregation over
        micro-batches.

        Rows whose advantage is zero on every token have exactly zero policy-loss gradient, so when
        there is no KL or entropy term (which would give them one) they are left out of the
        forward/backward pass (``skip_zero_advantage``), while still counting in the aggregate's
        denominator: the same gradient for a fraction of the compute.
        """
        lc = self.loss_cfg
        opt = self.optimizers()
        n = batch.size
        skip = self.skip_zero_advantage and lc.kl_coef == 0 and lc.entropy_coef == 0
        runs = (batch.advantages != 0).any(-1).cpu() if skip else torch.ones(n, dtype=torch.bool)
        reuse = self.ppo_epochs > 1 or self.num_minibatches > 1
        if reuse:
            batch.old_logprobs = self.token_logprobs(batch)[0]
        if self.ref_policy is not None:
            batch.ref_logprobs = self.token_logprobs(batch, model=self.ref_policy)[0]
        mask = batch.response_mask
        norm_len = lc.norm_len or self.sampling.max_new_tokens
        stats: dict[str, list[float]] = defaultdict(list)
        minibatches = []
        for _epoch in range(self.ppo_epochs):
            perm = torch.randperm(n) if reuse else torch.arange(n)
            minibatches += [mb for mb in perm.tensor_split(self.num_minibatches) if len(mb)]
        for update, mb in enumerate(minibatches, start=1):
            tok_den = mask[mb].sum().clamp(min=1)  # the aggregate's denominators: the whole mini-batch
            seq_den = (mask[mb].sum(-1) > 0).sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            to_run = mb[runs[mb]]
            for rows in to_run.split(self.micro_batch_rows) if len(to_run) else ():  # split() of nothing gives one empty chunk
                loss = self._micro_loss(batch, rows, tok_den, seq_den, norm_len, stats)
                self.manual_backward(loss)
            if self.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
            if update == len(minibatches):
                opt.step()
            else:
                # Lightning counts every LightningOptimizer.step as a global step. One generation
                # batch is one step here (max_steps, checkpoint and sampler schedules count
                # generation steps), so the earlier updates go straight through the strategy
                # (which still applies the precision plugin, e.g. a grad scaler).
                self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure, model=self)
        if not stats:  # no row had a non-zero advantage: the loss was exactly 0
            stats = {"loss/policy": [0.0], "loss/kl": [0.0], "policy/clip_frac": [0.0]}
        for k, v in stats.items():
            self._step_metrics[k] = sum(v) / len(v)

    def _empty_step(self) -> None:
        """No group reached the loss: take a no-op optimizer step (no gradients) so that the step
        still counts as one global step and ``max_steps`` is reached."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()

    def _micro_loss(
        self,
        batch: TokenBatch,
        rows: torch.Tensor,
        tok_den: torch.Tensor,
        seq_den: torch.Tensor,
        norm_len: int,
        stats: dict[str, list[float]],
    ) -> torch.Tensor:
        lc = self.loss_cfg
        logp, entropy = self._forward_logprobs(self.policy, batch, rows)
        mask = batch.response_mask[rows]
        adv = batch.advantages[rows]
        old = batch.old_logprobs[rows] if batch.old_logprobs is not None else logp.detach()
        pg, info = self.policy_loss(logp, old, adv, mask, clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip)
        total = pg
        kl = None
        if batch.ref_logprobs is not None:
            kl = kl_k3(logp, batch.ref_logprobs[rows])
            total = total + lc.kl_coef * kl
        if lc.entropy_coef:
            total = total - lc.entropy_coef * entropy
        # Each micro-batch's share of the mini-batch aggregate, so accumulation is exact.
        share = mask.sum() / tok_den if lc.agg == "token-mean" else (mask.sum(-1) > 0).sum() / seq_den
        loss = self.aggregate(total, mask, norm_len=norm_len) * share
        with torch.no_grad():
            ntok = mask.sum().clamp(min=1)
            stats["loss/policy"].append(float(self.aggregate(pg, mask, norm_len=norm_len)))
            stats["policy/entropy"].append(float((entropy * mask).sum() / ntok))
            stats["policy/clip_frac"].append(float((info["clipped"] * mask).sum() / ntok))
            stats["policy/dual_clip_frac"].append(float((info["dual_clipped"] * mask).sum() / ntok))
            stats["policy/ratio_mean"].append(float((info["ratio"] * mask).sum() / ntok))
            stats["loss/kl"].append(float((kl * mask).sum() / ntok) if kl is not None else 0.0)
        return loss

    # ---- metrics ------------------------------------------------------------------------------
    def _log_gate(self, groups: list[Group]) -> None:
        n = max(len(groups), 1)
        m = self._step_metrics
        m["gate/open_frac"] = sum(g.is_mixed for g in groups) / n
        m["gate/all_zero_frac"] = sum(g.size > 0 and not any(r.passed for r in g.rollouts) for g in groups) / n
        m["gate/all_one_frac"] = sum(g.size > 0 and all(r.passed for r in g.rollouts) for g in groups) / n
        m["gate/groups"] = len(groups)
        sizes = [g.size for g in groups] or [0]
        m["sampler/group_size_mean"] = sum(sizes) / len(sizes)
        m["sampler/group_size_max"] = max(sizes)
        m["sampler/group_size_min"] = min(sizes)

    def _log_step(self, groups: list[Group], batch: TokenBatch | None) -> None:
        m = self._step_metrics
        drawn = m.get("budget/rollouts", 0)
        m["reward/mean"] = m.pop("_reward_sum", 0.0) / max(drawn, 1)
        m["budget/rollouts_in_loss"] = sum(g.size for g in groups)
        m["budget/tokens_in_loss"] = sum(len(r.token_ids) for g in groups for r in g.rollouts)
        if batch is not None:
            nz = (batch.advantages != 0).any(-1).cpu()
            seq_adv = (batch.advantages.sum(-1) / batch.response_mask.sum(-1).clamp(min=1)).cpu()
            m["signal/adv_energy"] = float((seq_adv**2).mean())
            m["signal/adv_abs_mean"] = float(seq_adv.abs().mean())
            m["budget/rollouts_nonzero_adv"] = float(nz.sum())
            m["budget/tokens_nonzero_adv"] = float(batch.response_mask.sum(-1).cpu()[nz].sum())
        else:
            m["signal/adv_energy"] = 0.0
            m["budget/rollouts_nonzero_adv"] = m["budget/tokens_nonzero_adv"] = 0.0
        for k in ("rollouts", "tokens", "rollouts_in_loss", "tokens_in_loss", "rollouts_nonzero_adv", "tokens_nonzero_adv"):
            self.cumulative[k] += m.get(f"budget/{k}", 0.0)
            m[f"budget/cum_{k}"] = self.cumulative[k]
        m["budget/nonzero_token_share"] = self.cumulative["tokens_nonzero_adv"] / max(self.cumulative["tokens"], 1)
        seen = len(self.prompt_history)
        m["train/never_solved_frac"] = sum(1 for n, p in self.prompt_history.values() if p == 0) / max(seen, 1)
        m["train/prompts_seen"] = seen
        lengths = [len(r.token_ids) for g in groups for r in g.rollouts]
        m["train/response_len"] = sum(lengths) / max(len(lengths), 1)
        bar = {"reward/mean", "gate/open_frac"}
        for k, v in m.items():
            self.log(k, float(v), prog_bar=k in bar, on_step=True, on_epoch=False, batch_size=1)

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
        params = SamplingParams(self.eval_cfg.temperature, 1.0, self.sampling.max_new_tokens)
        k = self.eval_cfg.samples
        outs = self.engine.generate([self.context_of(p) for p in prompts], [k] * len(prompts), params)
        for p, rs in zip(prompts, outs):
            self.reward.score(p, rs)  # bare prompt, never a hint
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

    def on_train_start(self) -> None:
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
        checkpoint["curate_rl"] = {
            "sampler": self.sampler.state_dict(),
            "prompt_history": self.prompt_history,
            "cumulative": dict(self.cumulative),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("curate_rl", {})
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.prompt_history = {k: list(v) for k, v in state.get("prompt_history", {}).items()}
        self.cumulative = defaultdict(float, state.get("cumulative", {}))


def _no_closure() -> None:
    """Gradients were already computed with ``manual_backward``."""
    return None


class _SamplerView:
    """The :class:`~components.samplers.base.SamplingContext` a sampler sees: a narrow view of the module."""

    def __init__(self, module: PolicyModule) -> None:
        self.step = module.global_step
        self.module = module

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        return self.module.sample(prompts, n_each, contexts)

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
