"""SAGE self-hinting: hint sources and the escalation loop on scripted rewards, then the real loop
through the CLI on the tiny model (prefix hints in the training context, not in evaluation)."""

from __future__ import annotations

import json

import pytest

from components.errors import ConfigError
from components.rewards.verifier import Reward
from components.samplers.ada_seq import ReinforceAdaSeq
from components.samplers.dapo import DynamicSampling
from components.samplers.hints import HINT_SYSTEM, PrefixHint, SelfHint, leaks_answer, parse_hint_json, parse_hint_reply
from components.samplers.pods import PODSSampler
from components.samplers.sage import SAGESampler
from components.samplers.sage_light import SAGELight
from components.types import Group, Prompt
from tests.fakes import ScriptedHandle, make_prompts


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


FENCED_LATEX = r"""Here are the hints:
```json
{"level_1": "Use \frac{a}{b} and \sqrt{2}", "level_2": "\times then \neq", "level_3": "so {x}"}
```
Good luck! {"level_1": "not this one"}"""


@pytest.mark.parametrize(
    "reply, levels, expected, how",
    [
        ('Sure! {"level_1": "add units", "level_2": "carry the 1"} done } }', 2, {1: "add units", 2: "carry the 1"}, "json"),
        (FENCED_LATEX, 3, {1: r"Use \frac{a}{b} and \sqrt{2}", 2: r"\times then \neq", 3: "so {x}"}, "json"),
        ('{"level_1": "x", "level_2": ""}', 2, {1: "x"}, "json"),  # a missing level is never applied
        (
            "Level 1: think of units\n**Level 2:** carry\nHint 3 - add\n\nHope it helps",
            3,
            {1: "think of units", 2: "carry", 3: "add"},
            "text",
        ),
        ('{"level_1": "say "hi" now", "level_2": "b",}', 2, {1: 'say "hi" now', 2: "b"}, "text"),
        ('{"level_1": "x"', 1, {1: "x"}, "text"),
        ('{"level_2": "only two"}', 2, None, "none"),
        ("no hints here", 1, None, "none"),
    ],
)
def test_hint_reply_parsing(reply, levels, expected, how):
    assert parse_hint_reply(reply, levels) == (expected, how)
    assert parse_hint_json(reply, levels) == expected


@pytest.mark.parametrize(
    "answer, hint, leaked",
    [
        ("1", "count the 10 apples", False),
        ("1", "look at x_1 first", False),
        ("1", "compute 3-1 and 2^1", False),
        ("1", "a 1.5 ratio", False),
        ("1", "so the answer is 1.", True),
        ("579", "it is 579.0", True),
        ("579", "5790 is too big", False),
        ("-3", "x = -3", True),
        ("x^2+1", "you get x^2 + 1 here", True),
        ("x^2+1", "not x^2+10", False),
        ("\\frac{1}{2}", "half: \\frac{1}{2}", True),
    ],
)
def test_leak_filter_matches_the_answer_as_a_standalone_value(answer, hint, leaked):
    assert leaks_answer(answer, hint) is leaked


def test_self_hint_retries_unparseable_replies_and_drops_leaks():
    ctx = ScriptedHandle()
    good = json.dumps({"level_1": "think of place value", "level_2": "units first"})
    leak = json.dumps({"level_1": "the answer is 579", "level_2": "add"})
    near = json.dumps({"level_1": "5790 is too big", "level_2": "x_579"})  # not a leak of 579
    # Attempt 1: a (garbage), b (leak), c (good), e (near); attempt 2: a (good). d has no reference.
    ctx.replies = ["garbage", leak, good, near, good]
    prompts = [_p("a", reference="r"), _p("b", reference="r"), _p("c", reference="r"), _p("e", reference="r"), _p("d")]
    prompts[0].question = "bare a"
    src = SelfHint(attempts=3)
    out = src.hints(prompts, 2, ctx)
    assert out[0] == out[2] == {1: "think of place value", 2: "units first"}
    assert out[3] == {1: "5790 is too big", 2: "x_579"} and out[1] is None and out[4] is None
    assert src.stats["hint/generate_attempts"] == 5 and src.stats["hint/generate_leaked"] == 1
    assert ctx.temperatures == [0.0, 1.0]  # greedy first, then sampled retries
    system, user = ctx.conversations[0]
    assert system["content"] == HINT_SYSTEM and "tutoring assistant" in system["content"]
    assert user["content"] == "Question: \nbare a\n\nSolution:\nr\n"  # the bare question, not the prompt text
    assert ctx.conversations[1][1]["content"].startswith("Question: \nqb =")  # no question: the prompt text


