"""Advantage estimators against hand-computed cases: ragged groups, size-1 groups, all-equal rewards."""

import math

import pytest
import torch

from components.algos.advantages import ADVANTAGES, AdvantageConfig, get_advantage
from components.errors import ConfigError

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
G = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # ragged: sizes 3, 2, 1, 1


def test_grpo_population_std_on_ragged_groups():
    a = get_advantage("grpo")(R, G, None, AdvantageConfig(std="population", eps=0.0))
    m0, s0 = 1 / 3, math.sqrt(2 / 9)
    expect = [(1 - m0) / s0, -m0 / s0, -m0 / s0]
    assert torch.allclose(a[:3], torch.tensor(expect), atol=1e-5)
    # all-equal group (1, 1): exactly zero, no NaN even with eps=0
    assert a[3].item() == 0 and a[4].item() == 0
    # size-1 groups: zero (there is nothing to compare with)
    assert a[5].item() == 0 and a[6].item() == 0
    assert torch.isfinite(a).all()


def test_grpo_unbiased_std_differs_by_sqrt2_at_g2():
    r = torch.tensor([1.0, 0.0])
    g = torch.tensor([0, 0])
    pop = get_advantage("grpo")(r, g, None, AdvantageConfig(std="population", eps=0.0))
    unb = get_advantage("grpo")(r, g, None, AdvantageConfig(std="unbiased", eps=0.0))
    assert torch.allclose(pop, torch.tensor([1.0, -1.0]))
    assert torch.allclose(pop / unb, torch.full((2,), math.sqrt(2)), atol=1e-5)


def test_dr_grpo_has_no_std():
    a = get_advantage("dr_grpo")(R, G)
    assert torch.allclose(a[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]), atol=1e-6)
    assert a[3:].abs().sum() == 0


def test_rloo_leave_one_out():
    a = get_advantage("rloo")(R, G)
    # group 0: r_i - mean of the other two
    assert torch.allclose(a[:3], torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5]), atol=1e-6)
    assert a[5].item() == 0


def test_pool_mean_uses_supplied_baseline_and_falls_back():
    base = torch.tensor([0.25, math.nan, 0.1, math.nan], dtype=torch.double)
    a = get_advantage("pool_mean")(R, G, baseline=base)
    assert torch.allclose(a[:3], torch.tensor([0.75, -0.25, -0.25]))
    assert torch.allclose(a[3:5], torch.zeros(2))  # NaN baseline -> kept mean (1.0)
    assert a[5].item() == pytest.approx(-0.1)
    assert a[6].item() == 0  # size-1 group, own mean
    an = get_advantage("pool_mean")(R, G, base, AdvantageConfig(normalize_std=True))
    assert an[0].item() == pytest.approx(0.75 / math.sqrt(0.25 * 0.75), rel=1e-4)


def test_supplied_baseline_applies_to_size1_groups_in_grpo():
    a = get_advantage("dr_grpo")(torch.tensor([1.0]), torch.tensor([0]), baseline=torch.tensor([0.2], dtype=torch.double))
    assert a.item() == pytest.approx(0.8)


@pytest.mark.parametrize("name", sorted(n for n, f in ADVANTAGES.items() if getattr(f, "group_relative", True)))
def test_all_equal_rewards_give_zero_and_no_nan(name):
    r = torch.ones(6)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = ADVANTAGES[name](r, g)
    assert torch.isfinite(a).all() and a.abs().max() == 0


def test_unknown_estimator_names_field():
    with pytest.raises(ConfigError, match="model.advantage.name"):
        get_advantage("nope")
