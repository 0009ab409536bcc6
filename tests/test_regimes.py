"""Regimes: the worked-steps task, the pre-filter and the regime presets."""

from __future__ import annotations

import random

import pytest

from components.data import PromptDataModule, ReasoningGymTask
from components.errors import ConfigError
from components.policy import load_policy
from components.tasks import (
    ANSWER_MARKER,
    ColumnSumDataset,
    reasoning_tasks,
    reference_answer,
    split_completion,
    target_text,
    worked_steps,
)


# ---- the reasoning regime's task ------------------------------------------------------------------
def _replay_columns(steps: str, op: str) -> int:
    """Re-derive |result| from the written columns alone: the steps must carry the computation."""
    body = steps.split(": ", 1)[-1].rstrip(",")
    digits, carry = [], 0
    for col in body.split(", "):
        s = int(col.split("=")[1])
        if op == "+":
            digits.append(s % 10)
            carry = s // 10
        else:
            digits.append(s + 10 if s < 0 else s)
    if op == "+" and carry:
        digits.append(carry)
    return int("".join(str(d) for d in reversed(digits)))


def test_worked_steps_carry_the_computation():
    rng = random.Random(0)
    for _ in range(500):
        d = rng.randint(1, 4)
        a, b, op = rng.randint(0, 10**d - 1), rng.randint(0, 10**d - 1), rng.choice("+-")
        steps, value = worked_steps(a, op, b)
        assert value == (a + b if op == "+" else a - b)
        assert _replay_columns(steps, op) == abs(value)
        assert steps.startswith("-(") == (value < 0)
    assert worked_steps(47, "+", 38) == ("7+8+0=15, 4+3+1=8,", 85)
    assert worked_steps(15, "-", 43) == ("-(43-15): 3-5-0=-2, 4-1-1=2,", -28)


def test_verifier_reads_only_the_final_answer_after_the_marker():
    ds = ColumnSumDataset(seed=0, size=5, digits=2)
    it = ds[0]
    ref = it["metadata"]["answer_cot"]
    assert ds.score_answer(ref.strip(), it) == 1.0
    assert ds.score_answer(f"garbage steps {ANSWER_MARKER} {it['answer']}", it) == 1.0  # steps are not graded
    assert ds.score_answer(f"{ref.strip()}0", it) == 0.0  # wrong final answer
    assert ds.score_answer(it["answer"], it) == 0.0  # no marker: no credit
    assert ds.score_answer(f"{ANSWER_MARKER} 1 {ANSWER_MARKER} {it['answer']}", it) == 1.0  # the last marker counts
    plain = ColumnSumDataset(seed=0, size=5, digits=2, format="plain")
    assert plain.answer_marker is None and "answer_cot" not in plain[0]["metadata"]
    assert plain.score_answer(plain[0]["answer"], plain[0]) == 1.0


def test_split_completion_and_reference_answer_give_dro_its_pieces():
    reasoning, answer = split_completion(" 7+8+0=15, 4+3+1=8, #### 85", ANSWER_MARKER)
    assert reasoning == " 7+8+0=15, 4+3+1=8, ####" and answer == "85"
    assert split_completion("no marker here", ANSWER_MARKER) == ("no marker here", None)
    assert reference_answer(" 7+8+0=15, 4+3+1=8, #### 85", ANSWER_MARKER) == " 85"
    with pytest.raises(ValueError, match="no answer marker"):
        reference_answer("85", ANSWER_MARKER)


def test_reasoning_mix_prompts_carry_reference_marker_tags_and_stable_uids():
    def build() -> PromptDataModule:
        dm = PromptDataModule(tasks=reasoning_tasks(), train_size=300, heldout_size=30, seed=3)
        dm.setup()
        return dm

    a, b = build(), build()
    assert [p.uid for p in a.train_pool.prompts] == [p.uid for p in b.train_pool.prompts]
    assert {p.tag for p in a.train_pool.prompts} == {"d1", "d2", "d3"}
    _, tok = load_policy("embedded:tiny")
    lengths = []
    for p in a.train_pool.prompts + a.heldout:
        assert p.answer_marker == ANSWER_MARKER and p.reference and p.reference.endswith(f"{ANSWER_MARKER} {p.answer}")
        assert a.verifier(p)(p.reference.strip(), p) == 1.0
        assert target_text(p) == p.reference
        ids = tok(p.reference, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids  # every character is in the char vocabulary
        lengths.append(len(ids))
    assert sum(lengths) / len(lengths) >= 24  # the floor for worked-steps answers


def test_column_sum_is_selected_by_name_and_rejects_bad_config():
    dm = PromptDataModule(
        tasks=[ReasoningGymTask("column_sum", {"digits": 1, "format": "plain"}, tag="d1")], train_size=20, heldout_size=4
    )
    dm.setup()
    p = dm.train_pool.prompts[0]
    assert p.answer_marker is None and p.reference is None and target_text(p) == " " + p.answer
    with pytest.raises(ConfigError, match="data.tasks\\[column_sum\\].*format"):
        PromptDataModule(tasks=[ReasoningGymTask("column_sum", {"format": "latex"})], train_size=4, heldout_size=2).setup()
