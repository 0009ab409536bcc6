"""DynamicSampling (DAPO), ReinforceAdaSeq and PODSSampler on scripted rewards; the selection helpers."""

from __future__ import annotations

import io
import itertools
import random

import pytest
import torch

from components.algos.advantages import get_advantage
from components.algos.selection import balanced_indices, max_variance_indices, population_std, spread, top_indices
from components.errors import ConfigError
from components.samplers.ada_seq import ReinforceAdaSeq
from components.samplers.base import FixedGroupSampler, Sampler, make_group
from components.samplers.dapo import DynamicSampling
from components.samplers.pods import PODSSampler
from tests.fakes import ScriptedHandle, make_prompts


def pvar(xs: list[float]) -> float:
    return population_std(xs) ** 2


# ---- selection helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "ties", "float"])
def test_max_variance_equals_brute_force(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(150):
        n = rng.randint(1, 9)
        if kind == "binary":
            rewards = [float(rng.random() < rng.random()) for _ in range(n)]
        elif kind == "ties":  # non-binary with many ties
            rewards = [rng.choice([-1.0, 0.0, 0.25, 0.5, 1.0]) for _ in range(n)]
        else:
            rewards = [rng.uniform(-2, 3) for _ in range(n)]
        for m in range(1, n + 1):
            idx = max_variance_indices(rewards, m)
            assert len(idx) == m and len(set(idx)) == m and idx == sorted(idx)
            best = max(pvar([rewards[i] for i in c]) for c in itertools.combinations(range(n), m))
            assert pvar([rewards[i] for i in idx]) == pytest.approx(best, abs=1e-9), (rewards, m, idx)


def test_max_variance_binary_split_and_ties_in_generation_order() -> None:
    # 3 positives, 5 negatives, m=4: the best split is 2 + 2, the earliest of each kind.
    assert max_variance_indices([0, 1, 0, 1, 0, 1, 0, 0], 4) == [0, 1, 2, 3]
    # Only one positive: 1 + 3 lowest.
    assert max_variance_indices([0, 0, 0, 0, 1, 0], 4) == [0, 1, 2, 4]
    with pytest.raises(ValueError):
        max_variance_indices([0, 1], 3)


def test_balanced_indices_order_and_top_up() -> None:
    pos = [True, False, True, True, False, False]
    assert balanced_indices(pos, 4, 2) == [0, 1, 2, 4]  # first 2 positives, first 2 negatives
    assert balanced_indices([True, True, True, False, True], 4, 2) == [0, 1, 2, 3]  # one negative: top up positives
    assert balanced_indices([False] * 6, 4, 2) == [0, 1, 2, 3]
    assert balanced_indices([True, False], 4, 2) == [0, 1]  # fewer than n exist


def test_spread_and_top() -> None:
    assert spread([0.5, 0.5, 0.5]) == 0 and spread([1.0]) == 0 and spread([0.2, 0.7]) == pytest.approx(0.5)
    assert top_indices([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]


# ---- DAPO dynamic sampling ----------------------------------------------------------------------


def test_dapo_refills_until_full_and_keeps_first_target() -> None:
    prompts = make_prompts(4)
    extra = make_prompts(4, prefix="e")
    scripts = {
        "p0": [1, 0, 0],
        "p1": [1, 1, 1],
        "p2": [0, 0, 0],
        "p3": [0, 0, 1],
        "e0": [0, 1, 1],
        "e1": [0, 0, 0],
        "e2": [1, 0, 1],
        "e3": [1, 1, 0],
    }
    ctx = ScriptedHandle(scripts=scripts, extra_prompts=extra)
    groups = DynamicSampling(group_size=3, gen_batch_size=2, max_rounds=5).collect(prompts, ctx)
    assert [g.prompt.uid for g in groups] == ["p0", "p3", "e0", "e2"]  # target = len(prompts); e3 is surplus
    assert [list(c) for c in ctx.calls] == [["p0", "p1", "p2", "p3"], ["e0", "e1"], ["e2", "e3"]]
    assert all(g.size == 3 and g.n_drawn == 3 for g in groups)
    counts = {"rounds": 3, "kept_groups": 4, "dropped_groups": 3, "surplus_groups": 1, "exhausted": 0}
    assert ctx.metrics == {f"dapo/{k}": v for k, v in counts.items()}


def test_dapo_stops_at_max_rounds_and_keeps_what_it_has() -> None:
    prompts = make_prompts(3)
    extra = make_prompts(10, prefix="e")
    scripts = {p.uid: [0.0] * 4 for p in prompts + extra}
    scripts["e1"] = [1.0, 0.0, 0.0, 0.0]
    ctx = ScriptedHandle(scripts=scripts, extra_prompts=extra)
    groups = DynamicSampling(group_size=4, gen_batch_size=3, max_rounds=3).collect(prompts, ctx)
    assert len(ctx.calls) == 3 and sum(ctx.drawn.values()) == 9 * 4
    assert [g.prompt.uid for g in groups] == ["e1"]
    assert ctx.metrics["dapo/exhausted"] == 1 and ctx.metrics["dapo/rounds"] == 3 and ctx.metrics["dapo/dropped_groups"] == 8
    # Nothing mixed at all: an empty list, no exception.
    ctx = ScriptedHandle(scripts={p.uid: [1.0] * 2 for p in prompts})
    assert DynamicSampling(group_size=2, max_rounds=1).collect(prompts, ctx) == []
    assert ctx.metrics["dapo/exhausted"] == 1


def test_dapo_gates_on_spread_not_mean() -> None:
    prompts = make_prompts(4)
    # Means of 0.5 and 0.3 lie strictly between 0 and 1, but only spread matters.
    scripts = {"p0": [0.5, 0.5, 0.5], "p1": [0.3, 0.3, 0.3], "p2": [1.0, 1.0, 0.9], "p3": [0.0, -0.5, 0.0]}
    ctx = ScriptedHandle(scripts=scripts)
    groups = DynamicSampling(group_size=3, batch_size=2, max_rounds=1).collect(prompts, ctx)
    assert [g.prompt.uid for g in groups] == ["p2", "p3"]
    # metric=passed (verl's acc): p3 differs only by a length penalty, so it is dropped; p2 passes 2 of 3.
    ctx = ScriptedHandle(scripts=scripts)
    groups = DynamicSampling(group_size=3, batch_size=2, max_rounds=1, metric="passed").collect(prompts, ctx)
    assert [g.prompt.uid for g in groups] == ["p2"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": 1}, "model.sampler.group_size"),
        ({"max_rounds": 0}, "model.sampler.max_rounds"),
        ({"batch_size": 0}, "model.sampler.batch_size"),
        ({"gen_batch_size": 0}, "model.sampler.gen_batch_size"),
        ({"metric": "acc"}, "model.sampler.metric"),
    ],
)
def test_dapo_bad_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        DynamicSampling(**kwargs)
    assert e.value.field == field and field in str(e.value)


# ---- Reinforce-Ada-Seq ----------------------------------------------------------------------------


def test_ada_balanced_exit_downsampling_and_pool_stats() -> None:
    prompts = make_prompts(4)
    scripts = {
        "p0": [1, 0, 1, 0, 0, 0, 0, 0],  # 2+ / 6-: done in round 1
        "p1": [1, 0, 0, 0, 0, 0, 0, 0] + [0, 0, 0, 0, 0, 0, 0, 1],  # second positive at the end of round 2
        "p2": [1] * 24,  # never a negative: unfinished, falls back to 4 positives
        "p3": [0, 0, 0, 0, 0, 0, 0, 1] + [0] * 16,  # one positive only: unfinished, 1 positive + 3 negatives
    }
    ctx = ScriptedHandle(scripts=scripts)
    groups = ReinforceAdaSeq(n=4, round_size=8, max_rounds=3).collect(prompts, ctx)
    assert ctx.calls == [{"p0": 8, "p1": 8, "p2": 8, "p3": 8}, {"p1": 8, "p2": 8, "p3": 8}, {"p2": 8, "p3": 8}]
    g0, g1, g2, g3 = groups
    assert g0.rewards == [1, 0, 1, 0] and g0.meta["ada_round"] == 1
    assert g1.rewards == [1, 0, 0, 1] and g1.meta["ada_round"] == 2  # generation order: idx 0, 1, 2, 15
    assert g2.rewards == [1, 1, 1, 1] and g2.meta["ada_round"] is None
    assert g3.rewards == [0, 0, 0, 1] and g3.meta["ada_round"] is None  # idx 0, 1, 2 (negatives) and 7
    for g, drawn, pos in ((g0, 8, 2), (g1, 16, 2), (g2, 24, 24), (g3, 24, 1)):
        assert (g.n_drawn, g.n_pos, g.reward_sum) == (drawn, pos, pos)
        assert g.baseline == pytest.approx(pos / drawn) and g.size == 4
    m = ctx.metrics
    assert m["ada/rounds_used"] == 3 and m["ada/finished_round1_frac"] == 0.25 and m["ada/unfinished_frac"] == 0.5
    assert m["ada/kept_samples"] == 16 and m["ada/drawn_samples"] == 72
    assert m["ada/extra_samples_vs_n"] == pytest.approx(72 / 16 - 1)
    assert m["ada/round1_reward"] == pytest.approx((2 + 1 + 8 + 1) / 32)


def test_ada_positive_exit_and_fallback() -> None:
    prompts = make_prompts(3)
    scripts = {"p0": [0, 0, 1, 1, 1, 1, 1, 1], "p1": [1] * 8, "p2": [0] * 16}
    ctx = ScriptedHandle(scripts=scripts)
    groups = ReinforceAdaSeq(n=4, round_size=8, max_rounds=2, exit="positive").collect(prompts, ctx)
    assert ctx.calls == [{"p0": 8, "p1": 8, "p2": 8}, {"p2": 8}]
    assert groups[0].rewards == [0, 0, 1, 1] and groups[0].baseline == pytest.approx(6 / 8)
    assert groups[1].rewards == [1, 1, 1, 1] and groups[1].baseline == 1.0  # all-correct: finishes, A = 0
    assert groups[2].rewards == [0, 0, 0, 0] and groups[2].baseline == 0.0 and groups[2].n_drawn == 16


def test_ada_non_binary_rewards_use_threshold_and_reward_mean() -> None:
    prompts = make_prompts(1)
    rewards = [0.8, 0.75, 0.5, 0.6, 0.1, 0.9, 0.2, 0.3]
    ctx = ScriptedHandle(scripts={"p0": list(rewards)})
    (g,) = ReinforceAdaSeq(n=4, round_size=8, max_rounds=1).collect(prompts, ctx)
    assert g.rewards == [0.8, 0.75, 0.5, 0.6]  # first two > 0.7, first two <= 0.7
    assert g.meta["ada_pos"] == 3 and g.n_pos == 0  # n_pos counts `passed` (reward >= 1 in the fake)
    assert g.baseline == pytest.approx(sum(rewards) / 8)  # mean of rewards, not 3/8
    ctx = ScriptedHandle(scripts={"p0": list(rewards)})
    (g,) = ReinforceAdaSeq(n=4, round_size=8, max_rounds=1, positive_threshold=0.85).collect(prompts, ctx)
    assert g.rewards == [0.8, 0.75, 0.5, 0.9] and g.meta["ada_round"] is None  # one positive: unfinished, top up


def test_ada_baseline_feeds_pool_mean_advantage() -> None:
    prompts = make_prompts(2)
    scripts = {"p0": [1, 0, 0, 0, 0, 0, 1, 0], "p1": [0, 1, 1, 1, 1, 1, 0, 1]}
    groups = ReinforceAdaSeq(n=4, round_size=8, max_rounds=1).collect(prompts, ScriptedHandle(scripts=scripts))
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float)
    gidx = torch.tensor([i for i, g in enumerate(groups) for _ in g.rollouts])
    adv = get_advantage("pool_mean")(rewards, gidx, baseline=torch.tensor([g.baseline for g in groups], dtype=torch.double))
    expected = [r - 2 / 8 for r in groups[0].rewards] + [r - 6 / 8 for r in groups[1].rewards]
    assert adv.tolist() == pytest.approx(expected)


