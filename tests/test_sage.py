"""SAGE self-hinting: hint sources and the escalation loop on scripted rewards, then the real loop
through the CLI on the tiny model (prefix hints in the training context, not in evaluation)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from components.cli import build_cli
from components.errors import ConfigError
from components.hints import PrefixHint, SelfHint, parse_hint_json
from components.samplers.sage import SAGESampler
from components.types import Prompt
from tests.fakes import ScriptedContext, make_prompts
from tests.test_recipes import SMALL, _metrics

ROOT = Path(__file__).resolve().parents[1]


def _p(uid: str, answer: str = "579", reference: str | None = None) -> Prompt:
    return Prompt(uid=uid, task="fake", text=f"q{uid} =", answer=answer, reference=reference)


def test_prefix_hints_grow_with_level_and_never_reveal_the_whole_solution():
    src = PrefixHint()
    [h] = src.hints([_p("a", reference="2+4=6 then 1+3=4 so 46")], 3, None)
    assert h is not None and [len(h[lv]) for lv in (1, 2, 3)] == sorted(len(h[lv]) for lv in (1, 2, 3))
    assert h[3] != "2+4=6 then 1+3=4 so 46" and "2+4=6 then 1+3=4 so 46".startswith(h[3])
    # No reference: no hint, unless the answer may stand in; a one-character answer has no proper prefix.
    assert src.hints([_p("b")], 3, None) == [None]
    assert PrefixHint(use_answer=True).hints([_p("c", answer="579")], 3, None) == [{1: "5", 2: "5", 3: "57"}]
    assert PrefixHint(use_answer=True).hints([_p("d", answer="7")], 3, None) == [None]


def test_hint_json_parsing():
    ok = 'Sure! {"level_1": "add units", "level_2": "carry the 1", "level_3": "units give 9"} done'
    assert parse_hint_json(ok, 3) == {1: "add units", 2: "carry the 1", 3: "units give 9"}
    assert parse_hint_json('{"level_1": "x", "level_2": ""}', 2) is None  # empty level
    assert parse_hint_json('{"level_1": "x"', 1) is None  # not JSON
    assert parse_hint_json("no braces", 1) is None


def test_self_hint_retries_unparseable_replies_and_drops_leaks():
    ctx = ScriptedContext()
    good = json.dumps({"level_1": "think of place value", "level_2": "units first"})
    leak = json.dumps({"level_1": "the answer is 579", "level_2": "579"})
    # Attempt 1: a (garbage), b (leak), c (good); attempt 2: a (good). d has no reference: never asked.
    ctx.replies = ["garbage", leak, good, good]
    prompts = [_p("a", reference="r"), _p("b", reference="r"), _p("c", reference="r"), _p("d")]
    out = SelfHint(attempts=3).hints(prompts, 2, ctx)
    assert out[0] == out[2] == {1: "think of place value", 2: "units first"}
    assert out[1] is None and out[3] is None
    assert ctx.metrics["hint/generate_attempts"] == 4 and ctx.metrics["hint/generate_leaked"] == 1
    system, user = ctx.conversations[0]
    assert system["role"] == "system" and '"level_2"' in system["content"] and "Solution:\nr" in user["content"]


def test_sage_escalates_until_a_success_and_replaces_the_group():
    # p0 solves without a hint (never hinted); p1 fails plain and at level 1, succeeds at level 2;
    # p2 fails at every level (its level-3 group is kept); p3 has no reference (no hint, kept plain).
    g = 4
    ctx = ScriptedContext(
        scripts={
            "p0": [1, 0, 0, 0],
            "p1": [0] * g + [0] * g + [0, 1, 0, 0],
            "p2": [0] * g * 4,
            "p3": [0] * g,
        }
    )
    prompts = [_p("p0", reference="abcd"), _p("p1", reference="abcd"), _p("p2", reference="abcd"), _p("p3")]
    groups = SAGESampler(group_size=g, max_level=3, hints=PrefixHint(), template="{problem} {hint}").collect(prompts, ctx)

    assert [c for c in ctx.calls] == [{"p0": g, "p1": g, "p2": g, "p3": g}, {"p1": g, "p2": g}, {"p1": g, "p2": g}, {"p2": g}]
    assert ctx.encoded == ["qp1 = a", "qp2 = a", "qp1 = ab", "qp2 = ab", "qp2 = abc"]
    assert "hint_level" not in groups[0].meta and "hint_level" not in groups[3].meta
    assert groups[1].meta["hint_level"] == 2 and groups[2].meta["hint_level"] == 3
    # The group is replaced, context included: the loss conditions on the hinted prompt.
    assert groups[1].context_ids == [0] * (len("qp1 = ab") + 1) and groups[1].rewards == [0, 1, 0, 0]
    assert groups[1].n_drawn == g and groups[1].is_mixed
    assert groups[0].context_ids == ctx.context_of(prompts[0])
    m = ctx.metrics
    assert m["hint/prompts_needing_hint"] == 3 and m["hint/generate_success"] == 2 and m["hint/generate_failed"] == 1
    assert (m["hint/used_level_1"], m["hint/used_level_2"], m["hint/used_level_3"]) == (2, 2, 1)
    assert m["hint/prompts_with_hint"] == 2
    assert m["hint/acc_level_2_mean"] == pytest.approx(1 / 8) and m["hint/acc_no_hint_mean"] == pytest.approx(1 / 16)


def test_sage_with_every_group_resolved_draws_nothing_more():
    ctx = ScriptedContext(pass_rates={p.uid: 1.0 for p in make_prompts(3)})
    groups = SAGESampler(group_size=4, hints=PrefixHint(use_answer=True)).collect(make_prompts(3), ctx)
    assert len(ctx.calls) == 1 and all(g.size == 4 for g in groups) and ctx.metrics["hint/prompts_with_hint"] == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"group_size": 1}, "group_size"), ({"max_level": 0}, "max_level"), ({"template": "{problem} only"}, "template")],
)
def test_bad_sage_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"model.sampler.{field}"):
        SAGESampler(**kwargs)


def test_sage_recipe_runs_with_hints_in_training_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "sage.yaml"
    cli = build_cli(["fit", "--config", str(recipe), *SMALL, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    m = _metrics(tmp_path / "mlflow.db")
    # The embedded mix has an impossible 3-digit slice: some groups always fail and get hinted.
    assert sum(m["hint/prompts_with_hint"]) > 0 and sum(m["hint/used_level_1"]) > 0
    assert all(0 <= v <= 1 for v in m["eval/pass_at_1"])
    con = sqlite3.connect(tmp_path / "mlflow.db")
    assert (
        dict(con.execute("select key, value from params"))["model/sampler/class_path"] == "components.samplers.sage.SAGESampler"
    )
