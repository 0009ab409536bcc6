"""DRO: R3 on hand-computed tensors, the R3 reward and the query filters on a scripted policy."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from components.callbacks.mask_truncated import MaskTruncated, truncated_rows
from components.callbacks.query_filter import OnlineVarianceFilter, PeriodicQueryFilter
from components.data.datamodule import PromptPool
from components.engines.base import SamplingParams
from components.errors import ConfigError
from components.policy import build_char_tokenizer
from components.rewards.r3 import (
    Propagation,
    R3Reward,
    length_reward,
    pearson,
    propagation_correction,
    r3_scores,
    reflectivity_weights,
    split_at_marker,
    token_spread,
    worst_rank_score,
)
from components.samplers.base import make_group
from components.types import Prompt, Rollout


# ---- pure functions on hand tensors ----------------------------------------------------------------
def test_spread_is_population_std_over_rollouts():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -2.0, -1.5]])
    assert torch.allclose(token_spread(logp), torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(token_spread(logp[:1]), torch.zeros(3))  # a group of one has no spread


def test_linear_weights_and_r3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -2.0, -1.5]])
    r3, w, sigma = r3_scores(logp, "linear", eps=1e-4)
    s = torch.tensor([1.0, 1e-4, 0.5])  # the zero spread is floored at eps
    assert torch.allclose(w, s / s.sum())
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    expect = [(-1.0 * 1 + -2.0 * 1e-4 + -0.5 * 0.5) / 1.5001, (-3.0 * 1 + -2.0 * 1e-4 + -1.5 * 0.5) / 1.5001]
    assert torch.allclose(r3, torch.tensor(expect), atol=1e-6)


def test_eps_floor_makes_a_degenerate_group_uniform():
    logp = torch.tensor([[-1.0, -3.0], [-1.0, -3.0]])  # identical reasonings: s = 0 everywhere
    r3, w, _ = r3_scores(logp, "linear", eps=1e-4)
    assert torch.allclose(w, torch.tensor([0.5, 0.5]))
    assert torch.allclose(r3, torch.tensor([-2.0, -2.0]))
    assert torch.isfinite(reflectivity_weights(torch.zeros(4), "power", gamma=3.0)).all()


def test_aggregate_variant_is_the_unweighted_sum():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -2.0, -1.5]])
    r, w, _ = r3_scores(logp, "aggr")
    assert torch.equal(w, torch.ones(3))
    assert torch.allclose(r, torch.tensor([-3.5, -6.5]))


def test_power_and_softmax_weights():
    sigma = torch.tensor([2.0, 1.0, 0.0])
    assert torch.allclose(
        reflectivity_weights(sigma, "power", eps=1e-4, gamma=2.0), torch.tensor([4.0, 1.0, 1e-8]) / (5.0 + 1e-8)
    )
    e = torch.exp(sigma / 0.5)
    assert torch.allclose(reflectivity_weights(sigma, "softmax", tau=0.5), e / e.sum())
    with pytest.raises(ConfigError, match="model.reward.weighting"):
        reflectivity_weights(sigma, "cubic")


def test_propagation_correction_by_hand():
    # Token 0 is the only reflective one (top_frac 1/3 of 3 tokens, largest spread).
    logp = torch.log(torch.tensor([[0.9, 0.5, 0.5], [0.1, 0.5, 0.5]]))
    sigma = token_spread(logp)
    corr = propagation_correction(logp, sigma, top_frac=1 / 3, gamma=1.0)
    for i, p in enumerate((0.9, 0.1)):
        assert corr[i, 0] == 0  # no reflective token before it
        for j in (1, 2):
            P = p + (1 - p) * (1 - math.exp(-1.0 * j))
            assert math.isclose(float(corr[i, j]), math.log(P), rel_tol=1e-5)
    # The poorly-predicted reflective token costs its rollout more on the tokens after it.
    r_plain, _, _ = r3_scores(logp, "linear")
    r_prop, _, _ = r3_scores(logp, "linear", propagation=(1 / 3, 1.0))
    assert (r_plain - r_prop)[1] > (r_plain - r_prop)[0] > 0


def test_small_helpers():
    assert worst_rank_score(torch.tensor([[0, 5, 1, 9]]), rho=0.5).item() == 7.0
    assert worst_rank_score(torch.tensor([[3, 0]]), rho=0.01).item() == 3.0  # at least one token
    assert length_reward(4, 2, 0.5) == 0.5 and length_reward(2, 2, 0.5) == 1.0
    assert pearson([1, 2, 3], [0, 0, 0]) is None
    assert math.isclose(pearson([1, 2, 3], [0, 1, 1]), 0.8660254, rel_tol=1e-6)
    s = split_at_marker("a+b ## 4 ## 5", "##")
    assert (s.reasoning, s.answer, s.has_marker) == ("a+b ## 4 ", " 5", True)
    s = split_at_marker("no close", "##")
    assert (s.reasoning, s.answer, s.has_marker) == ("no close", "", False)


# ---- a scripted policy ------------------------------------------------------------------------------
TOK = build_char_tokenizer()
V = len(TOK)
SEVEN = TOK.convert_tokens_to_ids("7")


class ScriptedLM(torch.nn.Module):
    """Next-token logits from a rule: '7' is likely (logit +4) once the text so far holds a 'g'
    ("good" reasoning), unlikely (-3, last in rank) otherwise; every other token has logit 0."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.calls += 1
        g = TOK.convert_tokens_to_ids("g")
        seen = ((input_ids == g) & (attention_mask > 0)).long().cumsum(-1) > 0
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., SEVEN] = torch.where(seen, 4.0, -3.0)
        return SimpleNamespace(logits=logits)


