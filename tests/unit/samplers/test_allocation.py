"""Allocation samplers: integer allocation math, Reinforce-Ada-Est, DynaMO, GVM."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from components.errors import ConfigError
from components.samplers.ada_est import AdaEstSampler
from components.samplers.allocation import largest_remainder, pearson, water_fill
from components.samplers.dynamo import DynaMOSampler
from components.samplers.gvm import GVMSampler, embedding_grad_norms, gvm_ratio
from components.types import Rollout
from tests.fakes import ModelHandle, ScriptedHandle, make_prompts

# ---- largest remainder --------------------------------------------------------------------------


def _targets(shares, budget, floors, caps):
    """Independent reference for the real targets: bisection on the water level λ of
    x_i = clamp(floor_i + λ s_i, floor_i, cap_i) (uniform s when all free shares are 0)."""
    n = len(shares)

    def fill(lam, s):
        return [min(caps[i], floors[i] + lam * s[i]) for i in range(n)]

    s = list(shares)
    lo, hi = 0.0, 1.0
    while sum(fill(hi, s)) < budget - 1e-9:
        hi *= 2
        if hi > 1e12:  # positive shares cannot absorb the budget: the rest goes evenly to zero-share prompts
            full = fill(hi, s)
            zero = [i for i in range(n) if s[i] == 0 and caps[i] > floors[i]]
            rest = budget - sum(full)
            sub = _targets(
                [1.0] * len(zero), rest + sum(floors[i] for i in zero), [floors[i] for i in zero], [caps[i] for i in zero]
            )
            for j, i in enumerate(zero):
                full[i] = sub[j]
            return full
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(fill(mid, s)) < budget:
            lo = mid
        else:
            hi = mid
    return fill(hi, s)


def test_largest_remainder_random_cases():
    for seed in range(500):
        _check_largest_remainder_case(seed)


def _check_largest_remainder_case(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    shares = [rng.choice([0.0, rng.random(), rng.random() * 100, 1e-7]) for _ in range(n)]
    floors = [rng.randint(0, 3) for _ in range(n)]
    caps = [f + rng.randint(0, 10) if rng.random() < 0.7 else None for f in floors]
    hi = sum(caps) if all(c is not None for c in caps) else sum(floors) + 50
    budget = rng.randint(sum(floors), max(sum(floors), hi))
    out = largest_remainder(shares, budget, floors, caps)
    assert sum(out) == budget, seed
    for v, f, c in zip(out, floors, caps, strict=True):
        assert f <= v and (c is None or v <= c), (seed, out, floors, caps)
    # Rounding moves each prompt by less than one rollout from its real target.
    x = _targets(shares, budget, floors, [budget if c is None else c for c in caps])
    assert all(abs(v - t) < 1 + 1e-6 for v, t in zip(out, x, strict=True)), (seed, out, x)


def test_largest_remainder_hand_case_and_budget_not_divisible():
    # 10 over 3 equal shares: 4/3/3, ties to the lower index.
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    # floors first, then the rest (7) by shares 1:2:4 -> exactly 1, 2, 4.
    assert largest_remainder([1, 2, 4], 10, floors=[1, 1, 1]) == [2, 3, 5]
    # a cap moves the excess to the others
    assert largest_remainder([10, 1, 1], 12, caps=[4, None, None]) == [4, 4, 4]
    # zero shares get only the floor unless everybody else is capped
    assert largest_remainder([0, 1], 5, floors=[1, 1]) == [1, 4]
    assert largest_remainder([0, 1], 5, floors=[1, 1], caps=[None, 2]) == [3, 2]


@pytest.mark.parametrize(
    "budget,floors,caps",
    [(2, [1, 1, 1], None), (10, [0, 0], [3, 4]), (-1, None, None)],
)
def test_impossible_budget_raises_config_error_naming_the_field(budget, floors, caps):
    with pytest.raises(ConfigError) as e:
        largest_remainder([1.0] * (len(floors) if floors else 2), budget, floors, caps, field="model.sampler.budget")
    assert e.value.field == "model.sampler.budget"
    assert "impossible budget" in str(e.value) and "model.sampler.budget" in str(e.value)


def test_impossible_budget_from_sampler_config():
    with pytest.raises(ConfigError) as e:
        AdaEstSampler(rollouts_per_prompt=2, n_min=3)
    assert e.value.field == "model.sampler.rollouts_per_prompt" and "impossible budget" in str(e.value)
    with pytest.raises(ConfigError) as e:
        DynaMOSampler(rollouts_per_prompt=8, n_min=2, n_max=6)
    assert e.value.field == "model.sampler.rollouts_per_prompt"
    # an absolute budget is checked against the step's prompts
    s = AdaEstSampler(budget=5, n_min=2)
    with pytest.raises(ConfigError) as e:
        s.collect(make_prompts(4), ScriptedHandle())
    assert e.value.field == "model.sampler.budget"
    s = DynaMOSampler(budget=100, n_min=1, n_max=8)
    with pytest.raises(ConfigError) as e:
        s.collect(make_prompts(4), ScriptedHandle())
    assert e.value.field == "model.sampler.budget"


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (AdaEstSampler, {"weight": "log"}, "model.sampler.weight"),
        (AdaEstSampler, {"decay": 1.5}, "model.sampler.decay"),
        (AdaEstSampler, {"prior_beta": 0}, "model.sampler.prior_beta"),
        (AdaEstSampler, {"baseline": "mean"}, "model.sampler.baseline"),
        (AdaEstSampler, {"pilot": 9}, "model.sampler.pilot"),
        (AdaEstSampler, {"n_max": 0}, "model.sampler.n_max"),
        (DynaMOSampler, {"n_max": None}, "model.sampler.n_max"),
        (DynaMOSampler, {"mastery_threshold": 0}, "model.sampler.mastery_threshold"),
        (DynaMOSampler, {"positive": "r>0.5"}, "model.sampler.positive"),
        (GVMSampler, {"refresh_every": 0}, "model.sampler.refresh_every"),
        (GVMSampler, {"beta": 0.5}, "model.sampler.beta"),
        (GVMSampler, {"grad_samples": 0}, "model.sampler.grad_samples"),
        (GVMSampler, {"rollouts_per_prompt": 0}, "model.sampler.rollouts_per_prompt"),
    ],
)
def test_constructor_validation(cls, kwargs, field):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert e.value.field == field


# ---- water filling (DynaMO) -----------------------------------------------------------------------


def test_water_fill_hand_cases():
    # warm-up: everybody exploring -> n_min each, then round-robin -> uniform
    assert water_fill([0, 0, 0, 0], 32, 4, 16, sample_counts=[0, 0, 0, 0]) == [8, 8, 8, 8]
    # room 16 split 0.25 : 0.01 : 0.01 : 0.23 -> 8, .32, .32, 7.36 -> largest remainder gives idx 3 the last unit
    assert water_fill([0.25, 0.01, 0.01, 0.23], 32, 4, 16, sample_counts=[8] * 4) == [12, 4, 4, 12]
    # a capped prompt's excess goes to the others (10 over three equal priorities: 4/3/3)
    assert water_fill([1, 0.01, 0.01, 0.01], 32, 4, 10, sample_counts=[8] * 4) == [10, 8, 7, 7]
    # exploration (idx 0: 4 - 0 samples) + water-fill among eligible (priority > 1e-8) only
    assert water_fill([0, 0.2, 0.0, 0.1], 16, 2, 10, sample_counts=[0, 10, 10, 10]) == [4, 6, 2, 4]
    # eligible prompts saturated at n_max -> round-robin the rest in index order
    assert water_fill([1, 0, 0, 0], 16, 2, 5, sample_counts=[10] * 4) == [5, 4, 4, 3]
    # exploration that does not fit is scaled down
    assert water_fill([0, 0, 1], 4, 0, 8, sample_counts=[0, 0, 10]) == [2, 2, 0]


def test_water_fill_random_sums_and_bounds():
    for seed in range(500):
        rng = random.Random(seed)
        b = rng.randint(1, 20)
        n_min = rng.randint(0, 4)
        n_max = max(1, n_min + rng.randint(0, 12))
        budget = rng.randint(b * n_min, b * n_max)
        prios = [rng.choice([-1.0, 0.0, 0.01, rng.random()]) for _ in range(b)]
        counts = [rng.randint(0, 8) for _ in range(b)]
        init = rng.randint(0, 6)
        out = water_fill(prios, budget, n_min, n_max, sample_counts=counts, initial_budget=init)
        assert sum(out) == budget and all(n_min <= v <= n_max for v in out), (seed, out)
        # exploring prompts get at least their exploration budget when it fits
        explore = [max(n_min, min(n_max, init - c)) if c < init else n_min for c in counts]
        if sum(explore) <= budget:
            assert all(v >= e for v, e in zip(out, explore, strict=True)), (seed, out, explore)


def test_water_fill_impossible_budget():
    with pytest.raises(ConfigError) as e:
        water_fill([1, 1], 40, 4, 16, field="model.sampler.budget")
    assert e.value.field == "model.sampler.budget"
    with pytest.raises(ConfigError):
        water_fill([1, 1], 7, 4, 16)


# ---- DynaMO ---------------------------------------------------------------------------------------


def test_dynamo_priority_hand_values():
    s = DynaMOSampler()
    assert s.priority(2, 1) == -1.0  # exploring
    assert s.priority(8, 4) == pytest.approx(4 * 4 / (8 * 7) + 0.5e-6)
    assert s.priority(10, 8) == pytest.approx(8 * 2 / 90 + 0.2e-6)
    assert s.priority(8, 8) == 0.01  # mastered
    assert s.priority(10, 9) == 0.01  # acc 0.9 >= 0.85: mastered
    assert s.priority(8, 0) == 0.01  # never solved: min priority


def _uid_scripts(prompts, n=64):
    """Rewards that name their prompt: prompt i draws i*100 + j (j = 0, 1, ...), and 0.0 for prompt 0's even draws."""
    return {p.uid: [float(i * 100 + j) if (i or j % 2) else 0.0 for j in range(n)] for i, p in enumerate(prompts)}


