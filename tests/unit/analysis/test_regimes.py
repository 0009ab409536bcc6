"""Regimes: the worked-steps task, the pre-filter and the regime presets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from components.analysis.regimes import REGIMES, Regime, build_regime, cached_report
from components.analysis.warm_start import WarmStartSpec
from components.data.datamodule import PromptDataModule, ReasoningGymTask, default_tasks, reasoning_tasks
from components.data.prefilter import PrefilterConfig
from components.data.tasks import (
    ANSWER_MARKER,
    ColumnSumDataset,
    reference_answer,
    split_completion,
    target_text,
    worked_steps,
)
from components.errors import ConfigError
from components.policy import load_policy


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


# ---- the pre-filter -------------------------------------------------------------------------------
def _filtered_dm(tmp_path, seed: int = 0, **cfg) -> PromptDataModule:
    pf = PrefilterConfig(
        **{
            "k": 4,
            "min_solved": 1,
            "max_solved": 3,
            "model": "embedded:tiny",
            "max_new_tokens": 8,
            "cache_dir": str(tmp_path),
            **cfg,
        }
    )
    dm = PromptDataModule(train_size=40, heldout_size=8, seed=seed, prefilter=pf)
    dm.setup()
    return dm


def test_prefilter_keeps_the_solve_range_counts_drops_and_leaves_heldout(tmp_path):
    dm = _filtered_dm(tmp_path)
    rep = dm.prefilter_report
    assert not rep.cache_hit and rep.kept == len(dm.train_pool) and rep.kept > 0
    assert rep.kept + rep.dropped_low + rep.dropped_high == 40
    assert rep.dropped_low > 0  # the tiny model never solves 3-digit items
    assert sum(c["total"] for c in rep.by_tag.values()) == 40 and rep.by_tag["d3"]["kept"] == 0
    counts = json.loads(Path(rep.cache_file).read_text())
    assert all(1 <= counts[p.uid] <= 3 for p in dm.train_pool.prompts)
    full = PromptDataModule(train_size=40, heldout_size=8, seed=0)
    full.setup()
    assert [p.uid for p in dm.heldout] == [p.uid for p in full.heldout]  # evaluation is not filtered
    dropped = [p for p in full.train_pool.prompts if not 1 <= counts[p.uid] <= 3]
    assert len(dropped) == rep.dropped_low + rep.dropped_high
    assert "prefilter: kept" in rep.summary() and "dropped" in rep.summary()


def test_prefilter_cache_hits_and_is_keyed_by_model_and_data(tmp_path, monkeypatch):
    first = _filtered_dm(tmp_path).prefilter_report
    torch.manual_seed(5)
    second = _filtered_dm(tmp_path, max_solved=4)  # a new rule reuses the solve counts
    after_hit = torch.rand(3)
    assert second.prefilter_report.cache_hit and second.prefilter_report.cache_file == first.cache_file
    assert second.prefilter_report.kept == first.kept + first.dropped_high
    # The filter's sampling never shifts the run's random stream (hit or miss alike).
    torch.manual_seed(5)
    _filtered_dm(tmp_path / "fresh")
    assert torch.equal(torch.rand(3), after_hit)
    # Other data: a miss. Another model (perturbed weights): a miss.
    assert not _filtered_dm(tmp_path, seed=1).prefilter_report.cache_hit
    model, tok = load_policy("embedded:tiny")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    other = _filtered_dm(tmp_path, model=str(tmp_path / "other")).prefilter_report
    assert not other.cache_hit and other.cache_file != first.cache_file
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_prefilter_rejects_bad_ranges_and_empty_results(tmp_path):
    with pytest.raises(ConfigError, match="data.prefilter.min_solved"):
        _filtered_dm(tmp_path, min_solved=3, max_solved=2)
    with pytest.raises(ConfigError, match="data.prefilter.k"):
        _filtered_dm(tmp_path, k=0)
    # Only 3-digit items, which the model never solves: nothing survives >= 1 of 4.
    pf = PrefilterConfig(k=2, model="embedded:tiny", max_new_tokens=8, cache_dir=str(tmp_path))
    dm = PromptDataModule(tasks=[t for t in default_tasks() if t.tag == "d3"], train_size=6, heldout_size=2, prefilter=pf)
    with pytest.raises(ConfigError, match="data.prefilter.*empty"):
        dm.setup()




# ---- presets --------------------------------------------------------------------------------------


def test_build_regime_caches_by_spec(tmp_path, monkeypatch):
    spec = WarmStartSpec(default_tasks(), ["d1"], "d1", 1.0, max_steps=3, eval_every=2, eval_items=8, train_pool=64)
    monkeypatch.setitem(REGIMES, "toy", Regime("toy", "a 3-step warm start", spec))
    logs: list[str] = []
    path = build_regime("toy", cache_root=tmp_path, log=logs.append)
    report = cached_report("toy", tmp_path)
    assert report["steps"] == 3 and not report["reached_target"] and set(report["stop_eval"]) == {"d1", "d2", "d3", "all"}
    model, _ = load_policy(path)  # a plain local folder: what an overlay's model.model names
    assert model.config.max_position_embeddings == 64
    logs.clear()
    assert build_regime("toy", cache_root=tmp_path, log=logs.append) == path and not logs  # cache hit
    spec.target = 0.5  # another spec: the cached model no longer matches
    assert cached_report("toy", tmp_path) is None


def test_model_sizes_and_spec_checks():
    from components.analysis.warm_start import new_model

    for size, lo, hi in (("tiny", 0.8e6, 1.0e6), ("small", 2e6, 4e6)):
        model, tok = new_model(size, 128)
        n = sum(p.numel() for p in model.parameters())
        assert lo < n < hi and model.config.max_position_embeddings == 128 and model.config.vocab_size == len(tok)
    with pytest.raises(ConfigError, match="warm_start.target_tag"):
        WarmStartSpec(default_tasks(), target_tag="d9").validate()
    with pytest.raises(ConfigError, match="warm_start.model_size"):
        WarmStartSpec(default_tasks(), model_size="huge").validate()