def test_ada_duplicate_prompt_is_two_pools() -> None:
    p = make_prompts(1)
    ctx = ScriptedHandle(scripts={"p0": [1, 1, 0, 0, 0, 0, 0, 0] + [1] * 8})
    g1, g2 = ReinforceAdaSeq(n=4, round_size=8, max_rounds=1).collect(p + p, ctx)
    assert (g1.n_drawn, g1.n_pos, g2.n_drawn, g2.n_pos) == (8, 2, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 1}, "model.sampler.n"),
        ({"n": 4, "round_size": 3}, "model.sampler.round_size"),
        ({"max_rounds": 0}, "model.sampler.max_rounds"),
        ({"exit": "positive_focused"}, "model.sampler.exit"),
    ],
)
def test_ada_bad_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        ReinforceAdaSeq(**kwargs)
    assert e.value.field == field


# ---- PODS ---------------------------------------------------------------------------------------


def test_pods_max_variance_keeps_pool_stats() -> None:
    prompts = make_prompts(2)
    scripts = {"p0": [0, 0, 1, 0, 0, 1], "p1": [0.2, 0.9, 0.4, 0.4, 0.1, 0.9]}
    ctx = ScriptedHandle(scripts=scripts)
    g0, g1 = PODSSampler(n=6, m=4).collect(prompts, ctx)
    assert ctx.calls == [{"p0": 6, "p1": 6}]
    assert g0.rewards == [0, 0, 1, 1] and (g0.n_drawn, g0.n_pos, g0.reward_sum) == (6, 2, 2)
    assert g1.rewards == [0.2, 0.9, 0.1, 0.9] and g1.reward_sum == pytest.approx(2.9) and g1.n_drawn == 6
    assert g0.baseline is None and g1.baseline is None
    m = ctx.metrics
    assert m["pods/kept_frac"] == pytest.approx(8 / 12)
    assert m["pods/pool_reward_std"] == pytest.approx((population_std(scripts["p0"]) + population_std(scripts["p1"])) / 2)
    assert m["pods/kept_reward_std"] == pytest.approx((0.5 + population_std([0.2, 0.9, 0.1, 0.9])) / 2)