def test_self_hint_skips_a_request_that_cannot_fit_the_context():
    ctx = ScriptedHandle()
    ctx.replies = [json.dumps({"level_1": "h"})]
    src = SelfHint(max_new_tokens=8)
    src.setup(context_limit=len(ctx.context_of(HINT_SYSTEM + "\nQuestion: \nqa =\n\nSolution:\nr\n")) + 16 + 8)
    out = src.hints([_p("a", reference="r"), _p("b", reference="r" * 50)], 1, ctx)
    assert out == [{1: "h"}, None] and src.stats["hint/skipped_overflow"] == 1


def test_sage_escalates_until_a_success_and_replaces_the_group():
    # p0 solves without a hint (never hinted); p1 fails plain and at level 1, succeeds at level 2;
    # p2 fails at every level (its level-3 group is kept); p3 has no reference (no hint, kept plain).
    g = 4
    ctx = ScriptedHandle(
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
    assert m["hint/truncated"] == m["hint/skipped_overflow"] == 0
    assert (m["hint/used_level_1"], m["hint/used_level_2"], m["hint/used_level_3"]) == (2, 2, 1)
    assert m["hint/prompts_with_hint"] == 2
    assert m["hint/acc_level_2_mean"] == pytest.approx(1 / 8) and m["hint/acc_no_hint_mean"] == pytest.approx(1 / 16)


def test_sage_with_every_group_resolved_draws_nothing_more():
    ctx = ScriptedHandle(pass_rates={p.uid: 1.0 for p in make_prompts(3)})
    groups = SAGESampler(group_size=4, hints=PrefixHint(use_answer=True)).collect(make_prompts(3), ctx)
    assert len(ctx.calls) == 1 and all(g.size == 4 for g in groups) and ctx.metrics["hint/prompts_with_hint"] == 0
    # Every count is logged each step, 0 when nothing happened (Lightning would repeat a stale value).
    for key in ("generate_success", "generate_attempts", "parse_fallback_text", "used_level_3", "acc_level_3_mean"):
        assert ctx.metrics[f"hint/{key}"] == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"group_size": 1}, "group_size"), ({"max_level": 0}, "max_level"), ({"template": "{problem} only"}, "template")],
)
def test_bad_sage_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"model.sampler.{field}"):
        SAGESampler(**kwargs)


# ---- hinting composed with other samplers ------------------------------------------------------


def test_sage_over_ada_seq_restarts_the_pool_in_the_hinted_context():
    # p0 is mixed in round 1 (no hint). p1's round-1 probe fails: the level-1 re-draw REPLACES it
    # inside the same draw, and round 2 draws from the same hinted context, so Ada-Seq's pool (and
    # its p~) covers the hinted draws only and every kept rollout shares the group's context.
    ctx = ScriptedHandle(scripts={"p0": [1, 0], "p1": [0, 0] + [1, 1] + [0, 1]})
    prompts = [_p("p0", reference="abcd"), _p("p1", reference="abcd")]
    inner = ReinforceAdaSeq(n=2, round_size=2, max_rounds=3)
    groups = SAGESampler(inner=inner, hints=PrefixHint(), template="{problem} {hint}").collect(prompts, ctx)
    assert ctx.calls == [{"p0": 2, "p1": 2}, {"p1": 2}, {"p1": 2}]
    assert ctx.encoded == ["qp1 = a"]  # one hinted context, reused by round 2
    hinted = ctx.context_of("qp1 = a")
    g0, g1 = groups
    assert "hint_level" not in g0.meta and g0.context_ids == ctx.context_of(prompts[0])
    assert g1.meta["hint_level"] == 1 and g1.context_ids == hinted
    assert (g1.n_drawn, g1.n_pos, g1.baseline) == (4, 3, 0.75)  # the plain probe is not in the pool
    assert all(r.text == f"p1|{len(hinted)}" for r in g1.rollouts)  # sampled from the hinted context
    assert ctx.metrics["hint/acc_no_hint_mean"] == pytest.approx(1 / 4) and ctx.metrics["hint/acc_level_1_mean"] == 1.0


def test_sage_over_dapo_hints_collapsed_groups_before_the_spread_check_and_in_refills():
    # p0 mixed (kept, no hint); p1 fails plain and at level 1, succeeds at level 2 (kept, hinted);
    # p2 is all-correct (never hinted, dropped for zero spread); the refill's e0 is hinted at level 1.
    extra = [_p("e0", reference="abcd")]
    ctx = ScriptedHandle(scripts={"p0": [1, 0], "p1": [0, 0, 0, 0, 0, 1], "p2": [1, 1], "e0": [0, 0, 1, 0]}, extra_prompts=extra)
    prompts = [_p("p0", reference="abcd"), _p("p1", reference="abcd"), _p("p2", reference="abcd")]
    inner = DynamicSampling(group_size=2, batch_size=3, gen_batch_size=1, max_rounds=2)
    groups = SAGESampler(inner=inner, hints=PrefixHint(), template="{problem} {hint}").collect(prompts, ctx)
    assert [g.prompt.uid for g in groups] == ["p0", "p1", "e0"]
    assert ctx.calls == [{"p0": 2, "p1": 2, "p2": 2}, {"p1": 2}, {"p1": 2}, {"e0": 2}, {"e0": 2}]
    assert [g.meta.get("hint_level") for g in groups] == [None, 2, 1]
    assert groups[1].context_ids == ctx.context_of("qp1 = ab") and groups[2].context_ids == ctx.context_of("qe0 = a")
    assert ctx.metrics["dapo/dropped_groups"] == 1 and ctx.metrics["hint/prompts_needing_hint"] == 2
    assert ctx.metrics["hint/prompts_with_hint"] == 2 and ctx.metrics["hint/used_level_1"] == 2


