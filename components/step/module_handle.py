"""The policy module's :class:`~components.handle.StepHandle`: the members, and nothing else."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from components.algos.batch import TokenBatch
from components.engines.base import SamplingParams
from components.policy import encode_messages
from components.rewards.verifier import score_guarded
from components.types import Prompt, Rollout


class ModuleHandle:
    """The :class:`StepHandle` of a :class:`~components.step.module.PolicyModule`.

    It forwards exactly the members of the protocol and nothing else (no ``__getattr__``), so a
    component cannot reach the module through it.
    """

    def __init__(self, module: L.LightningModule) -> None:
        """``module``: the :class:`~components.step.module.PolicyModule` this handle serves."""
        self._m = module
        self._contexts: dict[str, list[int]] = {}

    # ---- the policy and the settings -------------------------------------------------------------
    @property
    def policy(self) -> torch.nn.Module:
        return self._m.policy

    @property
    def ref_policy(self) -> torch.nn.Module | None:
        return self._m.ref_policy

    @property
    def tokenizer(self) -> Any:
        return self._m.tokenizer

    @property
    def device(self) -> torch.device:
        return self._m.device

    @property
    def sampling(self) -> SamplingParams:
        return self._m.sampling

    @property
    def context_limit(self) -> int | None:
        """The model's context length as the engine enforces it (None: unknown)."""
        limit = getattr(self._m.engine, "max_context_tokens", None)
        return limit or getattr(getattr(self._m.policy, "config", None), "max_position_embeddings", None)

    @property
    def step(self) -> int:
        return self._m.global_step

    # ---- contexts and log-probs -------------------------------------------------------------------
    def context_of(self, prompt: Prompt | str) -> list[int]:
        if isinstance(prompt, str):
            return self._m.encode_text(prompt)
        ctx = self._contexts.get(prompt.uid)
        if ctx is None:
            ctx = self._contexts[prompt.uid] = self._m.encode_text(prompt.text)
        return ctx

    def logprobs(
        self,
        batch: TokenBatch,
        rows: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._m.forward_logprobs(batch, rows, model)

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams | None = None) -> list[list[Rollout]]:
        return self._m.engine.generate(contexts, n_each, params or self._m.sampling)

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        if len(n_each) != len(prompts) or any(n < 0 for n in n_each):
            raise ValueError(f"sample(): n_each must give a count >= 0 per prompt, got {n_each} for {len(prompts)} prompts")
        m = self._m
        contexts = contexts if contexts is not None else [self.context_of(p) for p in prompts]
        t0 = time.perf_counter()
        outs = m.engine.generate(contexts, n_each, m.sampling)
        t1 = time.perf_counter()
        n_err = n_nan = 0
        for p, rs in zip(prompts, outs):
            # A reward that raises or gives NaN scores the rollout as failed; RunGuard stops the run
            # once such faults pass their configured share.
            e, n, last = score_guarded(m.reward, p, rs)
            n_err, n_nan = n_err + e, n_nan + n
            m.reward_fault_last = last or m.reward_fault_last
            hist = m.prompt_history.setdefault(p.uid, [0, 0])
            hist[0] += len(rs)
            hist[1] += sum(r.passed for r in rs)
        t2 = time.perf_counter()
        n_scored = sum(len(rs) for rs in outs)
        n_tok = sum(len(r.token_ids) for rs in outs for r in rs)
        for key, v in (("reward_scored", n_scored), ("reward_errors", n_err), ("reward_nan", n_nan)):
            m.cumulative[key] += v
        # Generation forwards each sampled context and every new token: both count as forwarded.
        # A reward that runs a model reports its own forwarded tokens through add_metrics.
        fwd = sum(n * len(c) for n, c in zip(n_each, contexts)) + n_tok
        self.add_metrics(
            {
                "budget/rollouts": n_scored,
                "budget/tokens": n_tok,
                "budget/tokens_forwarded": fwd,
                "_reward_sum": sum(r.reward for rs in outs for r in rs),
                "reward/errors": n_err,
                "reward/nan": n_nan,
                "time/generate_s": t1 - t0,
                "time/score_s": t2 - t1,
            }
        )
        return outs

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """The tokens count in ``budget/tokens`` (and ``budget/aux_tokens``): compute a method
        spends writing text is part of its cost."""
        m = self._m
        contexts = [encode_messages(m.tokenizer, c, m.chat_template) for c in conversations]
        params = SamplingParams(temperature=temperature, top_p=m.sampling.top_p, max_new_tokens=max_new_tokens)
        params.validate("generate_text")
        outs = m.engine.generate(contexts, [1] * len(contexts), params)
        n_tok = sum(len(r.token_ids) for rs in outs for r in rs)
        fwd = n_tok + sum(len(c) for c in contexts)
        self.add_metrics({"budget/tokens": n_tok, "budget/aux_tokens": n_tok, "budget/tokens_forwarded": fwd})
        return [rs[0].text for rs in outs]

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self._m.trainer.datamodule.draw(k)

    def train_prompts(self) -> list[Prompt]:
        dm = self._m.trainer.datamodule
        if getattr(dm, "train_pool", None) is None:
            dm.setup("fit")
        return list(dm.train_pool.prompts)

    # ---- metrics ------------------------------------------------------------------------------------
    def add_metrics(self, amounts: dict[str, float]) -> None:
        m = self._m.step_metrics
        for k, v in amounts.items():
            m[k] = m.get(k, 0) + v

    def log(self, name: str, value: float) -> None:
        self._m.step_metrics[name] = float(value)
