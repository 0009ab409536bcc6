"""DynaMO token-level advantage modulation: the pure factor function on hand-made tensors, and the
callback on a real batch of the tiny policy (independent of micro-batching and of zero rows)."""

from __future__ import annotations

import math

import pytest
import torch

from components.algos.batch import build_batch
from components.callbacks.token_modulation import DynaMOModulation, dynamo_token_factors
from components.errors import ConfigError
from components.step.module import PolicyModule
from components.step.update import compute_advantages
from components.types import Group, Prompt, Rollout

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
ENT = torch.tensor([[0.5, 2.0, 1.0, 9.0], [0.1, 3.0, 1.5, 2.0], [0.2, 0.3, 0.0, 0.0]])
LOGP = torch.log(torch.tensor([[0.6, 0.2, 0.4, 0.5], [0.9, 0.05, 0.3, 0.2], [0.5, 0.5, 1.0, 1.0]]))


def _adv(a: list[float]) -> torch.Tensor:
    return torch.tensor(a).unsqueeze(1) * MASK


def test_compensation_is_linear_in_entropy_and_only_on_positive_advantages():
    adv = _adv([1.0, -1.0, 0.5])
    # Switch the stabiliser off to see compensation alone.
    f, info = dynamo_token_factors(adv, LOGP, ENT, MASK, mu_max=1.2, lambda_min=1.0)
    # Entropy range over the modulated (masked, non-zero-advantage) tokens: 0.1 .. 3.0; the 9.0
    # sits off the mask and must not count.
    h_max, h_min = 3.0, 0.1
    expect_row0 = [1 + 0.2 * (h_max - h) / (h_max - h_min) for h in (0.5, 2.0, 1.0)]
    assert torch.allclose(f[0, :3], torch.tensor(expect_row0))
    assert torch.equal(f[1], torch.ones(4))  # negative advantage: no compensation
    assert f[0, 3] == 1 and f[2, 2] == 1 and f[2, 3] == 1  # off the mask
    assert math.isclose(info["stab_min"], 1.0)


def test_stabiliser_damps_only_the_tokens_with_the_largest_entropy_change():
    adv = _adv([1.0, -1.0, 0.5])
    f, info = dynamo_token_factors(adv, LOGP, ENT, MASK, mu_max=1.0, lambda_min=0.6, tau=0.99, gamma=50.0)
    # Recompute |dH| by hand: xi = A (on-policy, I_clip = 1), pl = pi * (log pi + H), dH = -xi (pl - mean_seq pl).
    pl = LOGP.exp() * (LOGP + ENT)
    mean = (pl * MASK).sum(-1, keepdim=True) / MASK.sum(-1, keepdim=True)
    d = (adv * (pl - mean)).abs() * MASK
    top = torch.argmax(d)
    x = d / d.max()
    expect = 0.6 + 0.4 / (1 + torch.exp(50 * (x - 0.99)))
    assert torch.allclose(f[MASK > 0], expect[MASK > 0], atol=1e-6)
    # The max token gets ~0.75 (the reference's "smallest factor actually reached"); small x untouched.
    assert math.isclose(float(f.view(-1)[top]), 0.6 + 0.4 / (1 + math.exp(0.5)), rel_tol=1e-5)
    assert math.isclose(info["stab_min"], 0.6 + 0.4 / (1 + math.exp(0.5)), rel_tol=1e-5)
    assert ((f > 0.999) | (x > 0.85)).all()


def test_clipped_tokens_get_no_entropy_change_and_identity_settings_change_nothing():
    adv = _adv([1.0, -1.0, 0.5])
    ratio = torch.ones_like(adv)
    ratio[0] = 2.0  # positive advantage beyond 1 + clip_high: the surrogate is flat there
    f, _ = dynamo_token_factors(adv, LOGP, ENT, MASK, ratio=ratio, mu_max=1.0, clip_high=0.28)
    assert torch.allclose(f[0], torch.ones(4), atol=1e-12)
    ident, _ = dynamo_token_factors(adv, LOGP, ENT, MASK, mu_max=1.0, lambda_min=1.0)
    assert torch.equal(ident, torch.ones_like(adv))
    none, info = dynamo_token_factors(torch.zeros_like(adv), LOGP, ENT, MASK)
    assert torch.equal(none, torch.ones_like(adv)) and info["factor_mean"] == 1.0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"mu_max": 0.9}, "mu_max"), ({"lambda_min": 0.0}, "lambda_min"), ({"tau": 1.5}, "tau"), ({"gamma": float("nan")}, "gamma")],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"DynaMOModulation.{field}"):
        DynaMOModulation(**kwargs)


def _real_batch(module: PolicyModule, rewards_by_group: list[list[float]]):
    tok = module.tokenizer
    groups = []
    for gi, rewards in enumerate(rewards_by_group):
        prompt = Prompt(uid=f"u{gi}", task="t", text=f"{gi}+{gi} =", answer=str(2 * gi))
        rollouts = []
        for ri, r in enumerate(rewards):
            ids = tok.encode(f" {gi + ri}{ri}", add_special_tokens=False)[:4] + [tok.eos_token_id]
            rollouts.append(Rollout(token_ids=ids, logprobs=[-1.0] * len(ids), text="", finished=True, reward=r, passed=r > 0))
        groups.append(Group(prompt=prompt, context_ids=module.handle.context_of(prompt), rollouts=rollouts))
    batch = build_batch(groups, tok.pad_token_id)
    batch.advantages = compute_advantages(batch, module.adv_cfg)
    return batch


def test_callback_on_a_real_batch_is_independent_of_micro_batches_and_zero_rows():
    module = PolicyModule(export_dir=None)
    cb = DynaMOModulation()
    mixed = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    full = _real_batch(module, [*mixed, [1.0, 1.0, 1.0]])  # the last group is all-equal: A = 0
    only = _real_batch(module, mixed)
    before = full.advantages.clone()

    module.micro_batch_rows = 512
    cb.on_advantages(full, module.handle)
    assert module.step_metrics["dynamo/factor_mean"] != 1.0
    changed = full.advantages != before
    assert changed.any() and not changed[before == 0].any()  # zero advantages stay zero
    assert torch.equal(torch.sign(full.advantages), torch.sign(before))  # factors are positive

    module.micro_batch_rows = 2
    cb.on_advantages(only, module.handle)
    n = only.size
    assert full.advantages[:n].shape == only.advantages.shape
    assert torch.allclose(full.advantages[:n], only.advantages, atol=1e-6)




def test_the_micro_batch_form_refuses_skipped_rows_on_a_real_module():
    # where: micro_batch takes its statistics over every row, so rows must not be skipped; the guard
    # reads the real module's setting (model.skip_zero_advantage, default true).
    from types import SimpleNamespace

    cb = DynaMOModulation(where="micro_batch")
    with pytest.raises(ConfigError, match="model.skip_zero_advantage"):
        cb.setup(SimpleNamespace(), PolicyModule(export_dir=None), "fit")
    cb.setup(SimpleNamespace(), PolicyModule(export_dir=None, skip_zero_advantage=False), "fit")
    DynaMOModulation(where="batch").setup(SimpleNamespace(), PolicyModule(export_dir=None), "fit")  # batch form: fine