def test_a_hint_that_would_overflow_is_truncated_or_skipped_never_a_crash():
    ref = "x" * 40
    for overflow, expect in (("truncate", "truncated"), ("skip", "skipped_overflow")):
        ctx = ScriptedHandle(scripts={"p": [0, 0, 0, 0, 0, 0, 0, 0]})
        s = SAGESampler(group_size=2, hints=PrefixHint(), template="{problem} {hint}", overflow=overflow)
        s.transform.prompt_limit = len(ctx.context_of("qp = ")) + 5  # room for a few hint characters only
        [g] = s.collect([_p("p", reference=ref)], ctx)
        assert ctx.metrics[f"hint/{expect}"] >= 1
        assert len(g.context_ids) <= s.transform.prompt_limit
        if overflow == "skip":  # every level skipped: the plain probe stays, nothing re-drawn
            assert len(ctx.calls) == 1 and "hint_level" not in g.meta
        else:
            assert g.meta["hint_level"] == 3 and len(ctx.calls) == 4


class _FailFirstDraw(Reward):
    """Per prompt: the first scored draw fails; later draws alternate pass / fail."""

    def __init__(self) -> None:
        self.draws: dict[str, int] = {}

    def score(self, prompt: Prompt, rollouts: list) -> None:
        self.draws[prompt.uid] = self.draws.get(prompt.uid, 0) + 1
        for j, r in enumerate(rollouts):
            r.passed = self.draws[prompt.uid] > 1 and j % 2 == 0
            r.reward = float(r.passed)


@pytest.mark.parametrize(
    "inner",
    [lambda: ReinforceAdaSeq(n=2, round_size=2, max_rounds=2), lambda: DynamicSampling(group_size=2, max_rounds=1)],
    ids=["ada_seq", "dapo"],
)
def test_the_loss_sees_the_hinted_context_and_evaluation_never_does(inner):
    from components.algos.batch import build_batch
    from components.step.module import PolicyModule

    sampler = SAGESampler(inner=inner(), hints=PrefixHint(use_answer=True), template="{problem} {hint}")
    module = PolicyModule(sampler=sampler, reward=_FailFirstDraw(), export_dir=None)
    prompts = [Prompt(uid=f"u{i}", task="t", text=f"12{i} + 456 =", answer=str(579 + i)) for i in range(2)]
    seen: list[list[list[int]]] = []
    generate = module.engine.generate
    module.engine.generate = lambda c, n, p, **kw: (seen.append(c), generate(c, n, p, **kw))[1]

    groups = module.sampler.collect(prompts, module.handle)
    hinted = [module.encode_text(f"{p.text} {p.answer[0]}") for p in prompts]  # level 1: the answer's first digit
    assert [g.context_ids for g in groups] == hinted and all(g.is_mixed for g in groups)
    batch = build_batch(groups, module.tokenizer.pad_token_id)
    cw = batch.context_width
    rows = [batch.input_ids[i, :cw][batch.attention_mask[i, :cw].bool()].tolist() for i in range(batch.size)]
    assert rows == [hinted[int(gi)] for gi in batch.group]  # the loss's context is the hinted one

    seen.clear()
    module.evaluate(prompts)
    assert seen == [[module.encode_text(p.text) for p in prompts]]  # evaluation: the bare prompt


# ---- SAGE-LIGHT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, level, acc, expected",
    [
        ("code", 0, 0.1, 1),
        ("code", 3, 0.0, 3),
        ("code", 1, 0.2, 1),
        ("code", 1, 0.35, 1),
        ("code", 1, 0.5, 0),
        ("code", 0, 0.9, 0),
        ("paper", 0, 0.34, 1),
        ("paper", 2, 0.2, 3),
        ("paper", 3, 0.0, 3),
        ("paper", 2, 0.35, 2),
        ("paper", 2, 1.0, 2),  # raise-only: never lowered
    ],
)
def test_sage_light_rules(rule, level, acc, expected):
    t = SAGELight(rule=rule, hints=PrefixHint()).transform
    assert t.next_level("new") == 0  # first visit: no hint
    t.levels["u"], t.accs["u"] = level, acc
    assert t.next_level("u") == expected


