"""Hint sources for SAGE self-hinting (:mod:`components.samplers.sage`): for a prompt, hints of
increasing strength ``{1: h1, 2: h2, ..., L: hL}`` written from privileged information (the
prompt's reference solution, or its answer) that the policy never sees at test time.

* :class:`SelfHint` is the paper's *online self-hint*: the current policy itself writes the hints,
  as JSON with keys ``level_1 .. level_L``, from the question and the solution (one call gives every
  level; up to ``attempts`` tries when the JSON does not parse). It needs a model that can follow
  the instruction, i.e. a real instruct model.
* :class:`PrefixHint` is a deterministic offline source for models that cannot write hints (the
  embedded char model): level ``l`` of ``L`` reveals the first ``floor(l / (L + 1) * n)`` characters
  of the solution, never all of it (a partial-solution hint, as in Scaf-GRPO). Not the paper's
  source; use it to exercise the SAGE loop on CPU or as an ablation.

A prompt with no privileged text gets no hint (the SAGE pitfall "no reference, no hint"); with
``use_answer=True`` the verifier's answer stands in for a missing reference solution.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import Any

from components.errors import ConfigError
from components.types import Prompt

# Our wording of the hint-writing instruction (the authors' is in their recipe/hint/prompt.py).
HINT_SYSTEM = (
    "You are a tutor. From a problem and its worked solution, write {levels} hints of increasing "
    "strength that help a student solve the problem. Never state the final answer. Hint 1 names the "
    "key idea, the last hint gives most of the method. Reply with JSON only: {keys}."
)
HINT_USER = "Problem:\n{problem}\n\nSolution:\n{solution}"


class HintSource(ABC):
    """Writes hints of levels ``1..levels`` for prompts; ``None`` where it has none for a prompt."""

    def __init__(self, use_answer: bool = False) -> None:
        self.use_answer = use_answer

    def solution(self, prompt: Prompt) -> str | None:
        """The privileged text hints are written from: the reference solution, else (opt-in) the answer."""
        if prompt.reference:
            return prompt.reference
        return prompt.answer if self.use_answer and prompt.answer else None

    @abstractmethod
    def hints(self, prompts: list[Prompt], levels: int, ctx: Any) -> list[dict[int, str] | None]:
        """One ``{level: hint}`` per prompt (``None``: no hint for it). ``ctx`` is the sampling context."""


class PrefixHint(HintSource):
    """Level ``l`` of ``levels`` = the first ``floor(l / (levels + 1) * n)`` characters of the
    solution (at least one, never all); the hint is stripped of surrounding whitespace."""

    def hints(self, prompts: list[Prompt], levels: int, ctx: Any) -> list[dict[int, str] | None]:
        out: list[dict[int, str] | None] = []
        for p in prompts:
            sol = self.solution(p)
            if not sol or len(sol) < 2:  # a one-character solution has no proper prefix
                out.append(None)
                continue
            n = len(sol)
            out.append({lv: sol[: min(max(1, lv * n // (levels + 1)), n - 1)].strip() for lv in range(1, levels + 1)})
        return out


def parse_hint_json(text: str, levels: int) -> dict[int, str] | None:
    """The ``level_1 .. level_L`` strings of the first JSON object in ``text``; None unless all parse."""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if m is None:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for lv in range(1, levels + 1):
        h = obj.get(f"level_{lv}")
        if not isinstance(h, str) or not h.strip():
            return None
        out[lv] = h.strip()
    return out


class SelfHint(HintSource):
    """The current policy writes the hints (SAGE's online self-hint).

    Args:
        attempts: tries per prompt when the reply is not valid JSON with every level (authors: 3).
        max_new_tokens: length of a hint reply.
        temperature: sampling temperature of the hint reply.
        use_answer: write from the answer when a prompt has no reference solution.
        drop_leaks: discard a prompt's hints when one of them contains the answer verbatim (the
            paper's prompt forbids it but nothing checks; a leaked answer closes the gate again).
    """

    def __init__(
        self,
        attempts: int = 3,
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        use_answer: bool = False,
        drop_leaks: bool = True,
    ) -> None:
        super().__init__(use_answer)
        if attempts < 1:
            raise ConfigError("model.sampler.hints.attempts", f"must be >= 1, got {attempts}")
        if max_new_tokens < 1:
            raise ConfigError("model.sampler.hints.max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        self.attempts, self.max_new_tokens, self.temperature = attempts, max_new_tokens, temperature
        self.drop_leaks = drop_leaks

    def messages(self, prompt: Prompt, solution: str, levels: int) -> list[dict[str, str]]:
        keys = ", ".join(f'"level_{lv}": "..."' for lv in range(1, levels + 1))
        return [
            {"role": "system", "content": HINT_SYSTEM.format(levels=levels, keys="{" + keys + "}")},
            {"role": "user", "content": HINT_USER.format(problem=prompt.text, solution=solution)},
        ]

    def hints(self, prompts: list[Prompt], levels: int, ctx: Any) -> list[dict[int, str] | None]:
        out: list[dict[int, str] | None] = [None] * len(prompts)
        todo = [i for i, p in enumerate(prompts) if self.solution(p)]
        attempts = failed_leak = 0
        for _ in range(self.attempts):
            if not todo:
                break
            replies = ctx.generate_text(
                [self.messages(prompts[i], self.solution(prompts[i]), levels) for i in todo],
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
            )
            attempts += len(todo)
            still = []
            for i, reply in zip(todo, replies):
                parsed = parse_hint_json(reply, levels)
                if parsed is None:
                    still.append(i)
                elif self.drop_leaks and prompts[i].answer and any(prompts[i].answer in h for h in parsed.values()):
                    failed_leak += 1  # a leak is not retried: the policy would likely leak again
                else:
                    out[i] = parsed
            todo = still
        ctx.log("hint/generate_attempts", attempts)
        ctx.log("hint/generate_leaked", failed_leak)
        return out