class ScriptedEngine:
    """Returns scripted completion texts per context."""

    def __init__(self, texts: dict[tuple, list[str]]) -> None:
        self.texts = texts

    def generate(self, contexts, n_each, params):
        out = []
        for c, n in zip(contexts, n_each):
            ts = self.texts[tuple(c)]
            out.append([_rollout(ts[i % len(ts)]) for i in range(n)])
        return out


def _rollout(text: str) -> Rollout:
    ids = TOK(text, add_special_tokens=False).input_ids + [TOK.eos_token_id]
    return Rollout(ids, [-0.1] * len(ids), text, True)


def _prompt(uid: str, reference: str | None = "work #### 7", answer: str = "7") -> Prompt:
    return Prompt(uid=uid, task="t", text=uid, answer=answer, reference=reference)


class FakeHandle:
    """The StepHandle members R3 and the query filters use, over the scripted LM and engine."""

    def __init__(self, reward, prompts=(), engine=None):
        self.policy = ScriptedLM()
        self.tokenizer = TOK
        self.device = torch.device("cpu")
        self.step = 0
        self.ref_policy = None
        self.metrics: dict[str, float] = {}
        self.reward = reward  # not a handle member: what a filter's setup finds on the module
        self.engine = engine
        self.sampling = SamplingParams(max_new_tokens=16)
        self.pool = PromptPool(list(prompts), [1.0] * len(prompts))

    def context_of(self, p):
        return [TOK.bos_token_id] + TOK(p.text, add_special_tokens=False).input_ids

    def generate(self, contexts, n_each, params=None):
        return self.engine.generate(contexts, n_each, params or self.sampling)

    def train_prompts(self):
        return list(self.pool.prompts)

    def log(self, k, v):
        self.metrics[k] = float(v)

    def add_metrics(self, d):
        for k, v in d.items():
            self.metrics[k] = self.metrics.get(k, 0) + v


class FakeData:
    train_pool = None

    def verifier(self, prompt):
        return lambda out, p: float(out.strip() == p.answer)


def _r3(**kw) -> tuple[R3Reward, FakeHandle]:
    kw.setdefault("verify_on", "answer")
    reward = R3Reward(marker="####", **kw)
    module = FakeHandle(reward)
    reward.setup(module, FakeData().verifier)
    return reward, module


