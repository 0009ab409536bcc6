"""Rewards as plain functions (components/rewards/functions.py), on hand-made rollouts."""

from __future__ import annotations

import sys
import types

import pytest

from components.errors import ConfigError
from components.rewards.functions import FunctionReward, as_reward
from components.rewards.verifier import VerifierReward, score_guarded
from components.types import Prompt, Rollout


@pytest.fixture
def rewards_module(monkeypatch):
    mod = types.ModuleType("fnrewards")
    mod.length = lambda prompts, completions, answer, **kw: [float(len(c)) for c in completions]
    mod.matches = lambda prompts, completions, answer, **kw: [float(c == a) for c, a in zip(completions, answer)]
    mod.holes = lambda prompts, completions, answer, **kw: [None] * len(completions)
    mod.short = lambda prompts, completions, answer, **kw: [1.0]
    mod.kwargs_seen = []
    mod.spy = lambda prompts, completions, answer, **kw: mod.kwargs_seen.append((prompts, kw)) or [0.0] * len(completions)
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "fnrewards", mod)
    return mod


def _rollouts(*texts: str) -> list[Rollout]:
    return [Rollout([1], [0.0], t, True) for t in texts]


PROMPT = Prompt("u1", "file:x:0", "2+2 =", "4", {}, "d1")


def test_weighted_sum_of_functions_and_pass_threshold(rewards_module):
    reward = FunctionReward(["fnrewards:matches", "fnrewards:length"], weights=[2.0, 0.5], pass_threshold=2.0)
    rs = _rollouts("4", "44", "5")
    reward.score(PROMPT, rs)
    assert [r.reward for r in rs] == [2.0 + 0.5, 0.0 + 1.0, 0.0 + 0.5]
    assert [r.passed for r in rs] == [True, False, False]


def test_functions_get_the_prompt_the_answer_and_the_task(rewards_module):
    FunctionReward(["fnrewards:spy"]).score(PROMPT, _rollouts("a", "b"))
    ((prompts, kw),) = rewards_module.kwargs_seen
    assert prompts == ["2+2 =", "2+2 ="] and kw == {"task": ["file:x:0"] * 2, "tag": ["d1", "d1"]}


def test_none_is_a_nan_reward_and_a_wrong_length_is_a_fault(rewards_module):
    rs = _rollouts("a", "b")
    assert score_guarded(FunctionReward(["fnrewards:holes"]), PROMPT, rs)[:2] == (0, 2)
    assert all(r.reward == 0.0 and not r.passed for r in rs)
    n_err, _, last = score_guarded(FunctionReward(["fnrewards:short"]), PROMPT, _rollouts("a", "b"))
    assert n_err == 2 and "returned 1 rewards for 2 completions" in last


def test_the_shorthands_and_bad_names(rewards_module):
    one = as_reward("fnrewards:length")
    assert isinstance(one, FunctionReward) and one.weights == [1.0]
    two = as_reward(["fnrewards:length", "fnrewards.matches"])
    assert two.names == ["fnrewards:length", "fnrewards.matches"] and two.weights == [1.0, 1.0]
    verifier = VerifierReward()
    assert as_reward(verifier) is verifier
    with pytest.raises(ConfigError, match="cannot import 'fnrewards:nope'"):
        as_reward("fnrewards:nope")
    with pytest.raises(ConfigError, match="is not callable"):
        as_reward("fnrewards:not_callable")
    with pytest.raises(ConfigError, match="2 weights for 1 functions"):
        FunctionReward(["fnrewards:length"], weights=[1.0, 2.0])