def test_pods_max_reward_and_pool_normalisation() -> None:
    ctx = ScriptedHandle(scripts={"p0": [0, 1, 0, 1, 1, 0]})
    (g,) = PODSSampler(n=6, m=3, rule="max_reward", normalize_within="pool").collect(make_prompts(1), ctx)
    assert g.rewards == [1, 1, 1] and g.baseline == pytest.approx(0.5)


def test_pods_random_rule_state_round_trip() -> None:
    prompts = make_prompts(3)
    a = PODSSampler(n=8, m=3, rule="random", seed=7)
    a.collect(prompts, ScriptedHandle(seed=1))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # what the Lightning checkpoint does, loaded back weights_only
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = PODSSampler(n=8, m=3, rule="random", seed=123)
    b.load_state_dict(state)
    ra = a.collect(prompts, ScriptedHandle(seed=2))
    rb = b.collect(prompts, ScriptedHandle(seed=2))
    assert [g.rollouts for g in ra] == [g.rollouts for g in rb]
    fresh = PODSSampler(n=8, m=3, rule="random", seed=7).collect(prompts, ScriptedHandle(seed=2))
    assert [g.rollouts for g in fresh] != [g.rollouts for g in ra]  # the RNG really moved on
    assert DynamicSampling().state_dict() == {} and ReinforceAdaSeq().state_dict() == {}