def test_dynamo_rows_stay_aligned_with_uneven_allocation():
    prompts = make_prompts(5)
    s = DynaMOSampler(rollouts_per_prompt=8, n_min=2, n_max=16)
    # p0 mixed (high variance), p1 mastered, p2 never solved, p3 a little solved, p4 unseen (exploring)
    s.load_state_dict({"counts": {"p0": [8, 4], "p1": [8, 8], "p2": [8, 0], "p3": [10, 1]}})
    ctx = ScriptedHandle(scripts=_uid_scripts(prompts))
    groups = s.collect(prompts, ctx)
    assert len(ctx.calls) == 1  # one generation call with per-prompt counts
    n = [ctx.calls[0].get(p.uid, 0) for p in prompts]
    assert sum(n) == 40 and len(set(n)) > 2, n
    assert n[0] == max(n)  # the mixed prompt gets the most
    for i, g in enumerate(groups):
        assert g.prompt.uid == prompts[i].uid and g.size == n[i] == g.meta["alloc_n"]
        # every reward came from this prompt's own script, in order
        assert g.rewards == [float(i * 100 + j) if (i or j % 2) else 0.0 for j in range(n[i])]
        assert all(r.text.startswith(f"{g.prompt.uid}|") for r in g.rollouts)
        assert g.n_drawn == n[i]
    # history: k counts reward > 0
    assert s.counts["p0"] == [8 + n[0], 4 + n[0] // 2]
    assert s.counts["p4"] == [n[4], n[4]]
    for k in ("n_min", "n_max", "n_mean", "n_std", "zero_budget_frac", "n_phat_corr", "pass_rate_top", "pass_rate_bottom"):
        assert f"dynamo/{k}" in ctx.metrics
    assert ctx.metrics["dynamo/exploring_frac"] == pytest.approx(0.2)
    assert ctx.metrics["dynamo/mastered_frac"] == pytest.approx(0.2)


def test_dynamo_allocation_moves_with_pass_rates():
    prompts = make_prompts(8)
    rates = {p.uid: r for p, r in zip(prompts, [0.0, 0.0, 0.5, 0.5, 0.95, 0.95, 0.3, 0.7], strict=True)}
    s = DynaMOSampler(rollouts_per_prompt=8, n_min=4, n_max=16, positive="passed")
    ctx = ScriptedHandle(pass_rates=rates, seed=1)
    s.collect(prompts, ctx)  # warm-up: uniform
    assert list(ctx.calls[0].values()) == [8] * 8
    for step in range(1, 15):
        ctx.step = step
        s.collect(prompts, ctx)
    last = ctx.calls[-1]
    mixed = sum(last[u] for u in ("p2", "p3")) / 2
    assert mixed > sum(last[u] for u in ("p0", "p1", "p4", "p5")) / 4
    assert ctx.metrics["dynamo/pass_rate_top"] != ctx.metrics["dynamo/pass_rate_bottom"]


# ---- Reinforce-Ada-Est -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["inverse", "sqrt_var", "uniform"])
def test_est_allocation_proportional_to_weight(weight):
    prompts = make_prompts(4)
    s = AdaEstSampler(rollouts_per_prompt=10, weight=weight)
    state = {"p0": [0.0, 0.0], "p1": [8.0, 8.0], "p2": [20.0, 10.0], "p3": [4.0, 0.0]}
    s.load_state_dict({"counts": state})
    phat = [(1 + k) / (17 + n) for n, k in state.values()]
    assert phat[0] == pytest.approx(1 / 17) and phat[1] == pytest.approx(9 / 25)
    w = {"inverse": [1 / p for p in phat], "sqrt_var": [math.sqrt(p * (1 - p)) for p in phat], "uniform": [1.0] * 4}[weight]
    ctx = ScriptedHandle(pass_rates={p.uid: 0.5 for p in prompts})
    groups = s.collect(prompts, ctx)
    n = [ctx.calls[0][p.uid] for p in prompts]
    assert sum(n) == 40
    for ni, wi in zip(n, w, strict=True):
        assert abs((ni - 1) - 36 * wi / sum(w)) < 1  # floor 1 + largest-remainder share of the rest
    assert [g.size for g in groups] == n
    if weight == "inverse":
        assert ctx.metrics["ada/n_phat_corr"] < -0.5


def test_est_ema_update_and_pool_mean_baseline():
    (p,) = make_prompts(1)
    s = AdaEstSampler(rollouts_per_prompt=4)
    s.load_state_dict({"counts": {"p0": [10.0, 5.0]}})
    ctx = ScriptedHandle(scripts={"p0": [1.0, 0.0, 1.0, 1.0]})
    (g,) = s.collect([p], ctx)
    assert s.counts["p0"] == pytest.approx([0.9 * 10 + 4, 0.9 * 5 + 3])
    assert s.estimate("p0") == pytest.approx((1 + 7.5) / (17 + 13))
    assert g.baseline == pytest.approx(0.75) and g.n_drawn == 4 and g.n_pos == 3
    # unseen prompt: counts start at 0
    (q,) = make_prompts(1, prefix="q")
    s.collect([q], ScriptedHandle(scripts={"q0": [0.0, 0.0, 0.0, 1.0]}))
    assert s.counts["q0"] == [4.0, 1.0]
    assert s.estimate("zzz") == pytest.approx(1 / 17)


def test_prompt_twice_in_a_batch_is_one_visit():
    p = make_prompts(1)[0]
    s = AdaEstSampler(rollouts_per_prompt=2, pilot=1)
    s.load_state_dict({"counts": {"p0": [10.0, 5.0]}})
    groups = s.collect([p, p], ScriptedHandle(scripts={"p0": [1.0, 0.0, 1.0, 1.0]}))
    assert [g.rewards for g in groups] == [[1.0, 1.0], [0.0, 1.0]]  # pilot row first, then the allocated one
    assert s.counts["p0"] == pytest.approx([0.9 * 10 + 4, 0.9 * 5 + 3])  # decayed once, both entries counted
    d = DynaMOSampler(rollouts_per_prompt=4, n_min=1, n_max=8)
    d.collect([p, p], ScriptedHandle(scripts={"p0": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}))
    assert d.counts["p0"] == [8, 3]
    g = GVMSampler(rollouts_per_prompt=2)
    g.collect([p, p], ScriptedHandle(scripts={"p0": [1.0, 0.0, 1.0, 1.0]}))
    assert g.counts["p0"] == [4.0, 3.0]


def test_est_clip_and_baseline_none():
    s = AdaEstSampler(prior_alpha=1e-9, prior_beta=1e-9, clip=1e-3, baseline="none")
    assert s.pass_rate(10, 0) == pytest.approx(1e-3)
    assert s.pass_rate(10, 10) == pytest.approx(1 - 1e-3)
    (g,) = s.collect(make_prompts(1), ScriptedHandle(pass_rates={"p0": 1.0}))
    assert g.baseline is None


def test_est_pilot_counts_once_and_is_kept():
    prompts = make_prompts(3)
    s = AdaEstSampler(rollouts_per_prompt=8, pilot=2)
    s.load_state_dict({"counts": {"p0": [10.0, 10.0]}})
    ctx = ScriptedHandle(pass_rates={"p0": 1.0, "p1": 0.0, "p2": 0.0})
    groups = s.collect(prompts, ctx)
    assert len(ctx.calls) == 2 and ctx.calls[0] == {"p0": 2, "p1": 2, "p2": 2}
    assert sum(ctx.calls[1].values()) == 24 - 6
    assert ctx.calls[1].get("p0", 0) < ctx.calls[1]["p1"]  # the easy prompt gets the least
    assert [g.size for g in groups] == [2 + ctx.calls[1].get(p.uid, 0) for p in prompts]
    n0 = groups[0].size
    assert s.counts["p0"] == pytest.approx([0.9 * 10 + n0, 0.9 * 10 + n0])  # decayed once, pilot included


# ---- GVM ----------------------------------------------------------------------------------------------


def test_gvm_ratio_hand_values():
    assert gvm_ratio(2.0, 0.25) == pytest.approx(2 / math.sqrt(0.25 + 1e-3 / 0.25))
    assert gvm_ratio(1.0, 1.0) == pytest.approx(1 / math.sqrt(1.001))
    assert gvm_ratio(1.0, 0.0) == 0.0 and gvm_ratio(0.0, 0.5) == 0.0
    assert gvm_ratio(3.0, 0.5, alpha=0.1, beta=1.0) == pytest.approx(3 / math.sqrt(0.6))
    # beta = 2: the denominator is smallest at p = sqrt(alpha)
    assert gvm_ratio(1.0, math.sqrt(1e-3)) > max(gvm_ratio(1.0, 0.01), gvm_ratio(1.0, 0.1))


def test_gvm_allocation_follows_ratio_and_drops_unsolved():
    prompts = make_prompts(5)
    state = {
        "counts": {"p0": [8.0, 2.0], "p1": [8.0, 6.0], "p2": [8.0, 0.0], "p3": [4.0, 1.0]},
        "grads": {"p0": [2.0, 0], "p1": [1.0, 0], "p3": [4.0, 0]},
    }
    s = GVMSampler(rollouts_per_prompt=8, n_min=0, zero_budget_unsolved=True)
    s.load_state_dict(state)
    ctx = ScriptedHandle()
    groups = s.collect(prompts, ctx)
    r = [gvm_ratio(2.0, 0.25), gvm_ratio(1.0, 0.75), 0.0, gvm_ratio(4.0, 0.25)]
    r.append(sum(r) / 4)  # unseen p4: the mean ratio of the known prompts
    n = [ctx.calls[0].get(p.uid, 0) for p in prompts]
    assert sum(n) == 40 and n[2] == 0
    for ni, ri in zip(n, r, strict=True):
        assert abs(ni - 40 * ri / sum(r)) < 1
    assert [g.prompt.uid for g in groups] == ["p0", "p1", "p3", "p4"]  # zero budget -> no group
    assert ctx.metrics["gvm/zero_budget_frac"] == pytest.approx(0.2)
    # default: unsolved prompts keep the floor
    s2 = GVMSampler(rollouts_per_prompt=8, n_min=1)
    s2.load_state_dict(state)
    ctx2 = ScriptedHandle()
    s2.collect(prompts, ctx2)
    assert ctx2.calls[0]["p2"] == 1


@pytest.fixture(scope="module")
def tiny_module():
    from components.step.module import PolicyModule

    torch.manual_seed(0)
    return PolicyModule(model="embedded:tiny-init", export_dir=None)


def test_gvm_grad_norm_matches_manual_on_tiny_model(tiny_module):
    m = tiny_module
    (p,) = make_prompts(1)
    ctx_ids = m.tokenizer.encode("12+34=", add_special_tokens=False)
    rs = [
        Rollout(
            token_ids=m.tokenizer.encode("46", add_special_tokens=False) + [m.tokenizer.eos_token_id],
            logprobs=[0.0] * 3,
            text="46",
            finished=True,
            reward=1.0,
            passed=True,
        ),
        Rollout(token_ids=m.tokenizer.encode("4", add_special_tokens=False), logprobs=[0.0], text="4", finished=False),
    ]
    weight = m.policy.get_input_embeddings().weight
    pending = torch.full_like(weight, 0.5)
    weight.grad = pending.clone()  # pretend the optimizer has pending gradients
    norms = embedding_grad_norms(ModelHandle(m.policy, m.tokenizer), p, ctx_ids, rs)
    assert torch.equal(weight.grad, pending)  # untouched
    assert all(q.grad is None for name, q in m.policy.named_parameters() if q is not weight)
    weight.grad = None
    # manual: -sum log pi(y | x) over the response, gradient w.r.t. the embedding matrix
    for r, got in zip(rs, norms, strict=True):
        ids = torch.tensor([ctx_ids + r.token_ids])
        logits = m.policy(input_ids=ids).logits[0, len(ctx_ids) - 1 : -1]
        nll = -torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r.token_ids)[:, None]).sum()
        (g,) = torch.autograd.grad(nll, weight)
        assert got == pytest.approx(float(g.norm()), rel=1e-4)
        assert got > 0
    assert weight.grad is None and m.policy.training


