"""The claims table's verdict rule (components/analysis/claims.py) and its script, on hand numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from components.analysis.claims import CLAIMS, CONTROLS, Claim, resolved_gap, verdict
from components.analysis.cost_axes import AXES
from components.analysis.recipe_header import recipe_header

ROOT = Path(__file__).resolve().parent.parent


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


def test_script_reads_a_report_and_prints_one_row_per_claim(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("claims_script", ROOT / "scripts" / "claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = ["variant", "recipe", "n_seeds", "eval/pass_at_1:final_mean", "eval/pass_at_1:final_std", "control",
            "control_seeds_reached", "control_final_delta"]  # fmt: skip
    head += [f"{a}_to_control_target_ratio" for a in AXES]
    head += [f"{a}_to_control_target_control" for a in AXES] + ["control_target", "control_start"]
    rows = [
        ["", "grpo_dapo", "3", "0.354", "0.005", "", "", "", "", "", "", "", "", "", "", ""],
        [
            "",
            "dapo",
            "3",
            "0.386",
            "0.012",
            "grpo_dapo",
            "3",
            "0.032",
            "0.72",
            "0.35",
            "0.73",
            "9e4",
            "30",
            "40",
            "0.354",
            "0.31",
        ],
        ["", "ada_seq", "3", "0.368", "0.015", "grpo_n4", "3", "0.028", "1.59", "0.33", "", "2e4", "30", "20", "0.340", "0.31"],
        ["", "grpo_n4", "3", "0.340", "0.011", "grpo", "1", "-0.01", "", "", "", "", "", "", "", ""],  # a control: left out
        ["", "dro", "3", "0.245", "0.125", "grpo_verifier_reasoning", "3", "-0.021", "", "", "", "0", "0", "0", "0.266", "0.38"],
        ["sparse", "pods", "3", "0.29", "0.01", "grpo", "3", "0.01", "0.4", "0.1", "0.2", "9e3", "30", "20", "0.28", "0.27"],
    ]
    report = tmp_path / "abl" / "report"
    report.mkdir(parents=True)
    with (report / "table.csv").open("w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    assert mod.main(["abl", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [ln for ln in printed if ln.startswith("| dense")]
    assert len(lines) == 4  # DAPO's one claim, Ada-Seq's two, DRO's one
    # 0.1x the steps, but to a target 0.01 above the control's start: within noise, so not testable
    (pods,) = (ln for ln in printed if ln.startswith("| sparse"))
    assert "0.40× / 0.10× / 0.20×" in pods and pods.endswith("| not testable |")
    dapo = next(ln for ln in lines if "`dapo`" in ln)
    assert "0.72× / 0.35× / 0.73× (3/3)" in dapo and dapo.endswith("| reproduced |")
    v1, v3 = (ln for ln in lines if "`ada_seq`" in ln)
    assert "(v1)" in v1 and v1.endswith("| reproduced |")  # +0.028 > 2 SE (0.021) and > noise
    assert "(v3)" in v3 and "never" in v3 and v3.endswith("| not reproduced |")
    dro = next(ln for ln in lines if "`dro`" in ln)
    assert "— (control at start)" in dro and dro.endswith("| not testable |")
    # an equal-tokens sweep: Ada-Seq's v3 (cost) is judged, its v1 (a gain at equal steps) is not
    tok = tmp_path / "tok" / "report"
    tok.mkdir(parents=True)
    with (tok / "table.csv").open("w", newline="") as f:
        pos = ["", "ada_seq_pos", "3", "0.391", "0.008", "grpo_n4", "3", "0.024", "0.99", "0.42", "0.63", "6e4", "100", "50",
               "0.367", "0.31", "tokens:100000"]  # fmt: skip
        csv.writer(f).writerows([[*head, "budget"], [*rows[2], "tokens:100000"], pos])
    assert mod.main(["tok", "--out", str(tmp_path)]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| dense")]
    assert len(printed) == 2 and all("(equal drawn tokens: 100000)" in ln for ln in printed)
    assert "(v3)" in printed[0] and "(v1)" not in "".join(printed)
    assert "not judged here" in printed[1] and printed[1].endswith("| — |")  # Ada-pos: only a gain at equal steps
    with pytest.raises(SystemExit, match="no report"):
        mod.main(["missing", "--out", str(tmp_path)])