def test_r3_rewards_reasoning_that_makes_the_reference_likely():
    reward, module = _r3()
    rs = [_rollout("g:3+4 #### 7"), _rollout("b:3+4 #### 7"), _rollout("b:3+4 #### 9"), _rollout("g no close")]
    reward.score(_prompt("q"), rs)
    assert rs[0].reward > rs[1].reward  # only the reasoning matters, not the generated answer...
    assert rs[1].reward == pytest.approx(rs[2].reward)  # ...so two answers after the same reasoning tie
    assert rs[3].reward == pytest.approx(rs[0].reward, abs=1e-5)  # no marker: the whole text is the reasoning
    assert [r.passed for r in rs] == [True, True, False, False]  # the verifier reads the answer, for evaluation
    assert module.metrics["dro/no_marker"] == 1 and module.metrics["dro/no_marker_frac"] == 0.25
    # Forwarded tokens: every row is context + reasoning + marker + " 7" + EOS, all in one batch.
    ctx = len(module.context_of(_prompt("q")))
    rows = [ctx + len(t) + 4 + 3 for t in ("g:3+4 ", "b:3+4 ", "b:3+4 ", "g no close")]
    assert module.metrics["budget/tokens_forwarded"] == sum(rows) and module.policy.calls == 0  # frozen copy scored
    assert "' ':" in rs[0].meta["r3_token_weights"] and "'7':" in rs[0].meta["r3_token_weights"]
    assert rs[0].meta["r3_max_sigma"] > 0
    assert "dro/r3_verifier_corr" in module.metrics and -1 <= module.metrics["dro/r3_verifier_corr"] <= 1


def test_r3_weights_favour_the_reflective_token_and_aggr_differs():
    rs = [_rollout("g #### 7"), _rollout("b #### 7")]
    reward, _ = _r3()
    reward.score(_prompt("q"), rs)
    w7 = float(re.search(r"'7':([0-9.]+)", rs[0].meta["r3_token_weights"]).group(1))
    assert w7 > 0.5  # '7' is the token whose likelihood depends on the reasoning
    reward, _ = _r3(weighting="aggr")
    rs2 = [_rollout("g #### 7"), _rollout("b #### 7")]
    reward.score(_prompt("q"), rs2)
    assert rs2[0].meta["r3_token_weights"] == "' ':1.00 '7':1.00 '<eos>':1.00"
    assert rs2[0].reward < rs[0].reward and rs2[1].reward < rs[1].reward  # a sum of 3 log-probs, not a weighted mean


def test_length_penalty_and_current_and_lagged_reward_policies():
    reward, module = _r3(r3_weight=0.5, len_beta=1.0)
    rs = [_rollout("g #### 7"), _rollout("g #### 7777")]
    reward.score(_prompt("q"), rs)
    assert rs[0].reward - rs[1].reward == pytest.approx(0.5 * 3.0)  # |4 - 1| / 1, half weight
    reward, module = _r3(reward_policy="current")
    reward.score(_prompt("q"), [_rollout("g #### 7")])
    assert module.policy.calls == 1
    reward, module = _r3(reward_policy="lagged", lag_steps=2)
    first = reward.reward_model()
    module.step = 1
    assert reward.reward_model() is first and reward._rwd_step == 0
    module.step = 2
    reward.reward_model()
    assert reward._rwd_step == 2


def test_evaluation_path_reads_only_the_verifier():
    reward, module = _r3()
    rs = [_rollout("g #### 7"), _rollout("b #### 8")]
    with torch.no_grad():
        reward.score(_prompt("q"), rs)
    assert [r.reward for r in rs] == [1.0, 0.0] and "budget/tokens_forwarded" not in module.metrics