def test_gvm_collect_computes_and_caches_g_with_real_policy(tiny_module):
    prompts = make_prompts(4)
    s = GVMSampler(rollouts_per_prompt=4, pilot=2, n_min=2, refresh_every=5, grad_samples=2)
    ctx = ScriptedHandle(pass_rates={"p0": 1.0, "p1": 0.0, "p2": 1.0, "p3": 0.5}, seed=3)
    # scripted rewards, the real policy for G (through the handle's log-probs)
    real = ModelHandle(tiny_module.policy, tiny_module.tokenizer)
    ctx.policy, ctx.tokenizer, ctx.logprobs = real.policy, real.tokenizer, real.logprobs
    s.collect(prompts, ctx)
    assert set(s.grads) >= {"p0", "p2"} and "p1" not in s.grads
    assert all(g > 0 and step == 0 for g, step in s.grads.values())
    assert ctx.metrics["gvm/grad_refreshed"] == len(s.grads)
    # not stale yet: cached values are reused
    before = dict(s.grads)
    ctx.step = 3
    s.collect(prompts, ctx)
    assert ctx.metrics["gvm/grad_refreshed"] == len(set(s.grads) - set(before))
    assert all(s.grads[u] == before[u] for u in before)
    ctx.step = 5  # stale now: recomputed
    s.collect(prompts, ctx)
    assert s.grads["p0"][1] == 5


