"""Stand-ins for the step's handle (components/handle.py) in unit tests.

``ScriptedHandle``: no model; rewards from a script. Each prompt's rollouts are scored either from
a fixed list of rewards consumed in order (``scripts[uid]``) or by Bernoulli draws with a per-prompt
pass rate (``pass_rates[uid]``) from a seeded generator. Every call is recorded, so tests can check
what a sampler asked for. It has no policy, so model-based members refuse.

``ModelHandle``: a real model, engine and reward without Lightning, with exactly the members of
:class:`~components.handle.StepHandle` (``tests/unit/step/test_handle.py`` checks both fakes
against the protocol). Components that run the policy (GVM, R3, the pre-filter) are tested on it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import torch

from components.algos.batch import TokenBatch, forward_logprobs
from components.engines.base import SamplingParams
from components.engines.hf import HFEngine
from components.policy import encode_messages, encode_prompt
from components.rewards.verifier import Reward, score_guarded
from components.types import Prompt, Rollout


def make_prompts(n: int, prefix: str = "p") -> list[Prompt]:
    return [Prompt(uid=f"{prefix}{i}", task="fake", text=f"{prefix}{i}", answer="1", tag="fake") for i in range(n)]


class ScriptedHandle:
    def __init__(
        self,
        scripts: dict[str, list[float]] | None = None,
        pass_rates: dict[str, float] | None = None,
        seed: int = 0,
        extra_prompts: list[Prompt] | None = None,
        tokens_per_rollout: int = 3,
    ) -> None:
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.pass_rates = pass_rates or {}
        self.rng = random.Random(seed)
        self.extra = list(extra_prompts or [])
        self.tokens = tokens_per_rollout
        self.step = 0
        self.policy = self.ref_policy = self.tokenizer = None
        self.device = torch.device("cpu")
        self.sampling = SamplingParams()
        self.context_limit: int | None = None
        self.pool: list[Prompt] = []  # what train_prompts() returns
        self.calls: list[dict[str, int]] = []  # one {uid: n} per sample() call
        self.drawn: dict[str, int] = defaultdict(int)
        self.metrics: dict[str, float] = {}  # log()
        self.added: dict[str, float] = {}  # add_metrics() sums
        self.encoded: list[str] = []  # texts passed to context_of(text)
        self.replies: list[str] = []  # scripted generate_text() replies
        self.conversations: list[list[dict[str, str]]] = []
        self.temperatures: list[float] = []  # temperature of each generate_text() call

    def _reward(self, uid: str) -> float:
        if uid in self.scripts:
            if not self.scripts[uid]:
                raise AssertionError(f"script for {uid} exhausted")
            return self.scripts[uid].pop(0)
        return float(self.rng.random() < self.pass_rates.get(uid, 0.5))

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        self.calls.append({p.uid: n for p, n in zip(prompts, n_each)})
        out = []
        for i, (p, n) in enumerate(zip(prompts, n_each)):
            rs = []
            for _ in range(n):
                r = self._reward(p.uid)
                ctx = contexts[i] if contexts is not None else self.context_of(p)
                rs.append(
                    Rollout(
                        token_ids=[1] * self.tokens,
                        logprobs=[-0.5] * self.tokens,
                        text=f"{p.uid}|{len(ctx)}",
                        finished=True,
                        reward=r,
                        passed=r >= 1.0,
                    )
                )
            self.drawn[p.uid] += n
            out.append(rs)
        return out

    def context_of(self, prompt: Prompt | str) -> list[int]:
        if isinstance(prompt, str):
            self.encoded.append(prompt)
            return [0] * (len(prompt) + 1)
        return [0, len(prompt.uid)]

    def logprobs(self, batch: Any, rows: Any = None, model: Any = None, grad: bool = False) -> Any:
        raise AssertionError("ScriptedHandle has no model: use ModelHandle")

    def generate(self, contexts: list[list[int]], n_each: list[int], params: Any = None) -> list[list[Rollout]]:
        raise AssertionError("ScriptedHandle has no engine: use ModelHandle")

    def train_prompts(self) -> list[Prompt]:
        return list(self.pool)

    def add_metrics(self, amounts: dict[str, float]) -> None:
        for k, v in amounts.items():
            self.added[k] = self.added.get(k, 0.0) + v

    def draw_prompts(self, k: int) -> list[Prompt]:
        if len(self.extra) < k:
            raise AssertionError("ScriptedHandle ran out of extra prompts")
        out, self.extra = self.extra[:k], self.extra[k:]
        return out

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """Replies popped from ``self.replies`` in order (a test scripts what the 'policy' writes)."""
        self.conversations.extend(conversations)
        self.temperatures.append(temperature)
        if len(self.replies) < len(conversations):
            raise AssertionError("ScriptedHandle ran out of scripted text replies")
        out, self.replies = self.replies[: len(conversations)], self.replies[len(conversations) :]
        return out

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)


class ModelHandle:
    """A real policy behind exactly the StepHandle members, with no LightningModule or Trainer.

    ``reward`` scores ``sample``'s rollouts (set up with this handle by the test, or given already
    set up); ``pool`` is what ``draw_prompts`` / ``train_prompts`` serve.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        reward: Reward | None = None,
        sampling: SamplingParams | None = None,
        pool: list[Prompt] | None = None,
        ref_policy: torch.nn.Module | None = None,
    ) -> None:
        self.policy, self.tokenizer, self.ref_policy = policy, tokenizer, ref_policy
        self.device = torch.device("cpu")
        self.sampling = sampling or SamplingParams(max_new_tokens=8)
        self.context_limit = getattr(policy.config, "max_position_embeddings", None)
        self.step = 0
        self._reward, self._pool = reward, list(pool or [])
        self._engine = HFEngine()
        self._engine.bind(policy, tokenizer)
        self._metrics: dict[str, float] = {}  # what add_metrics / log received (tests read it)

    def context_of(self, prompt: Prompt | str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt if isinstance(prompt, str) else prompt.text)

    def logprobs(
        self, batch: TokenBatch, rows: torch.Tensor | None = None, model: torch.nn.Module | None = None, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(batch.size) if rows is None else rows
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            logp, ent, n_tok = forward_logprobs(model or self.policy, batch, rows, self.sampling.temperature or 1.0)
        self.add_metrics({"budget/tokens_forwarded": n_tok})
        return logp, ent

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams | None = None) -> list[list[Rollout]]:
        return self._engine.generate(contexts, n_each, params or self.sampling)

    def sample(self, prompts: list[Prompt], n_each: list[int], contexts: list[list[int]] | None = None) -> list[list[Rollout]]:
        contexts = contexts if contexts is not None else [self.context_of(p) for p in prompts]
        outs = self.generate(contexts, n_each)
        for p, rs in zip(prompts, outs):
            score_guarded(self._reward, p, rs)
        self.add_metrics({"budget/rollouts": sum(len(rs) for rs in outs)})
        return outs

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        contexts = [encode_messages(self.tokenizer, c) for c in conversations]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        return [rs[0].text for rs in self.generate(contexts, [1] * len(contexts), params)]

    def draw_prompts(self, k: int) -> list[Prompt]:
        return self._pool[:k]

    def train_prompts(self) -> list[Prompt]:
        return list(self._pool)

    def add_metrics(self, amounts: dict[str, float]) -> None:
        for k, v in amounts.items():
            self._metrics[k] = self._metrics.get(k, 0.0) + v

    def log(self, name: str, value: float) -> None:
        self._metrics[name] = float(value)
