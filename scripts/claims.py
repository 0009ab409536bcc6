"""Print the claims table: each method against the control its paper measured the claim against, on
the axis the paper claims, with the verdict of `components.analysis.claims` (its docstring states
the rule), a power estimate and, for a row not reproduced, what would change its verdict.

Reads the reports `scripts/ablate.py` wrote (`<out>/<ablation id>/report/table.csv`, and
`comparisons.csv` for claims judged against another control or the control's peak), so it costs
nothing to re-run:

    python scripts/claims.py fair-dense-s40 fair-filtered_ada-s40 fair-reasoning-s40

Each row names the regime it ran in: the report's `regime` column (the runs' `ablation_regime` tag,
named from the regime files: `--regime` files, else the regime file whose mix and model equal the
run's, else `custom (...)`). A report written before that column existed gives the ablation's
variant, or `dense` when it had none (those sweeps ran on the dense defaults).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.analysis.claims import (  # noqa: E402
    AXES,
    CLAIMS,
    CONTROLS,
    PARITY_MARGIN,
    Claim,
    Evidence,
    power_note,
    verdict,
    what_would_change,
)
from components.analysis.stats import Interval  # noqa: E402

FINAL = "eval/pass_at_1:final"
AXIS_NAMES = {"tokens": "drawn tokens", "steps": "steps", "train_s": "train s"}


def _f(x: str | None) -> float:
    return float(x) if x not in ("", None) else math.nan


def _ratio(row: dict[str, str], axis: str) -> Interval:
    """The cost ratio on ``axis`` with its bootstrap interval (infinite bounds where the report has none;
    a method that never reached the control's target: an infinite ratio)."""
    v = _f(row.get(f"{axis}_to_control_target_ratio", ""))
    low, high = _f(row.get(f"{axis}_to_control_target_ratio_low", "")), _f(row.get(f"{axis}_to_control_target_ratio_high", ""))
    if math.isnan(v):
        v = math.nan if _control_cost(row, axis) == 0 else math.inf
    return Interval(v, -math.inf if math.isnan(low) else low, math.inf if math.isnan(high) else high)


def _control_cost(row: dict[str, str], axis: str) -> float:
    """The control's own cost to reach its target on ``axis`` (0: its target is no better than the start)."""
    return _f(row.get(f"{axis}_to_control_target_control", ""))


def _control_start(row: dict[str, str]) -> tuple[float, float] | None:
    """The control's step-0 pass@1, mean and std over seeds (None: a report without ``control_start``;
    a report without its std gives the gain no interval, and a cost claim is then judged as is)."""
    start = _f(row.get("control_start", ""))
    return None if math.isnan(start) else (start, _f(row.get("control_start_std", "")))


def _cell_ratio(row: dict[str, str] | None, axis: str) -> str:
    if row is None:
        return "—"
    if _control_cost(row, axis) == 0:
        return "— (control at start)"
    r = _ratio(row, axis)
    if math.isinf(r.estimate):
        return "never"
    if math.isinf(r.low) and math.isinf(r.high):
        return f"{r.estimate:.2f}×"
    return f"{r.estimate:.2f}× [{r.low:.2f}, {r.high:.2f}]"


def _premise(row: dict[str, str]) -> dict[str, tuple[float, float]]:
    """The ``premise:<metric>:max`` / ``:mean`` columns of a report row, by metric."""
    out = {}
    for k, v in row.items():
        if k and k.startswith("premise:") and k.endswith(":max") and v not in ("", None):
            metric = k[len("premise:") : -len(":max")]
            out[metric] = (_f(v), _f(row.get(f"premise:{metric}:mean", "")))
    return out


def _comparisons(table: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """(variant, recipe, control, target kind) -> the comparison's columns, from ``comparisons.csv``
    beside ``table`` (empty for a report written before it existed)."""
    path = table.parent / "comparisons.csv"
    if not path.exists():
        return {}
    return {(r["variant"], r["recipe"], r["control"], r["target_kind"]): r for r in csv.DictReader(path.open())}


def rows_of(table: Path) -> list[str]:
    """Markdown rows for every recipe in one report that has a matched control, one per claim."""
    rows = list(csv.DictReader(table.open()))
    by_key = {(r["variant"], r["recipe"]): r for r in rows}
    comps = _comparisons(table)
    out = []
    for r in rows:
        matched = r.get("control")
        if not matched or r["recipe"] in CONTROLS:
            continue
        regime = r.get("regime") or r["variant"] or "dense"
        budget_kind = (r.get("budget") or "").split(":")[0] or None
        if budget_kind not in (None, "steps"):  # e.g. an equal-drawn-tokens sweep
            regime += f" (equal {AXIS_NAMES.get(budget_kind, budget_kind)}: {r['budget'].split(':')[1]})"
        claims = CLAIMS.get(r["recipe"])
        if not claims:
            out.append(_line(regime, r, by_key.get((r["variant"], matched)), matched, r, "ours (no paper claim)", None, None))
            continue
        judged = [c for c in claims if c.judged_at(budget_kind)]
        if not judged:  # its claims compare finals at another budget: the numbers, no verdict
            text = f"{claims[0].method}: claimed at equal {AXIS_NAMES[claims[0].at]}, not judged here"
            out.append(_line(regime, r, by_key.get((r["variant"], matched)), matched, r, text, None, None))
            continue
        for cl in judged:
            control = cl.control_of(matched)
            c = by_key.get((r["variant"], control))
            if control == matched and cl.target == "final":
                comp: dict[str, str] | None = r
            else:
                comp = comps.get((r["variant"], r["recipe"], control, cl.target))
            axis = (
                AXIS_NAMES[cl.axis] + (" to the control's peak" if cl.target == "peak" else "")
                if cl.kind == "cost"
                else "final pass@1"
            )
            out.append(_line(regime, r, c, control, comp, f"{cl.method}: {cl.text} ({axis})", cl, _premise(r)))
    return out


def _line(
    regime: str,
    r: dict[str, str],
    c: dict[str, str] | None,
    control: str,
    comp: dict[str, str] | None,
    text: str,
    claim: Claim | None,
    premise: dict[str, tuple[float, float]] | None,
) -> str:
    n_m, n_c = int(r["n_seeds"]), int(c["n_seeds"]) if c else 0
    m_mean, m_std = _f(r[f"{FINAL}_mean"]), _f(r[f"{FINAL}_std"])
    c_mean = _f(c[f"{FINAL}_mean"]) if c else math.nan
    c_std = _f(c[f"{FINAL}_std"]) if c else math.nan
    holds = claim.premise.holds(premise or {}) if claim is not None and claim.premise is not None else None
    ev = Evidence.of(
        method=(m_mean, m_std, n_m),
        control=(c_mean, c_std, n_c),
        ratio={a: _ratio(comp, a) for a in AXES} if comp is not None else {},
        control_start=_control_start(comp) if comp is not None else None,
        premise=holds,
    )
    reached = int(float((comp or {}).get("control_seeds_reached") or 0))
    costs = " / ".join(_cell_ratio(comp, a) for a in AXES)
    if claim is None:
        v, power, change = "—", "", ""
    elif c is None:
        v, power, change = "no control row", "", f"run `{control}` in the same sweep"
    elif claim.kind == "cost" and comp is None:
        v, power, change = "no comparison", "", "re-run `ablate.py --report-only` (writes comparisons.csv)"
    else:
        v = verdict(claim, ev) or "see text"
        power, change = power_note(claim, ev), what_would_change(claim, ev, verdict(claim, ev))
        if claim.premise is not None:
            v += {True: "", False: " (premise failed)", None: " (premise not measured)"}[holds]
    return (
        f"| {regime} | `{r['recipe']}` | {text} | `{control}` | {n_m}/{n_c} | "
        f"{m_mean:.3f} ± {m_std:.3f} vs {c_mean:.3f} ± {c_std:.3f} | {ev.final} | "
        f"{costs} ({reached}/{n_m}) | {power or '—'} | {v} | {change or '—'} |"
    )


HEADER = (
    "| regime | recipe | paper's claim (axis) | control (the paper's for this claim) | seeds (method/control) "
    "| final pass@1: method vs control | Δ final [95% CI, Welch], p "
    "| × control to reach its target [95% bootstrap]: drawn tokens / steps / train s (seeds reached) "
    "| power (80%, α 0.05) | verdict | what would change it |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ablation_ids", nargs="+", help="ablation ids whose reports to read")
    ap.add_argument("--out", default="ablations", help="the --out folder ablate.py wrote to")
    args = ap.parse_args(argv)
    lines = [HEADER]
    for aid in args.ablation_ids:
        table = Path(args.out) / aid / "report" / "table.csv"
        if not table.exists():
            raise SystemExit(f"claims: no report {table}: run `python scripts/ablate.py --report-only --ablation-id {aid}`")
        lines += rows_of(table)
    print("\n".join(lines))
    print(
        f"\nIntervals over seeds (components/analysis/stats.py). Parity: equivalent within ±{PARITY_MARGIN:.2f} "
        "(90% interval inside the margin); the verdict rule is components/analysis/claims.py's docstring. Power: "
        "the difference (or cost ratio) the row's seeds resolve at its measured spread with 80% power, and the "
        "seeds per arm the paper's effect needs. A premise that failed in every run makes a row not testable."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