class _Uneven(Sampler):
    """An allocation-like inner sampler: uneven group sizes, a baseline of its own, some state."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self, prompts, ctx):
        self.calls += 1
        sizes = [2, 6]
        outs = ctx.sample(prompts, sizes)
        groups = [make_group(p, ctx.context_of(p), rs) for p, rs in zip(prompts, outs, strict=True)]
        for g in groups:
            g.baseline = 0.123
        return groups

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state.get("calls", 0)


def test_pods_with_inner_sampler() -> None:
    inner = _Uneven()
    pods = PODSSampler(m=4, inner=inner)
    ctx = ScriptedHandle(scripts={"p0": [1, 0], "p1": [0, 0, 0, 1, 1, 1]})
    g0, g1 = pods.collect(make_prompts(2), ctx)
    assert g0.rewards == [1, 0] and g1.rewards == [0, 0, 1, 1]  # size <= m passes whole
    assert g1.n_drawn == 6 and g0.baseline is None and g1.baseline is None
    assert ctx.metrics["pods/kept_frac"] == pytest.approx(6 / 8)
    other = PODSSampler(m=4, inner=_Uneven())
    other.load_state_dict(pods.state_dict())
    assert other.inner.calls == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 4, "m": 8}, "model.sampler.m"),
        ({"n": 8, "m": 1}, "model.sampler.m"),
        ({"rule": "max_var"}, "model.sampler.rule"),
        ({"normalize_within": "all"}, "model.sampler.normalize_within"),
        ({"m": 4, "inner": ReinforceAdaSeq()}, "model.sampler.inner"),
        ({"m": 4, "inner": PODSSampler(n=8, m=4)}, "model.sampler.inner"),
        ({"n": 8, "m": 4, "inner": FixedGroupSampler(8)}, "model.sampler.n"),
    ],
)
def test_pods_bad_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        PODSSampler(**kwargs)
    assert e.value.field == field
