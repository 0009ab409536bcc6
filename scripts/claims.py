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

from components.analysis.claims import AXES, CLAIMS, CONTROLS, resolved_gap, verdict  # noqa: E402

FINAL = "eval/pass_at_1:final"
AXIS_NAMES = {"tokens": "drawn tokens", "steps": "steps", "train_s": "train s"}


def _f(x: str) -> float:
    return float(x) if x not in ("", None) else math.nan


def _ratio(row: dict[str, str], axis: str) -> float | None:
    v = _f(row.get(f"{axis}_to_control_target_ratio", ""))
    return None if math.isnan(v) else v


def _control_cost(row: dict[str, str], axis: str) -> float:
    """The control's own cost to reach its final on ``axis`` (0: its final is no better than the start)."""
    return _f(row.get(f"{axis}_to_control_target_control", ""))


def _control_gain(row: dict[str, str]) -> float | None:
    """The control's final mean pass@1 over its step-0 mean (None: a report without ``control_start``)."""
    start = _f(row.get("control_start", ""))
    return None if math.isnan(start) else _f(row["control_target"]) - start


def _cell_ratio(row: dict[str, str], axis: str) -> str:
    if _control_cost(row, axis) == 0:
        return "— (control at start)"
    r = _ratio(row, axis)
    return "never" if r is None else f"{r:.2f}×"


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
        c_mean = _f(c[f"{FINAL}_mean"]) if c else math.nan
        c_std = _f(c[f"{FINAL}_std"]) if c else math.nan
        delta = _f(r["control_final_delta"])
        reached = int(float(r["control_seeds_reached"] or 0))
        gap = resolved_gap(delta, m_std, n_m, c_std, n_c)
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
                v = verdict(cl, ratio=_ratio(r, cl.axis), seeds_reached=reached, n_seeds=n_m, delta=delta,
                            std_m=m_std, std_c=c_std, n_c=n_c, control_gain=_control_gain(r))  # fmt: skip
                claims_cells.append((f"{cl.method}: {cl.text} ({axis})", v or "see text"))
            if not claims_cells:  # its claims compare finals at another budget: the numbers, no verdict
                claims_cells = [(f"{claims[0].method}: claimed at equal {AXIS_NAMES[claims[0].at]}, not judged here", "")]
        for text, v in claims_cells:
            out.append(
                f"| {regime} | `{r['recipe']}` | {text} | `{control}` | {n_m}/{n_c} | "
                f"{m_mean:.3f} ± {m_std:.3f} vs {c_mean:.3f} ± {c_std:.3f} | {delta:+.3f} (±{gap:.3f}) | "
                f"{costs} ({reached}/{n_m}) | {v or '—'} |"
            )
    return out


HEADER = (
    "| regime | recipe | paper's claim (axis) | matched control | seeds (method/control) | final pass@1: method vs control "
    "| Δ final (resolved beyond) | × control to reach its final: drawn tokens / steps / train s (seeds reached) | verdict |\n"
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
