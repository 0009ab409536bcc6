"""Scripted stand-ins for unit tests of samplers: no model, rewards from a script.

``ScriptedContext`` implements the sampler's SamplingContext. Each prompt's rollouts are scored
from a script: either a fixed list of rewards consumed in order (``scripts[uid]``), or Bernoulli
draws with a per-prompt pass rate (``pass_rates[uid]``) from a seeded generator. Every call is
recorded, so tests can check what a sampler asked for.
"""

from __future__ import annotations

import random
from collections import defaultdict

from components.types import Prompt, Rollout


def make_prompts(n: int, prefix: str = "p") -> list[Prompt]:
    return [Prompt(uid=f"{prefix}{i}", task="fake", text=f"{prefix}{i}", answer="1", tag="fake") for i in range(n)]


class ScriptedContext:
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
        self.calls: list[dict[str, int]] = []  # one {uid: n} per sample() call
        self.drawn: dict[str, int] = defaultdict(int)
        self.metrics: dict[str, float] = {}
        self.module = None
        self.encoded: list[str] = []  # texts passed to encode()
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

    def context_of(self, prompt: Prompt) -> list[int]:
        return [0, len(prompt.uid)]

    def draw_prompts(self, k: int) -> list[Prompt]:
        if len(self.extra) < k:
            raise AssertionError("ScriptedContext ran out of extra prompts")
        out, self.extra = self.extra[:k], self.extra[k:]
        return out

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return [0] * (len(text) + 1)

    def generate_text(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 1.0
    ) -> list[str]:
        """Replies popped from ``self.replies`` in order (a test scripts what the 'policy' writes)."""
        self.conversations.extend(conversations)
        self.temperatures.append(temperature)
        if len(self.replies) < len(conversations):
            raise AssertionError("ScriptedContext ran out of scripted text replies")
        out, self.replies = self.replies[: len(conversations)], self.replies[len(conversations) :]
        return out

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)