# ---- all samplers ---------------------------------------------------------------------------------


SAMPLERS = [
    lambda: AdaEstSampler(rollouts_per_prompt=6, n_max=20, pilot=1),
    lambda: AdaEstSampler(rollouts_per_prompt=6, weight="sqrt_var"),
    lambda: DynaMOSampler(rollouts_per_prompt=6, n_min=2, n_max=14),
    lambda: GVMSampler(rollouts_per_prompt=6, n_min=1, pilot=2),
]


@pytest.mark.parametrize("make", SAMPLERS)
def test_state_round_trip_and_same_next_allocation(make):
    prompts = make_prompts(7)
    rates = {p.uid: r for p, r in zip(prompts, [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], strict=True)}
    s = make()
    ctx = ScriptedHandle(pass_rates=rates, seed=0)
    for step in range(4):
        ctx.step = step
        s.collect(prompts, ctx)
    if isinstance(s, GVMSampler):  # no module here: give G values to round-trip
        s.grads = {"p1": [1.5, 2], "p3": [0.25, 3]}
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    t = make()
    t.load_state_dict(loaded)
    assert t.state_dict() == s.state_dict()
    c1, c2 = ScriptedHandle(pass_rates=rates, seed=9), ScriptedHandle(pass_rates=rates, seed=9)
    c1.step = c2.step = 4
    s.collect(prompts, c1)
    t.collect(prompts, c2)
    assert c1.calls == c2.calls and t.state_dict() == s.state_dict()