def test_sage_light_keeps_a_level_per_prompt_across_visits_with_one_pass_and_falls_back():
    good = json.dumps({"level_1": "units first", "level_2": "carry", "level_3": "add tens"})
    ctx = ScriptedHandle(scripts={"a": [0, 0, 0, 0] + [1, 0, 1, 0] + [0, 0, 0, 0] + [0, 0, 0, 0]})
    s = SAGELight(group_size=4, rule="code", hints=SelfHint(attempts=1), template="{problem} {hint}")
    p = _p("a", reference="r")

    def step() -> Group:
        ctx.calls.clear()
        [g] = s.collect([p], ctx)
        assert len(ctx.calls) == 1  # one rollout pass per step, no probe group
        return g

    g = step()  # visit 1: no hint, accuracy 0
    assert "hint_level" not in g.meta and ctx.conversations == [] and ctx.metrics["hint/used_no_hint"] == 1
    ctx.replies = [good]
    g = step()  # visit 2: 0 <= 0.1 -> level 1; accuracy 0.5
    assert g.meta["hint_level"] == 1 and g.context_ids == ctx.context_of("qa = units first")
    assert ctx.metrics["hint/acc_level_1_mean"] == 0.5 and ctx.metrics["hint/generate_success"] == 1
    ctx.replies = []
    g = step()  # visit 3: 0.5 > 0.35 -> level 0 (no hint written); accuracy 0
    assert "hint_level" not in g.meta and len(ctx.conversations) == 1
    assert ctx.metrics["hint/generate_success"] == 0 and ctx.metrics["hint/acc_level_1_mean"] == 0
    ctx.replies = ["no json at all"]
    state = s.state_dict()
    s2 = SAGELight(group_size=4, rule="code", hints=SelfHint(attempts=1), template="{problem} {hint}")
    s2.load_state_dict(state)  # per-prompt state survives a checkpoint
    s = s2
    g = step()  # visit 4: 0 -> level 1; the new hint fails to parse: the last good one is used
    assert g.meta["hint_level"] == 1 and g.context_ids == ctx.context_of("qa = units first")
    assert ctx.metrics["hint/fallback_used"] == 1 and ctx.metrics["hint/generate_failed"] == 1
    assert s.transform.levels == {"a": 1} and s.transform.accs == {"a": 0.0}


def test_sage_light_under_ada_seq_draws_every_round_at_the_prompt_level():
    ctx = ScriptedHandle(scripts={"a": [0, 0] * 3 + [0, 0] + [1, 1]})
    s = SAGELight(
        inner=ReinforceAdaSeq(n=2, round_size=2, max_rounds=3), rule="paper", hints=PrefixHint(), template="{problem} {hint}"
    )
    p = _p("a", reference="abcd")
    [g] = s.collect([p], ctx)  # visit 1: 3 rounds, no hint, accuracy 0
    assert "hint_level" not in g.meta and g.n_drawn == 6
    [g] = s.collect([p], ctx)  # visit 2: level 1 in both rounds it takes to finish
    assert g.meta["hint_level"] == 1 and g.n_drawn == 4 and g.n_pos == 2 and ctx.encoded == ["qa = a"]
    assert all(r.text == f"a|{len(ctx.context_of('qa = a'))}" for r in g.rollouts)
    assert s.transform.accs["a"] == 0.5 and s.transform.levels["a"] == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rule": "both"}, "rule"),
        ({"alpha": 0.0}, "alpha"),
        ({"min_threshold": 0.5, "max_threshold": 0.2}, "min_threshold"),
        ({"group_size": 1}, "group_size"),
        ({"overflow": "crash"}, "overflow"),
    ],
)
def test_bad_sage_light_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"model.sampler.{field}"):
        SAGELight(hints=PrefixHint(), **kwargs)


def test_sage_over_pods_and_pods_refuses_a_hinted_down_sampler():
    ctx = ScriptedHandle(scripts={"p": [0, 0, 0, 0] + [1, 0, 1, 0]})
    s = SAGESampler(inner=PODSSampler(n=4, m=2), hints=PrefixHint(), template="{problem} {hint}")
    [g] = s.collect([_p("p", reference="abcd")], ctx)
    assert ctx.calls == [{"p": 4}, {"p": 4}] and g.size == 2 and g.is_mixed and g.n_drawn == 4
    assert g.context_ids == ctx.context_of("qp = a") and g.meta["hint_level"] == 1
    assert s.downsamples and not SAGESampler(hints=PrefixHint()).downsamples
    with pytest.raises(ConfigError, match="model.sampler.inner"):
        PODSSampler(inner=SAGELight(inner=ReinforceAdaSeq(), hints=PrefixHint()))
