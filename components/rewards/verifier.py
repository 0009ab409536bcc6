"""Rewards: score rollouts with the task's own verifier.

A reward fills ``Rollout.reward`` and ``Rollout.passed``. ``passed`` is the binary outcome that gate
statistics and pass-rate estimates use; ``reward`` is what the advantage sees (binary by default).

A reward that raises, or returns NaN, does not end the run by itself: :func:`score_guarded` scores
the rollout as failed (reward 0, not passed) and counts the fault; the run guard stops the run once
such faults pass a configured share (``guard.max_reward_error_share`` / ``max_reward_nan_share``).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from components.errors import ConfigError
from components.types import Prompt, Rollout

if TYPE_CHECKING:
    from components.handle import StepHandle


class Reward(ABC):
    """Scores the rollouts of one prompt in place.

    ``setup`` is called once, before training, with the step's handle (components/handle.py:
    the policy, the tokenizer, the contexts, the sampling settings, metrics) and ``verifier_of``,
    which gives each prompt's task verifier ``verify(answer, prompt) -> score`` (the data module's).
    """

    def setup(self, handle: StepHandle, verifier_of: Callable[[Prompt], Callable[[str, Prompt], float]]) -> None:
        self.handle = handle
        self.verifier_of = verifier_of
        self.max_new_tokens = handle.sampling.max_new_tokens

    @abstractmethod
    def score(self, prompt: Prompt, rollouts: list[Rollout]) -> None:
        """Set ``reward`` and ``passed`` of every rollout."""

    def fail(self, rollout: Rollout, message: str) -> None:
        """Score one rollout as failed because its reward could not be computed, and record why."""
        rollout.reward, rollout.passed = 0.0, False
        self.__dict__.setdefault("_errors", []).append(message)

    def take_errors(self) -> list[str]:
        """The messages of rollouts failed with :meth:`fail` since the last call."""
        return self.__dict__.pop("_errors", [])


def score_guarded(reward: Reward, prompt: Prompt, rollouts: list[Rollout]) -> tuple[int, int, str]:
    """Score ``rollouts``; returns (rollouts whose reward raised, rollouts with a NaN / infinite
    reward, the last fault's message). Faulty rollouts are scored as failed (reward 0)."""
    last = ""
    try:
        reward.score(prompt, rollouts)
        errors = reward.take_errors()
        n_err = len(errors)
        last = errors[-1] if errors else ""
    except Exception as e:  # a reward that fails the whole prompt: every rollout of it failed
        reward.take_errors()
        for r in rollouts:
            r.reward, r.passed = 0.0, False
        n_err = len(rollouts)
        last = f"{type(reward).__name__} raised on prompt uid={prompt.uid}: {type(e).__name__}: {e}"
    n_nan = 0
    for r in rollouts:
        if not math.isfinite(r.reward):
            r.reward, r.passed = 0.0, False
            n_nan += 1
            last = f"{type(reward).__name__} gave a non-finite reward on prompt uid={prompt.uid}"
    return n_err, n_nan, " ".join(last.split())[:300]


@dataclass
class OverlongPenalty:
    """DAPO's soft overlong penalty: 0 up to ``max_new_tokens - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_new_tokens`` (rollouts cut at the limit get ``-factor``)."""

    buffer: int = 2
    factor: float = 1.0

    def __call__(self, length: int, max_len: int) -> float:
        start = max_len - self.buffer
        if length <= start:
            return 0.0
        return -min((length - start) / max(self.buffer, 1), 1.0) * self.factor


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str, how: str) -> str:
    if how == "strip":
        return text.strip()
    if how == "answer_tag":
        m = _ANSWER_TAG.findall(text)
        return m[-1].strip() if m else ""
    if how == "last_line":
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""
    raise ConfigError("model.reward.extract", f"unknown extractor {how!r}; valid: 'strip', 'answer_tag', 'last_line'")


class VerifierReward(Reward):
    """The task's own verifier (reasoning-gym ``score_answer``, math-verify for files).

    Args:
        mode: ``binary`` gives 1 for a pass (score >= ``pass_threshold``) and 0 otherwise;
            ``score`` passes the verifier's score through (reasoning-gym gives partial credit,
            e.g. 0.67 for '170' when the answer is '17').
        pass_threshold: the score that counts as a pass (1.0: exact).
        extract: how the answer is taken from the completion: ``strip``, ``answer_tag``
            (the last ``<answer>...</answer>``), ``last_line``.
        overlong: DAPO overlong shaping, added to the reward (not to ``passed``).
    """

    def __init__(
        self,
        mode: Literal["binary", "score"] = "binary",
        pass_threshold: float = 1.0,
        extract: Literal["strip", "answer_tag", "last_line"] = "strip",
        overlong: OverlongPenalty | None = None,
    ) -> None:
        if mode not in ("binary", "score"):
            raise ConfigError("model.reward.mode", f"{mode!r} is not one of 'binary', 'score'")
        extract_answer("", extract)  # validates the name
        self.mode = mode
        self.pass_threshold = pass_threshold
        self.extract = extract
        self.overlong = overlong

    def score(self, prompt: Prompt, rollouts: list[Rollout]) -> None:
        verify = self.verifier_of(prompt)
        for r in rollouts:
            answer = extract_answer(r.text, self.extract)
            try:
                s = float(verify(answer, prompt))
            except Exception as e:
                self.fail(
                    r,
                    f"verifier of task {prompt.task!r} raised on prompt uid={prompt.uid} ({prompt.text!r}) "
                    f"with answer {answer!r}: {type(e).__name__}: {e}",
                )
                continue
            if not math.isfinite(s):
                r.reward, r.passed = s, False  # counted as a NaN reward by score_guarded
                continue
            r.passed = s >= self.pass_threshold
            r.reward = float(r.passed) if self.mode == "binary" else s
            if self.overlong is not None:
                r.reward += self.overlong(len(r.token_ids), self.max_new_tokens)
