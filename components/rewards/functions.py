"""Rewards as plain Python functions, as TRL's ``reward_funcs``.

A reward function takes the completions of one prompt and returns one float per completion::

    def brevity(prompts, completions, answer, **kwargs) -> list[float]:
        return [1.0 if len(c) < 40 else 0.0 for c in completions]

``prompts``, ``completions`` and ``answer`` are lists of equal length (one entry per rollout of the
prompt: the bare prompt text, the completion text, the reference answer); ``kwargs`` holds
``task`` (the task's key) and ``tag`` (its slice, e.g. ``d2``) and may grow, so accept ``**kwargs``. A ``None`` or NaN
entry counts as a NaN reward (``reward/nan``); a function that raises fails that prompt's rollouts
(``reward/errors``); the run guard stops the run past its limits.

Name one in a recipe as ``model.reward: pkg.module:function``, several (summed, equal weights) as a
list, or weighted as ``FunctionReward``::

    model:
      reward:
        class_path: components.rewards.functions.FunctionReward
        init_args: {funcs: [mypkg.rewards:correct, mypkg.rewards:brevity], weights: [1.0, 0.1]}
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from components.errors import ConfigError
from components.rewards.verifier import Reward
from components.types import Prompt, Rollout

FIELD = "model.reward"


def load_function(path: str, field: str = FIELD) -> Callable[..., Any]:
    """``pkg.module:function`` (or ``pkg.module.function``) -> the function, imported, never evaluated."""
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(field, f"need 'pkg.module:function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(field, f"cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(field, f"{path!r} is not callable")
    return fn


class FunctionReward(Reward):
    """The weighted sum of plain reward functions (see the module docstring).

    Args:
        funcs: ``pkg.module:function`` names.
        weights: one weight per function (default: 1 each).
        pass_threshold: a rollout counts as passed (gate statistics, pass rates) when its summed
            reward is at least this.
    """

    def __init__(self, funcs: list[str], weights: list[float] | None = None, pass_threshold: float = 1.0) -> None:
        if isinstance(funcs, str):
            funcs = [funcs]
        if not funcs:
            raise ConfigError(f"{FIELD}.funcs", "name at least one reward function ('pkg.module:function')")
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"{FIELD}.weights", f"{len(weights)} weights for {len(funcs)} functions; give one per function")
        self.names = list(funcs)
        self.funcs = [load_function(f, f"{FIELD}.funcs") for f in funcs]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(funcs)
        self.pass_threshold = pass_threshold

    def score(self, prompt: Prompt, rollouts: list[Rollout]) -> None:
        n = len(rollouts)
        args = {"prompts": [prompt.text] * n, "completions": [r.text for r in rollouts], "answer": [prompt.answer] * n}
        total = [0.0] * n
        for name, fn, w in zip(self.names, self.funcs, self.weights, strict=True):
            out = list(fn(**args, task=[prompt.task] * n, tag=[prompt.tag] * n))
            if len(out) != n:
                raise ValueError(f"{name} returned {len(out)} rewards for {n} completions")
            for i, v in enumerate(out):
                total[i] += w * (math.nan if v is None else float(v))
        for r, v in zip(rollouts, total, strict=True):
            r.reward = v
            r.passed = math.isfinite(v) and v >= self.pass_threshold


def as_reward(reward: Reward | str | list[str]) -> Reward:
    """``model.reward`` as given: a Reward, one function name, or a list of them (equal weights)."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str) or (isinstance(reward, list) and all(isinstance(x, str) for x in reward)):
        return FunctionReward(funcs=[reward] if isinstance(reward, str) else list(reward))
    raise ConfigError(FIELD, f"a Reward class, 'pkg.module:function' or a list of them, got {type(reward).__name__}")
