"""The claims table's verdict rule (components/analysis/claims.py) and its script, on hand numbers."""

from __future__ import annotations

import math

import pytest

from components.analysis.claims import CLAIMS, CONTROLS, Claim, resolved_gap, verdict
from components.analysis.recipe_header import recipe_header
from tests.runs import ROOT


def test_every_recipe_with_a_control_has_a_claims_entry():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    with_control = {p.stem for p in recipes if recipe_header(p, ROOT).control}
    missing = with_control - set(CLAIMS) - CONTROLS
    assert not missing, f"add these recipes to components.analysis.claims.CLAIMS (None for ours): {sorted(missing)}"
    assert not set(CLAIMS) & CONTROLS


def test_resolved_gap_is_noise_or_two_standard_errors():
    assert resolved_gap(0.1, 0.0, 3, 0.0, 3) == pytest.approx(0.02)
    # 2 * sqrt(0.03^2/3 + 0.03^2/3) = 0.04899
    assert resolved_gap(0.1, 0.03, 3, 0.03, 3) == pytest.approx(2 * math.sqrt(2 * 0.0009 / 3))


COST = Claim("X", "2x faster", "cost", "steps", 0.5)
GAIN = Claim("Y", "+1 point", "gain", delta=0.01)
PAR = Claim("Z", "no worse", "parity")


@pytest.mark.parametrize(
    "claim, ratio, reached, delta, expected",
    [
        (COST, 0.4, 3, 0.0, "reproduced"),
        (COST, 0.5, 3, 0.0, "reproduced"),
        (COST, 0.4, 2, 0.0, "direction only"),  # not every seed got there
        (COST, 0.8, 3, 0.0, "direction only"),  # cheaper, not by the claimed factor
        (COST, 1.0, 3, 0.0, "not reproduced"),
        (COST, None, 0, -0.05, "not reproduced"),  # never reached the control's final
        (GAIN, None, 3, 0.05, "reproduced"),
        (GAIN, None, 3, 0.015, "direction only"),  # above the claim, inside the noise
        (GAIN, None, 3, 0.0, "not reproduced"),
        (PAR, None, 3, -0.015, "reproduced"),
        (PAR, None, 3, -0.05, "not reproduced"),
        (PAR, None, 3, 0.05, "reproduced"),
    ],
)
def test_verdict_rule(claim, ratio, reached, delta, expected):
    got = verdict(claim, ratio=ratio, seeds_reached=reached, n_seeds=3, delta=delta, std_m=0.005, std_c=0.005, n_c=3)
    assert got == expected


def test_a_cost_claim_is_not_testable_when_the_control_did_not_learn():
    # the control's final is within noise of its start: reaching it measures the noise
    kw = dict(ratio=0.1, seeds_reached=3, n_seeds=3, delta=0.01, std_m=0.05, std_c=0.05, n_c=3)
    assert verdict(COST, control_gain=0.009, **kw) == "not testable"
    assert verdict(COST, control_gain=-0.1, **kw) == "not testable"
    assert verdict(COST, control_gain=0.07, **kw) == "reproduced"
    assert verdict(COST, control_gain=None, **kw) == "reproduced"  # unknown start: judged as is
    assert verdict(PAR, control_gain=0.0, **kw) == "reproduced"  # only cost claims read the gain


def test_a_claim_about_finals_is_judged_only_at_its_own_budget():
    assert GAIN.judged_at("steps") and GAIN.judged_at(None) and not GAIN.judged_at("tokens")
    assert COST.judged_at("tokens") and COST.judged_at("steps")  # a cost to a target reads on any budget


def test_claim_rejects_an_unknown_kind_or_axis():
    with pytest.raises(ValueError, match="Claim.kind"):
        Claim("X", "t", "faster")
    with pytest.raises(ValueError, match="Claim.axis"):
        Claim("X", "t", "cost", "hours")