def test_bad_input_is_one_line_naming_the_field():
    reward, _ = _r3()
    with pytest.raises(ConfigError, match="reference_field") as e:
        reward.validate([_prompt("q", reference=None)])
    assert "\n" not in str(e.value)
    reward.validate([_prompt("q")])
    with pytest.raises(ConfigError, match="model.reward.target"):
        reward.validate([_prompt("q", reference="#### " + "7" * 60)])
    reward, _ = _r3()
    reward.marker = "→"  # not in the character vocabulary
    with pytest.raises(ConfigError, match="model.reward.marker"):
        reward.validate([_prompt("q")])
    with pytest.raises(ConfigError, match="model.reward.weighting"):
        R3Reward(weighting="cubic")


# ---- the filters ------------------------------------------------------------------------------------
def test_online_filter_drops_groups_without_spread():
    reward, module = _r3()
    flat = [_rollout("g #### 7"), _rollout("g #### 7")]  # identical reasonings: s = 0
    mixed = [_rollout("g #### 7"), _rollout("b #### 7")]
    reward.score(_prompt("a"), flat)
    reward.score(_prompt("b"), mixed)
    groups = [make_group(_prompt("a"), [0], flat), make_group(_prompt("b"), [0], mixed)]
    kept = OnlineVarianceFilter(min_max_sigma=0.05).on_groups(groups, module)
    assert [g.prompt.uid for g in kept] == ["b"] and module.metrics["dro/online_filter_dropped"] == 1
    with pytest.raises(ConfigError, match="R3Reward"):
        OnlineVarianceFilter().setup(SimpleNamespace(), SimpleNamespace(reward=object()), "fit")


def _filter_setup():
    mixed, hard, easy = _prompt("mixed"), _prompt("hard"), _prompt("easy")
    reward = R3Reward(marker="####")
    module = FakeHandle(reward, [mixed, hard, easy])
    texts = {
        tuple(module.context_of(mixed)): ["g1 #### 7", "b1 #### 7"],  # reasoning decides the answer
        tuple(module.context_of(hard)): ["b1 #### 7", "b2 #### 7"],  # never makes '7' likely
        tuple(module.context_of(easy)): ["g1 #### 7", "g2 #### 7"],  # always does: no spread
    }
    module.engine = ScriptedEngine(texts)
    reward.setup(module, FakeData().verifier)
    return module, [mixed, hard, easy]


def _query_filter(module, **kw) -> PeriodicQueryFilter:
    f = PeriodicQueryFilter(**kw)
    f.setup(SimpleNamespace(), SimpleNamespace(reward=module.reward), "fit")  # finds the run's R3 reward
    return f


def test_periodic_filter_two_stages_on_a_scripted_policy():
    module, prompts = _filter_setup()
    f = _query_filter(module, traces=4, rho=0.5, top_k=5, drop_frac=0.5, carry_frac=0.0)
    res = f.select(prompts, module)
    assert res["best_rank"]["hard"] == (V - 1) / 2  # worst 2 of 3 ranks: "7" is last (V - 1) without a "g", EOS top (0)
    assert res["best_rank"]["mixed"] == 1.0  # its best trace: "7" top (0), " " and EOS just behind it (1)
    assert res["stage1_dropped"] == 1 and res["stage2_dropped"] == 1 and res["kept"] == ["mixed"]
    assert abs(res["max_sigma"]["easy"]) < 1e-6 < res["max_sigma"]["mixed"]
    assert res["tokens_generated"] == 12 * 10 and res["tokens_forwarded"] > 0
    f.run_round(module, module.pool)
    pool = module.pool
    assert pool.weights.tolist() == [1.0, 0.0, 0.0]
    assert all(p.uid == "mixed" for p in pool.draw(20, torch.Generator().manual_seed(0)))
    kept_step = f.on_groups([], module)
    assert kept_step == [] and module.metrics["dro/filter_stage1_dropped"] == 1
    assert module.metrics["budget/tokens"] == 12 * 10 and module.metrics["dro/filter_tokens_forwarded"] > 0
    assert module.metrics["dro/filter_cum_tokens_generated"] == 12 * 10 and module.metrics["dro/filter_pool"] == 1
    module.metrics = {}
    f.on_groups([], module)  # a step without a round reports zeros, not the last round's counts
    assert module.metrics["dro/filter_stage1_dropped"] == 0 and module.metrics["dro/filter_cum_tokens_generated"] == 12 * 10


