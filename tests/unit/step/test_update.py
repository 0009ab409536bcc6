"""The update path (components/step/update.py): batch build, shared-prompt forward, mini-batch schedule,
truncated importance sampling, the per-micro-batch callback hook and the cost metrics."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from components.algos.batch import build_batch, forward_logprobs
from components.algos.losses import LossConfig, truncated_is_weight
from components.callbacks.base import SignalCallback
from components.policy import load_policy
from components.step.update import OptimizerHooks, Updater, minibatch_schedule
from components.types import Group, Prompt, Rollout
from tests.fakes import ModelHandle


def _groups(seed: int = 0, n_groups: int = 5, vocab: tuple[int, int] = (4, 90)) -> list[Group]:
    """Ragged groups: contexts of different lengths (as hinted contexts are), responses of 0-7 tokens."""
    rng = random.Random(seed)
    groups = []
    for gi in range(n_groups):
        ctx = [1] + [rng.randrange(*vocab) for _ in range(rng.randint(2, 12))]
        rollouts = []
        for _ in range(rng.randint(1, 5)):
            toks = [rng.randrange(*vocab) for _ in range(rng.randint(0 if gi == 0 else 1, 7))]
            lps = [-rng.random() for _ in toks]
            rollouts.append(Rollout(toks, lps, "", True, reward=float(rng.random() > 0.5), weight=rng.random()))
        groups.append(
            Group(Prompt(f"u{gi}", "t", "x", "a"), ctx, rollouts, weight=rng.random(), baseline=None if gi % 2 else 0.25)
        )
    return groups


def _reference_batch(groups: list[Group], pad: int) -> dict[str, torch.Tensor]:
    """The per-row construction the vectorised build replaced."""
    rows = [(gi, g.context_ids, r) for gi, g in enumerate(groups) for r in g.rollouts]
    cw = max(len(c) for _, c, _ in rows)
    rw = max(max(len(r.token_ids) for _, _, r in rows), 1)
    ids = torch.full((len(rows), cw + rw), pad, dtype=torch.long)
    att = torch.zeros((len(rows), cw + rw), dtype=torch.long)
    rmask, slp = torch.zeros((len(rows), rw)), torch.zeros((len(rows), rw))
    for i, (_, c, r) in enumerate(rows):
        ids[i, cw - len(c) : cw] = torch.tensor(c)
        att[i, cw - len(c) : cw] = 1
        n = len(r.token_ids)
        ids[i, cw : cw + n] = torch.tensor(r.token_ids, dtype=torch.long)
        att[i, cw : cw + n] = 1
        rmask[i, :n] = 1
        slp[i, :n] = torch.tensor(r.logprobs)
    return {
        "input_ids": ids,
        "attention_mask": att,
        "response_mask": rmask,
        "sampling_logprobs": slp,
        "group": torch.tensor([gi for gi, _, _ in rows]),
        "group_weight": torch.tensor([groups[gi].weight for gi, _, _ in rows]),
        "row_weight": torch.tensor([r.weight for _, _, r in rows]),
        "rewards": torch.tensor([r.reward for _, _, r in rows]),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_batch_equals_the_per_row_build(seed):
    groups = _groups(seed)
    batch = build_batch(groups, pad_id=0)
    for name, want in _reference_batch(groups, 0).items():
        got = getattr(batch, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert batch.context_width == max(len(g.context_ids) for g in groups)
    assert torch.isnan(batch.baseline[1]) and batch.baseline[0] == 0.25


def test_minibatch_schedule_covers_every_row_once_per_epoch():
    torch.manual_seed(0)
    mbs = minibatch_schedule(10, ppo_epochs=2, num_minibatches=3)
    assert len(mbs) == 6 and [len(m) for m in mbs[:3]] == [4, 3, 3]
    for epoch in (mbs[:3], mbs[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert torch.equal(torch.cat(minibatch_schedule(5, 1, 1)), torch.arange(5))  # one update: rows in order
    assert len(minibatch_schedule(2, 1, 4)) == 2  # empty parts are dropped


def test_minibatch_schedule_by_group_keeps_groups_whole_and_balances_rows():
    torch.manual_seed(0)
    group = torch.repeat_interleave(torch.arange(5), torch.tensor([3, 8, 1, 4, 8]))  # ragged, by index
    mbs = minibatch_schedule(len(group), ppo_epochs=2, num_minibatches=2, group=group)
    assert len(mbs) == 4
    for epoch in (mbs[:2], mbs[2:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(len(group)))
        for mb in epoch:  # every group in a mini-batch has all its rollouts there
            for g in group[mb].unique():
                assert int((group[mb] == g).sum()) == int((group == g).sum())
    even = minibatch_schedule(128, 1, 4, torch.repeat_interleave(torch.arange(16), 8))
    assert [len(mb) for mb in even] == [32] * 4  # equal groups: equal mini-batches
    # One group larger than a share: still one update per mini-batch, none empty (FSDP's ranks must
    # run as many updates as each other).
    lopsided = torch.repeat_interleave(torch.arange(5), torch.tensor([1, 1, 20, 1, 1]))
    for _ in range(20):
        parts = minibatch_schedule(24, 1, 4, lopsided)
        assert len(parts) == 4 and all(len(p) for p in parts)
    # Group ids need not be 0..G-1 (a group left with no rollouts leaves a gap): no update is empty.
    gappy = minibatch_schedule(4, 1, 2, torch.tensor([0, 0, 0, 3]))
    assert len(gappy) == 2 and all(len(p) for p in gappy)
    # Fewer groups than mini-batches: rows are split, so the number of updates stays the same.
    assert len(minibatch_schedule(8, 1, 4, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))) == 4
    # One update per batch: rows in order, as without groups.
    assert torch.equal(torch.cat(minibatch_schedule(5, 1, 1, torch.tensor([1, 1, 0, 0, 0]))), torch.arange(5))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_policy("embedded:tiny-init")
    return model.train(), tok


def _grads(model, batch, rows_list, shared, temperature=0.7):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(batch.response_mask.shape, generator=g)
    outs = []
    for rows in rows_list:
        logp, ent, _ = forward_logprobs(model, batch, rows, temperature, shared_prompt=shared)
        m = batch.response_mask[rows]
        ((logp * weights[rows] + 0.1 * ent) * m).sum().backward()
        outs.append((logp.detach(), ent.detach()))
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("split", ["whole", "micro", "shuffled"])
def test_shared_prompt_forward_matches_the_plain_forward_and_gradient(tiny, split):
    model, tok = tiny
    groups = _groups(4, n_groups=6)
    batch = build_batch(groups, tok.pad_token_id)
    n = batch.size
    if split == "whole":
        rows_list = [torch.arange(n)]
    elif split == "micro":  # micro-batches that cut groups apart
        rows_list = list(torch.arange(n).split(3))
    else:  # a shuffled mini-batch schedule, as the updater runs it
        torch.manual_seed(1)
        rows_list = [r for mb in minibatch_schedule(n, 1, 2) for r in mb.split(4)]
    plain, g_plain = _grads(model, batch, rows_list, shared=False)
    shared, g_shared = _grads(model, batch, rows_list, shared=True)
    for (lp, ep), (ls, es), rows in zip(plain, shared, rows_list):
        m = batch.response_mask[rows]
        assert torch.allclose(lp * m, ls * m, atol=1e-5) and torch.allclose(ep * m, es * m, atol=1e-5)
    assert g_plain.keys() == g_shared.keys()
    for k in g_plain:
        assert torch.allclose(g_plain[k], g_shared[k], atol=1e-5, rtol=1e-4), k


def test_shared_prompt_forwards_fewer_tokens(tiny):
    model, tok = tiny
    batch = build_batch(_groups(5), tok.pad_token_id)
    rows = torch.arange(batch.size)
    with torch.no_grad():
        *_, plain = forward_logprobs(model, batch, rows)
        *_, shared = forward_logprobs(model, batch, rows, shared_prompt=True)
    assert shared < plain == int(batch.attention_mask.sum())


def test_truncated_is_weight_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampling = torch.tensor([[-1.0, -2.5, 1.0]])
    w = truncated_is_weight(old, sampling, cap=1.5)
    # exp(0) = 1; exp(0.5) = 1.6487 capped at 1.5; exp(-1.5) = 0.2231
    assert torch.allclose(w, torch.tensor([[1.0, 1.5, 0.22313016]]))
    old.requires_grad_(True)
    assert not truncated_is_weight(old, sampling, cap=2.0).requires_grad


class _SGD:
    """The Lightning side of an update as plain SGD: what the module hands the updater."""

    def __init__(self, policy, lr: float = 1.0) -> None:
        self.opt = torch.optim.SGD(policy.parameters(), lr=lr)
        self.updates = 0

    def hooks(self) -> OptimizerHooks:
        return OptimizerHooks(zero_grad=self.opt.zero_grad, backward=lambda loss: loss.backward(), step=self._step)

    def _step(self, last: bool) -> None:
        self.opt.step()
        self.updates += 1


class _Recorder(SignalCallback):
    def __init__(self, scale: float = 1.0) -> None:
        self.scale, self.ratios = scale, []

    def on_micro_batch(self, logp, old_logp, entropy, advantages, mask, handle):
        assert not logp.requires_grad and logp.shape == old_logp.shape == entropy.shape == mask.shape
        self.ratios.append(float(((logp - old_logp).exp() * mask).sum() / mask.sum()))
        return advantages * self.scale


def _run_update(tiny, callbacks, num_minibatches=1, tis_cap=None):
    model, tok = tiny
    policy = copy.deepcopy(model)
    groups = _groups(7, n_groups=4)
    for g in groups:  # every group mixed: every row reaches the loss
        for i, r in enumerate(g.rollouts):
            r.reward = float(i % 2)
    batch = build_batch(groups, tok.pad_token_id)
    batch.advantages = (batch.rewards - 0.5).unsqueeze(1) * batch.response_mask
    lc = LossConfig(tis_cap=tis_cap)
    upd = Updater(lc, 1, num_minibatches, 3, True)
    fake = _SGD(policy, lr=0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    torch.manual_seed(0)
    metrics = upd.run(batch, ModelHandle(policy, tok), fake.hooks(), callbacks)
    delta = {k: policy.state_dict()[k] - before[k] for k in before}
    return metrics, delta, fake


def test_on_micro_batch_sees_the_real_ratio_and_its_advantages_reach_the_loss(tiny):
    rec = _Recorder()
    metrics, delta, fake = _run_update(tiny, [rec], num_minibatches=2)
    assert fake.updates == 2 and metrics["budget/optimizer_steps"] == 2
    assert rec.ratios and any(abs(r - 1) > 1e-6 for r in rec.ratios)  # after the first update pi != pi_old
    # One update (SGD): the step is linear in the advantages, so doubling them doubles it.
    _, d1, _ = _run_update(tiny, [_Recorder(1.0)])
    _, d2, _ = _run_update(tiny, [_Recorder(2.0)])
    assert any(v.abs().max() > 0 for v in d1.values())
    assert all(torch.allclose(2 * d1[k], d2[k], atol=1e-6) for k in d1)


def test_tis_cap_one_scales_the_update_and_the_gap_is_reported(tiny):
    metrics, d_off, _ = _run_update(tiny, [])
    assert (
        metrics["rollout/logprob_gap_max"] > 0 and 0 < metrics["rollout/logprob_gap_mean"] <= metrics["rollout/logprob_gap_max"]
    )
    on, d_on, _ = _run_update(tiny, [], tis_cap=1e-3)
    assert on["rollout/tis_capped_frac"] > 0.9 and on["rollout/tis_weight_mean"] == pytest.approx(1e-3)
    assert sum(v.abs().sum() for v in d_on.values()) < 0.01 * sum(v.abs().sum() for v in d_off.values())


def test_old_logprobs_from_sampling_equal_the_recomputed_update_when_the_engine_is_exact(tiny):
    """With sampling log-probs that are the policy's own (as the HF engine's are), taking them as the
    old log-probs gives the update the no-grad pass gives, without the pass."""
    model, tok = tiny
    groups = _groups(7, n_groups=4)
    for g in groups:
        for i, r in enumerate(g.rollouts):
            r.reward = float(i % 2)
    exact = build_batch(groups, tok.pad_token_id)
    with torch.no_grad():
        exact.sampling_logprobs = forward_logprobs(model, exact, torch.arange(exact.size))[0]
    deltas, forwarded = [], []
    for from_sampling in (False, True):
        policy = copy.deepcopy(model)
        batch = copy.deepcopy(exact)
        batch.advantages = (batch.rewards - 0.5).unsqueeze(1) * batch.response_mask
        handle = ModelHandle(policy, tok)
        calls = []
        logprobs = handle.logprobs
        handle.logprobs = lambda b, rows=None, m=None, grad=False: (calls.append(grad), logprobs(b, rows, m, grad))[1]
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        torch.manual_seed(0)
        metrics = Updater(LossConfig(), 1, 4, 3, True, from_sampling).run(batch, handle, _SGD(policy, lr=0.1).hooks())
        deltas.append({k: policy.state_dict()[k] - before[k] for k in before})
        forwarded.append(calls)
        assert metrics["rollout/logprob_gap_max"] < 1e-5
    assert False in forwarded[0] and False not in forwarded[1]  # no no-grad pass with sampling
    assert all(torch.allclose(deltas[0][k], deltas[1][k], atol=1e-6) for k in deltas[0])
