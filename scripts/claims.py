"""Print the claims table: each method against its matched control, on the axis its paper claims,
with the verdict of `components.analysis.claims` (its docstring states the rule).

Reads the reports `scripts/ablate.py` wrote (`<out>/<ablation id>/report/table.csv`), so it costs
nothing to re-run:

    python scripts/claims.py fair-dense-s40 fair-filtered_ada-s40 fair-reasoning-s40

A regime is the ablation's variant (its `--regime`); runs with no regime are `dense`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.analysis.claims import AXES, CLAIMS, CONTROLS, PARITY_MARGIN, Evidence, verdict  # noqa: E402
from components.analysis.stats import Interval  # noqa: E402

FINAL = "eval/pass_at_1:final"
AXIS_NAMES = {"tokens": "drawn tokens", "steps": "steps", "train_s": "train s"}


def _f(x: str) -> float:
    return float(x) if x not in ("", None) else math.nan


def _ratio(row: dict[str, str], axis: str) -> Interval:
    """The cost ratio on ``axis`` with its bootstrap interval (infinite bounds where the report has none;
    a method that never reached the control's final: an infinite ratio)."""
    v = _f(row.get(f"{axis}_to_control_target_ratio", ""))
    low, high = _f(row.get(f"{axis}_to_control_target_ratio_low", "")), _f(row.get(f"{axis}_to_control_target_ratio_high", ""))
    if math.isnan(v):
        v = math.nan if _control_cost(row, axis) == 0 else math.inf
    return Interval(v, -math.inf if math.isnan(low) else low, math.inf if math.isnan(high) else high)


def _control_cost(row: dict[str, str], axis: str) -> float:
    """The control's own cost to reach its final on ``axis`` (0: its final is no better than the start)."""
    return _f(row.get(f"{axis}_to_control_target_control", ""))


def _control_start(row: dict[str, str]) -> tuple[float, float] | None:
    """The control's step-0 pass@1, mean and std over seeds (None: a report without ``control_start``;
    a report without its std gives the gain no interval, and a cost claim is then judged as is)."""
    start = _f(row.get("control_start", ""))
    return None if math.isnan(start) else (start, _f(row.get("control_start_std", "")))


def _cell_ratio(row: dict[str, str], axis: str) -> str:
    if _control_cost(row, axis) == 0:
        return "— (control at start)"
    r = _ratio(row, axis)
    if math.isinf(r.estimate):
        return "never"
    if math.isinf(r.low) and math.isinf(r.high):
        return f"{r.estimate:.2f}×"
    return f"{r.estimate:.2f}× [{r.low:.2f}, {r.high:.2f}]"


def rows_of(table: Path) -> list[str]:
    """Markdown rows for every recipe in one report that has a matched control."""
    rows = list(csv.DictReader(table.open()))
    by_key = {(r["variant"], r["recipe"]): r for r in rows}
    out = []
    for r in rows:
        control = r.get("control")
        if not control or r["recipe"] in CONTROLS:
            continue
        c = by_key.get((r["variant"], control))
        n_m, n_c = int(r["n_seeds"]), int(c["n_seeds"]) if c else 0
        m_mean, m_std = _f(r[f"{FINAL}_mean"]), _f(r[f"{FINAL}_std"])
        c_mean = _f(c[f"{FINAL}_mean"]) if c else _f(r.get("control_target", ""))  # the same number, in the row
        c_std = _f(c[f"{FINAL}_std"]) if c else math.nan
        reached = int(float(r["control_seeds_reached"] or 0))
        ev = Evidence.of(
            method=(m_mean, m_std, n_m),
            control=(c_mean, c_std, n_c),
            ratio={a: _ratio(r, a) for a in AXES},
            control_start=_control_start(r),
        )
        costs = " / ".join(_cell_ratio(r, a) for a in AXES)
        regime = r["variant"] or "dense"
        budget_kind = (r.get("budget") or "").split(":")[0] or None
        if budget_kind not in (None, "steps"):  # e.g. an equal-drawn-tokens sweep
            regime += f" (equal {AXIS_NAMES.get(budget_kind, budget_kind)}: {r['budget'].split(':')[1]})"
        claims = CLAIMS.get(r["recipe"])
        if not claims:
            claims_cells = [("ours (no paper claim)", "")]
        else:
            claims_cells = []
            for cl in (c for c in claims if c.judged_at(budget_kind)):
                axis = AXIS_NAMES[cl.axis] if cl.kind == "cost" else "final pass@1"
                v = verdict(cl, ev)
                claims_cells.append((f"{cl.method}: {cl.text} ({axis})", v or "see text"))
            if not claims_cells:  # its claims compare finals at another budget: the numbers, no verdict
                claims_cells = [(f"{claims[0].method}: claimed at equal {AXIS_NAMES[claims[0].at]}, not judged here", "")]
        for text, v in claims_cells:
            out.append(
                f"| {regime} | `{r['recipe']}` | {text} | `{control}` | {n_m}/{n_c} | "
                f"{m_mean:.3f} ± {m_std:.3f} vs {c_mean:.3f} ± {c_std:.3f} | {ev.final} | "
                f"{costs} ({reached}/{n_m}) | {v or '—'} |"
            )
    return out


HEADER = (
    "| regime | recipe | paper's claim (axis) | matched control | seeds (method/control) | final pass@1: method vs control "
    "| Δ final [95% CI, Welch], p | × control to reach its final [95% bootstrap]: drawn tokens / steps / train s "
    "(seeds reached) | verdict |\n"
    "|---|---|---|---|---|---|---|---|---|"
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
        "(90% interval inside the margin); the verdict rule is components/analysis/claims.py's docstring."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