def test_periodic_filter_carries_forward_and_restores_state():
    module, prompts = _filter_setup()
    f = _query_filter(module, traces=2, rho=0.5, top_k=5, drop_frac=0.0, carry_frac=1.0)
    f.kept = {"hard", "easy"}  # the previous round's set
    f._orig_weights = torch.ones(3)
    f.run_round(module, module.pool)
    assert f.kept == {"mixed", "easy", "hard"}  # this round's survivors + the whole previous set carried
    g = PeriodicQueryFilter()
    g.load_state_dict(f.state_dict())
    assert g.kept == f.kept and g.rounds == 1 and g.rng.random() == f.rng.random()
    with pytest.raises(ConfigError, match="R3Reward"):
        f.setup(SimpleNamespace(), SimpleNamespace(reward=object()), "fit")


def test_mask_truncated_rows():
    eos = TOK.eos_token_id
    ids = torch.tensor([[5, eos, 0], [5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert truncated_rows(ids, mask, eos).tolist() == [False, True, False]
    batch = SimpleNamespace(input_ids=torch.cat([torch.zeros(3, 2, dtype=torch.long), ids], 1), context_width=2)
    batch.response_mask, batch.advantages = mask.clone(), torch.ones(3, 3) * mask
    module = SimpleNamespace(tokenizer=TOK, log=lambda k, v: None)
    MaskTruncated().on_advantages(batch, module)
    assert batch.response_mask[1].sum() == 0 and batch.advantages[1].sum() == 0 and batch.response_mask[0].sum() == 2


def test_propagation_option_in_the_reward_lowers_scores():
    rs = [_rollout("g #### 7"), _rollout("b #### 7")]
    plain, _ = _r3()
    plain.score(_prompt("q"), rs)
    before = [r.reward for r in rs]
    prop, _ = _r3(propagation=Propagation(top_frac=0.34, gamma=1.0))
    prop.score(_prompt("q"), rs)
    assert all(r.reward < b for r, b in zip(rs, before))


# ---- end to end through the CLI -----------------------------------------------------------------


def test_the_first_round_at_the_recipes_defaults_removes_what_it_drops():
    # recipes/dro.yaml scores max_queries of a larger pool per round; the carry-forward is a share of
    # what the round scored, so it cannot take back what the round just dropped.
    from tests.runs import ROOT, resolved

    cfg = resolved(ROOT / "recipes" / "dro.yaml")
    (args,) = [cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("PeriodicQueryFilter")]
    pool_size = cfg["data"]["train_size"]
    assert pool_size > args["max_queries"]  # the case: a round scores part of the pool
    f = PeriodicQueryFilter(**args)
    prompts = [_prompt(f"q{i}") for i in range(pool_size)]
    pool = PromptPool(prompts, [1.0] * pool_size)
    dropped: set[str] = set()

    def select(cand, handle):  # as measured at these defaults: 95 of the 256 scored dropped (26 + 69)
        dropped.update(p.uid for p in cand[:95])
        return {"kept": [p.uid for p in cand[95:]], "stage1_dropped": 26, "stage2_dropped": 69,
                "tokens_generated": 0, "tokens_forwarded": 0}  # fmt: skip

    f.select = select
    f.run_round(SimpleNamespace(step=0), pool)
    carried = dropped & f.kept
    assert len(dropped) == 95 and len(carried) == round(args["carry_frac"] * args["max_queries"])
    assert len(dropped) - len(carried) >= len(dropped) / 2  # the round's net removal
    assert len(f.kept) == pool_size - len(dropped) + len(carried)
    assert int((pool.weights == 0).sum()) == len(dropped) - len(carried)
