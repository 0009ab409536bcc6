"""Data, reward and engine parts on real components: stable uids, held-out split, file sources,
clear errors for bad input (empty data, long prompts, NaN rewards, raising verifiers)."""

from __future__ import annotations

import json
import math

import pytest

from components.data.datamodule import FileTask, PromptDataModule, ReasoningGymTask, default_tasks
from components.engines.base import SamplingParams
from components.engines.hf import HFEngine
from components.errors import ConfigError
from components.policy import encode_prompt, load_policy
from components.rewards.verifier import OverlongPenalty, VerifierReward, score_guarded
from components.types import Prompt, Rollout
from tests.fakes import ScriptedHandle


def _dm(**kw) -> PromptDataModule:
    dm = PromptDataModule(**{"train_size": 60, "heldout_size": 12, **kw})
    dm.setup()
    return dm


def test_uids_are_stable_and_independent_of_draw_order():
    a, b = _dm(), _dm()
    assert [p.uid for p in a.train_pool.prompts] == [p.uid for p in b.train_pool.prompts]
    b.draw(5)
    assert {p.uid for p in a.train_pool.prompts} == {p.uid for p in b.train_pool.prompts}
    assert len({p.uid for p in a.train_pool.prompts}) > 30


def test_default_mix_has_three_difficulty_slices_and_heldout():
    dm = _dm(train_size=200, heldout_size=60)
    tags = {p.tag for p in dm.train_pool.prompts}
    assert tags == {"d1", "d2", "d3"} == {t.tag for t in default_tasks()}
    assert len(dm.heldout) == 60 and {p.tag for p in dm.heldout} == tags
    # 2- and 3-digit held-out items are not in the training pool
    train_text = {p.text for p in dm.train_pool.prompts}
    assert all(p.text not in train_text for p in dm.heldout if p.tag != "d1")


def test_draw_stream_resumes_from_state():
    dm = _dm()
    dm.draw(3)
    state = dm.state_dict()
    nxt = [p.uid for p in dm.draw(4)]
    dm2 = _dm()
    dm2.load_state_dict(state)
    assert [p.uid for p in dm2.draw(4)] == nxt


def _handle(max_new_tokens: int = 8) -> ScriptedHandle:
    h = ScriptedHandle()
    h.sampling = SamplingParams(max_new_tokens=max_new_tokens)
    return h


def test_task_verifier_is_the_tasks_own_with_partial_credit_as_fail():
    dm = _dm()
    p = dm.train_pool.prompts[0]
    rw = VerifierReward()
    rw.setup(_handle(), dm.verifier)
    rs = [Rollout([1], [0.0], f" {p.answer} ", True), Rollout([1], [0.0], p.answer + "0", True)]
    rw.score(p, rs)
    assert rs[0].passed and rs[0].reward == 1.0
    assert not rs[1].passed and rs[1].reward == 0.0  # reasoning-gym gives partial credit; a pass is a score of 1
    rw2 = VerifierReward(mode="score")
    rw2.setup(_handle(), dm.verifier)
    rw2.score(p, rs)
    assert 0 < rs[1].reward < 1 and not rs[1].passed


def test_file_source_jsonl_with_math_verify(tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "reference": "add"}) for i in range(20))
    )
    dm = PromptDataModule(tasks=[], files=[FileTask(str(f), heldout_fraction=0.25)], train_size=10, heldout_size=5)
    dm.setup()
    assert len(dm.train_pool) == 15 and len(dm.heldout) == 5
    p = dm.train_pool.prompts[0]
    assert p.reference == "add"
    rw = VerifierReward()
    rw.setup(_handle(), dm.verifier)
    rs = [Rollout([1], [0.0], p.answer, True), Rollout([1], [0.0], "nonsense", True)]
    rw.score(p, rs)
    assert [r.passed for r in rs] == [True, False]


def test_empty_sources_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.tasks"):
        PromptDataModule(tasks=[], files=[])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    dm = PromptDataModule(tasks=[], files=[FileTask(str(empty))])
    with pytest.raises(ConfigError, match="empty"):
        dm.setup()
    with pytest.raises(ConfigError, match="data.files.path"):
        PromptDataModule(tasks=[], files=[FileTask(str(tmp_path / "missing.jsonl"))]).setup()
    with pytest.raises(ConfigError, match="data.tasks"):
        PromptDataModule(tasks=[ReasoningGymTask("no_such_task")]).setup()
    with pytest.raises(ConfigError, match="prompt_template"):
        PromptDataModule(tasks=[ReasoningGymTask("chain_sum", prompt_template="{nope}")], train_size=5, heldout_size=2).setup()