@pytest.mark.parametrize("make", SAMPLERS)
def test_every_sampler_keeps_rows_aligned_and_spends_budget(make):
    prompts = make_prompts(6)
    s = make()
    scripts = _uid_scripts(prompts, n=200)
    ctx = ScriptedHandle(scripts=scripts)
    for step in range(3):
        ctx.step = step
        before = {u: len(v) for u, v in ctx.scripts.items()}
        groups = s.collect(prompts, ctx)
        assert sum(g.size for g in groups) == 36
        for g in groups:
            i = int(g.prompt.uid[1:])
            used = 200 - before[g.prompt.uid]
            assert g.rewards == scripts[g.prompt.uid][used : used + g.size]
            assert all(r.text.startswith(f"{g.prompt.uid}|") for r in g.rollouts)
            assert all(rw == 0.0 or i * 100 <= rw < i * 100 + 100 for rw in g.rewards)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1], [1, 2]) is None and pearson([1], [1]) is None


# ---- DynaMO as the authors run it: priorities refreshed per epoch --------------------------------------


def test_dynamo_epoch_refresh_uses_the_snapshot_of_the_last_epoch():
    prompts = make_prompts(4)
    rates = {p.uid: r for p, r in zip(prompts, [0.0, 0.5, 1.0, 0.5], strict=True)}
    s = DynaMOSampler(rollouts_per_prompt=16, n_min=8, n_max=24, refresh="epoch", epoch_prompts=8, positive="passed")
    ctx = ScriptedHandle(pass_rates=rates, seed=3)
    s.collect(prompts, ctx)  # epoch 0, step 1: no snapshot -> all exploring, uniform
    assert list(ctx.calls[-1].values()) == [16] * 4
    s.collect(prompts, ctx)  # epoch 0, step 2: still the empty snapshot although history exists
    assert list(ctx.calls[-1].values()) == [16] * 4 and s.counts and s.epochs == 1
    assert s.ranked == s.counts  # 8 prompts drawn: the epoch ends, the snapshot is taken
    snap = {u: list(v) for u, v in s.ranked.items()}
    s.collect(prompts, ctx)  # epoch 1: the allocation follows the snapshot's priorities
    n = ctx.calls[-1]
    assert sum(n.values()) == 64 and all(8 <= x <= 24 for x in n.values())
    assert n["p1"] > n["p0"] and n["p3"] > n["p2"]  # mixed prompts above never-solved / mastered
    assert s.ranked == snap and s.counts != snap  # history moves on, the snapshot waits for the epoch end
    step_mode = DynaMOSampler(rollouts_per_prompt=16, n_min=8, n_max=24, positive="passed")
    c2 = ScriptedHandle(pass_rates=rates, seed=3)
    step_mode.collect(prompts, c2)
    step_mode.collect(prompts, c2)
    assert list(c2.calls[-1].values()) != [16] * 4  # per-step refresh reacts inside the epoch
    # the epoch state round-trips
    t = DynaMOSampler(rollouts_per_prompt=16, n_min=8, n_max=24, refresh="epoch", epoch_prompts=8, positive="passed")
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() and t.drawn_in_epoch == 4


def test_dynamo_epoch_size_defaults_to_the_pool_and_config_errors():
    pool = make_prompts(6)
    s = DynaMOSampler(rollouts_per_prompt=8, refresh="epoch")
    ctx = ScriptedHandle(pass_rates={p.uid: 0.5 for p in pool})
    ctx.pool = pool
    s.collect(pool[:3], ctx)
    assert s.epochs == 0
    s.collect(pool[:3], ctx)
    assert s.epochs == 1  # 6 prompts drawn = |pool|
    with pytest.raises(ConfigError, match="model.sampler.epoch_prompts"):
        DynaMOSampler(rollouts_per_prompt=8, refresh="epoch").collect(pool[:2], ScriptedHandle())
    with pytest.raises(ConfigError, match="model.sampler.refresh"):
        DynaMOSampler(refresh="batch")
    with pytest.raises(ConfigError, match="model.sampler.epoch_prompts"):
        DynaMOSampler(refresh="epoch", epoch_prompts=0)
