"""The claims table's verdict rule (components/analysis/claims.py) and its script, on hand numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from components.analysis.claims import CLAIMS, CONTROLS, Claim, Evidence, verdict
from components.analysis.recipe_header import recipe_header
from components.analysis.stats import Interval, eval_noise, paired, ratio_interval, welch
from tests.runs import ROOT


def test_every_recipe_with_a_control_has_a_claims_entry():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    with_control = {p.stem for p in recipes if recipe_header(p, ROOT).control}
    missing = with_control - set(CLAIMS) - CONTROLS
    assert not missing, f"add these recipes to components.analysis.claims.CLAIMS (None for ours): {sorted(missing)}"
    assert not set(CLAIMS) & CONTROLS


COST = Claim("X", "2x faster", "cost", "steps", 0.5)
GAIN = Claim("Y", "+1 point", "gain", delta=0.01)
PAR = Claim("Z", "no worse", "parity")
INF = math.inf


def _ev(d_mean, m_std=0.005, c_std=0.005, n=3, ratio=None, start=None):
    """Evidence for a method whose final is ``0.40 + d_mean`` against a control at 0.40."""
    ratio = {} if ratio is None else {"steps": Interval(*ratio)}
    return Evidence.of(method=(0.40 + d_mean, m_std, n), control=(0.40, c_std, n), ratio=ratio, control_start=start)


@pytest.mark.parametrize(
    "claim, ev, expected",
    [
        (COST, _ev(0.0, ratio=(0.4, 0.3, 0.6)), "reproduced"),
        (COST, _ev(0.0, ratio=(0.5, 0.3, 0.9)), "reproduced"),
        (COST, _ev(0.0, ratio=(0.4, 0.2, 1.3)), "direction only"),  # the interval reaches 1
        (COST, _ev(0.0, ratio=(0.8, 0.7, 0.9)), "direction only"),  # cheaper, not by the claimed factor
        (COST, _ev(0.0, ratio=(1.0, 0.8, 1.2)), "not reproduced"),
        (COST, _ev(-0.05, ratio=(INF, INF, INF)), "not reproduced"),  # never reached the control's final
        (COST, _ev(0.0, ratio=(0.4, -INF, INF)), "direction only"),  # an old report: no interval
        (GAIN, _ev(0.05), "reproduced"),
        (GAIN, _ev(0.005), "direction only"),  # resolved, below the paper's +1 point
        (GAIN, _ev(0.0), "not reproduced"),
        (PAR, _ev(-0.015), "reproduced"),  # 90% interval inside +-3 points
        (PAR, _ev(-0.05), "not reproduced"),  # 95% interval below -3 points
        (PAR, _ev(-0.02, m_std=0.03), "inconclusive"),  # too noisy to tell
        (PAR, _ev(0.05), "inconclusive"),  # better by more than the margin: not "equal"
    ],
)
def test_verdict_rule(claim, ev, expected):
    assert verdict(claim, ev) == expected


# The cases the 2-standard-error rule got wrong (issue 19), at 3 seeds per arm. The stds are chosen so
# that t matches the issue's; Welch's critical value at these degrees of freedom is 2.8-4.3, not 2.
@pytest.mark.parametrize(
    "case, d, m_std, c_std, t_ratio",
    [
        ("dense Ada-Seq", 0.043, 0.026, 0.007, 2.8),
        ("dense Ada-pos", 0.044, 0.025, 0.008, 2.9),
        ("filtered Ada-Seq", 0.025, 0.016, 0.013, 2.0),
    ],
)
def test_three_seed_gains_once_reproduced_now_read_direction_only(case, d, m_std, c_std, t_ratio):
    se = math.sqrt((m_std**2 + c_std**2) / 3)
    assert d / se == pytest.approx(t_ratio, abs=0.15)  # the t
    assert d > max(0.02, 2 * se)  # the old rule: a resolved gain above the claim, "reproduced"
    ev = _ev(d, m_std, c_std)
    assert 0.05 < ev.final.p < 0.15 and ev.final.low < 0 < ev.final.high
    assert verdict(Claim("Ada", "+1.2 points", "gain", delta=0.012), ev) == "direction only"


def test_a_noisy_parity_row_is_inconclusive_not_reproduced():
    # dro_nofilter: -5.2 points with 3 seeds, stds of about 6 and 2 points: the old rule read
    # "reproduced" (no resolved loss); with a stated margin it is neither equal nor resolved worse.
    old_gap = max(0.02, 2 * math.sqrt((0.063**2 + 0.02**2) / 3))
    assert -0.052 > -old_gap  # not a resolved loss under the old rule
    assert verdict(PAR, _ev(-0.052, m_std=0.063, c_std=0.02)) == "inconclusive"


def test_welch_matches_a_hand_computation():
    iv = welch(0.5, 0.1, 4, 0.4, 0.2, 5)
    v1, v2 = 0.01 / 4, 0.04 / 5
    df = (v1 + v2) ** 2 / (v1**2 / 3 + v2**2 / 4)
    assert iv.df == pytest.approx(df)
    assert iv.high - iv.estimate == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(v1 + v2))
    assert iv.p == pytest.approx(2 * stats.t.sf(0.1 / math.sqrt(v1 + v2), df))
    assert math.isinf(welch(0.5, 0.1, 1, 0.4, 0.2, 5).high)  # one seed: no interval


def test_paired_ratio_and_noise():
    iv = paired([0.01, 0.03, 0.02])
    assert iv.estimate == pytest.approx(0.02) and iv.df == 2 and iv.low < 0 < iv.high
    r = ratio_interval([100, 120, 90], [200, 210, 190])
    assert r.estimate == pytest.approx(310 / 600) and r.low < r.estimate < r.high < 1
    never = ratio_interval([100, INF, 90], [200, 210, 190])
    assert math.isinf(never.estimate) and math.isinf(never.high)
    assert eval_noise(0.4, 64, 2) == pytest.approx(math.sqrt(0.24 / 128))
    assert eval_noise(0.4, 64, 2) / eval_noise(0.4, 300, 4) == pytest.approx(math.sqrt(1200 / 128))


def test_a_cost_claim_is_not_testable_when_the_control_did_not_learn():
    # the control's final is within noise of its start: reaching it measures the noise
    good = (0.1, 0.05, 0.2)
    assert verdict(COST, _ev(0.0, ratio=good, start=(0.395, 0.01))) == "not testable"
    assert verdict(COST, _ev(0.0, ratio=good, start=(0.45, 0.01))) == "not testable"  # it fell
    assert verdict(COST, _ev(0.0, ratio=good, start=(0.30, 0.01))) == "reproduced"
    assert verdict(COST, _ev(0.0, ratio=good)) == "reproduced"  # unknown start: judged as is
    assert verdict(PAR, _ev(0.0, start=(0.40, 0.01))) == "reproduced"  # only cost claims read the gain


def test_a_claim_about_finals_is_judged_only_at_its_own_budget():
    assert GAIN.judged_at("steps") and GAIN.judged_at(None) and not GAIN.judged_at("tokens")
    assert COST.judged_at("tokens") and COST.judged_at("steps")  # a cost to a target reads on any budget


def test_claim_rejects_an_unknown_kind_or_axis():
    with pytest.raises(ValueError, match="Claim.kind"):
        Claim("X", "t", "faster")
    with pytest.raises(ValueError, match="Claim.axis"):
        Claim("X", "t", "cost", "hours")




def test_the_cost_ratio_bootstrap_resamples_seeds_and_recomputes_the_target():
    from components.analysis.comparison import ratio_bootstrap
    from components.analysis.mlflow_io import Curve

    x = np.array([0.0, 10.0, 20.0, 30.0, 40.0])

    def curve(ys):
        return Curve(x, x, np.array(ys, dtype=float), steps=x)

    control = [curve([0.30, 0.33, 0.36, 0.38, 0.40]), curve([0.30, 0.32, 0.35, 0.37, 0.41]), curve([0.30, 0.34, 0.36, 0.39, 0.39])]
    fast = [curve([0.30, 0.41, 0.42, 0.43, 0.44]), curve([0.30, 0.40, 0.43, 0.43, 0.45]), curve([0.30, 0.42, 0.41, 0.44, 0.44])]
    low, high = ratio_bootstrap(fast, control, "steps", x, resamples=300)
    assert 0 < low <= high < 0.5  # reaches the control's final in about a quarter of its steps, on every resample
    never = [curve([0.30, 0.30, 0.31, 0.31, 0.32])] * 3
    assert ratio_bootstrap(never, control, "steps", x, resamples=50) == (math.inf, math.inf)
    assert ratio_bootstrap(fast, control, "steps", x, resamples=50, seed=1) == ratio_bootstrap(fast, control, "steps", x, resamples=50, seed=1)