def test_verifier_that_raises_or_returns_nan_is_reported_with_the_prompt():
    class DM:
        def __init__(self, fn):
            self.fn = fn

        def verifier(self, prompt):
            return self.fn

    p = Prompt("u1", "t", "1+1 =", "2")
    rw = VerifierReward()
    # A fault fails the rollout (reward 0, not passed) and is reported with the prompt's uid; the
    # run's RunGuard stops it once faults pass a share (tests/test_reliability.py).
    rw.setup(_handle(), DM(lambda out, prompt: 1 / 0).verifier)
    rs = [Rollout([1], [0.0], "2", True)]
    n_err, n_nan, msg = score_guarded(rw, p, rs)
    assert (n_err, n_nan) == (1, 0) and "u1" in msg and rs[0].reward == 0.0 and not rs[0].passed
    rw.setup(_handle(), DM(lambda out, prompt: math.nan).verifier)
    rs = [Rollout([1], [0.0], "2", True)]
    n_err, n_nan, msg = score_guarded(rw, p, rs)
    assert n_nan == 1 and "u1" in msg and rs[0].reward == 0.0 and not rs[0].passed


def test_overlong_penalty_ramp():
    pen = OverlongPenalty(buffer=2, factor=1.0)
    assert [pen(n, 8) for n in (5, 6, 7, 8)] == [0.0, 0.0, -0.5, -1.0]


def test_hf_engine_returns_sampling_logprobs_and_eos_handling():
    model, tok = load_policy("embedded:tiny")
    eng = HFEngine()
    eng.bind(model, tok)
    ctxs = [encode_prompt(tok, "3 + 4 ="), encode_prompt(tok, "12 + 30 =")]
    out = eng.generate(ctxs, [3, 0], SamplingParams(1.0, 1.0, 6))
    assert len(out[0]) == 3 and out[1] == []
    for r in out[0]:
        assert len(r.token_ids) == len(r.logprobs) <= 6
        assert all(lp <= 0 for lp in r.logprobs)
        if r.finished:
            assert r.token_ids[-1] == tok.eos_token_id and tok.pad_token_id not in r.token_ids
    greedy = eng.generate(ctxs[:1], [2], SamplingParams(0.0, 1.0, 6))[0]
    assert greedy[0].token_ids == greedy[1].token_ids


def test_prompt_longer_than_context_is_a_clear_error():
    model, tok = load_policy("embedded:tiny")
    eng = HFEngine()
    eng.bind(model, tok)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        eng.generate([encode_prompt(tok, "1" * 70)], [1], SamplingParams(1.0, 1.0, 8))


def test_bad_sampling_params_name_the_field():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0).validate()


def test_tuning_split_is_apart_from_training_and_test():
    """``heldout_split: tune`` evaluates on a third set: none of its multi-digit items is in the
    training pool or in the test set, and the training pool is the same as under ``test``."""
    test, tune = _dm(train_size=200, heldout_size=60), _dm(train_size=200, heldout_size=60, heldout_split="tune")
    test.setup()
    tune.setup()
    assert [p.uid for p in test.train_pool.prompts] == [p.uid for p in tune.train_pool.prompts]
    train = {p.text for p in tune.train_pool.prompts}
    big = [p for p in tune.heldout if p.tag != "d1"]  # 1-digit sums: 200 items, overlap unavoidable
    assert len(tune.heldout) == 60 and big
    assert not {p.text for p in big} & (train | {p.text for p in test.heldout})


def test_tuning_split_refuses_files_and_unknown_names(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(ConfigError, match="data.heldout_split"):
        PromptDataModule(tasks=[], files=[FileTask(str(f))], heldout_split="tune")
    with pytest.raises(ConfigError, match="'test', 'tune'"):
        PromptDataModule(heldout_split="dev")


def test_unset_tasks_are_the_default_mix_or_none_beside_files(tmp_path):
    from components.data.datamodule import resolve_tasks

    assert resolve_tasks(None, None) == default_tasks() and resolve_tasks(None, []) == default_tasks()
    assert resolve_tasks(None, [FileTask("x.jsonl")]) == []
    mine = [ReasoningGymTask("chain_sum", tag="mine")]
    assert resolve_tasks(mine, [FileTask("x.jsonl")]) == mine
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(8)))
    assert PromptDataModule(files=[FileTask(str(f))]).tasks == []
