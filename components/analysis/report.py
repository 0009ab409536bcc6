"""The report of an ablation: the comparison's rows as a markdown table (:func:`to_markdown`) and a
CSV (:func:`to_csv`), the report files beside the plots (:func:`write_report`), and a summary MLflow
run holding them (:func:`log_summary`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.analysis.comparison import ControlComparison, Row, start_mismatches
from components.analysis.cost_axes import AXES, AXIS_NAMES, Budget, metric_label
from components.analysis.curves import PLOT_METRICS, health_series, plot, plot_signal_health
from components.analysis.mlflow_io import RunResult


def _pm(ms: tuple[float, float], fmt: str = ".3f") -> str:
    m, s = ms
    if math.isnan(m):
        return "—"
    return f"{m:{fmt}}" if math.isnan(s) else f"{m:{fmt}} ± {s:{fmt}}"


def _k(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "not reached"
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def _n(x: float | None) -> str:
    """A count, or — when the run did not log it."""
    return "—" if x is None or math.isnan(x) else _k(x)


def to_markdown(rows: Sequence[Row], budget: Budget, title: str = "", notes: Sequence[str] = ()) -> str:
    """The comparison as markdown: per variant, a table for held-out pass@1 with the cost columns,
    then one for the slice (if any), then a legend."""
    lines = [f"## {title}", ""] if title else []
    lines += [f"**Warning:** {n}" for n in notes] + ([""] if notes else [])
    if rows:
        targets = ", ".join(f"{metric_label(b.metric)} {b.target:.3f}" for b in rows[0].blocks if b.target is not None)
        lines += [
            f"Budget: {budget.value:,} {AXIS_NAMES[budget.kind]} per run. Target: {targets or 'none'}. "
            f"Baseline: {next((r.recipe for r in rows if r.is_baseline), 'none')}.",
            "",
        ]
    for variant in dict.fromkeys(r.variant for r in rows):
        vrows = [r for r in rows if r.variant == variant]
        if variant:
            lines += [f"### overlays: {variant}", ""]
        for i, metric in enumerate(b.metric for b in vrows[0].blocks):
            n = metric_label(metric)
            head = [
                "recipe",
                "seeds",
                f"{n} final",
                f"{n} best",
                f"{n} AUC",
                "tokens to target",
                "rollouts to target",
                "× baseline",
            ]
            if i == 0:
                head += ["nonzero-adv token share", "open frac", "tokens drawn", "rollouts drawn", "steps", "updates",
                         "wall s", "train s"]  # fmt: skip
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in vrows:
                b = r.blocks[i]
                cells = [
                    f"**{r.recipe}**" if r.is_baseline else r.recipe,
                    str(len(r.seeds)),
                    _pm(b.final),
                    _pm(b.best),
                    _pm(b.auc),
                    "—" if b.target is None else f"{_k(b.tokens_to_target)} ({b.seeds_reached}/{len(r.seeds)})",
                    "—" if b.target is None else _k(b.rollouts_to_target),
                    "—" if b.ratio is None else f"{b.ratio:.2f}",
                ]
                if i == 0:
                    cells += [
                        _pm(r.nonzero_token_share, ".2f"),
                        _pm(r.open_frac, ".2f"),
                        _k(r.tokens),
                        _k(r.rollouts),
                        _n(r.steps),
                        _n(r.optimizer_steps),
                        _pm(r.wall_s, ".0f"),
                        _pm(r.train_s, ".0f"),
                    ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += control_table(vrows)
    lines += [
        "final: pass@1 at the budget stop; best: the highest eval; AUC: mean pass@1 over [0, budget] (area under the "
        "pass@1-vs-cost curve / budget); all mean ± std over seeds. Tokens/rollouts to target: where the mean-over-seeds "
        "curve first reaches the target (linear interpolation between evals); (k/n): seeds whose own curve reached it; "
        "× baseline: that cost over the baseline's (< 1 = cheaper). nonzero-adv token share: generated tokens that reached "
        "the loss with a non-zero advantage. open frac: mean share of groups with mixed rewards. wall s: MLflow run "
        "duration (evals included); train s: training wall seconds without evaluation (generation + scoring + update). "
        "steps: training steps = generation batches (the papers' steps); updates: optimizer updates.",
        "",
    ]
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def control_table(rows: Sequence[Row]) -> list[str]:
    """Markdown lines of the matched-control comparison (empty when no row has a control)."""
    rows = [r for r in rows if r.control is not None]
    if not rows:
        return []
    axes = [a for a in dict.fromkeys(a for r in rows for a in r.control.cost)]
    head = ["recipe", "matched control", "target (control final)"]
    head += [f"{AXIS_NAMES[a]} to target (× control)" for a in axes] + ["seeds reached", "Δ final", "Δ AUC"]
    lines = ["Against each recipe's matched control (the cost to reach the control's final mean pass@1):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.control
        cells = [r.recipe, c.control, "—" if c.target is None else f"{c.target:.3f}"]
        for a in axes:
            x = c.cost.get(a)
            cells.append("not reached" if x is None else f"{_k(x)} ({_ratio(c.ratio(a))})")
        cells += [f"{c.seeds_reached}/{c.n_seeds}", f"{c.final_delta:+.3f}", f"{c.auc_delta:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _num(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else repr(float(x))


CONTROL_COLUMNS = (
    ["control", "control_target", "control_seeds_reached", "control_final_delta", "control_auc_delta"]
    + [f"{a}_to_control_target{suf}" for a in AXES for suf in ("", "_control", "_ratio", "_ratio_low", "_ratio_high")]
    + ["control_start", "control_start_std"]
)


def _control_cells(c: ControlComparison | None) -> list[Any]:
    if c is None:
        return [""] * len(CONTROL_COLUMNS)
    cells: list[Any] = [c.control, _num(c.target), c.seeds_reached, _num(c.final_delta), _num(c.auc_delta)]
    for a in AXES:
        low, high = c.ratio_interval.get(a, (None, None))
        cells += [_num(v) for v in (c.cost.get(a), c.control_cost.get(a), c.ratio(a), low, high)]
    return [*cells, _num(c.start), _num(c.start_std)]


def to_csv(rows: Sequence[Row], budget: Budget | None = None) -> str:
    """Flat numbers (mean and std columns), one line per row; empty cells for "not reached"/undefined.
    ``budget`` adds a ``budget`` column (``kind:value``), which says at what every run was stopped.
    ``regime`` is the regime the runs were in; ``premise:<metric>:max`` / ``:mean`` summarise the
    metrics a claim's premise check reads (max over seeds and steps; mean over seeds)."""
    per_block = ["final_mean", "final_std", "best_mean", "best_std", "auc_mean", "auc_std", "target", "tokens_to_target",
                 "rollouts_to_target", "seeds_reached", "ratio_to_baseline"]  # fmt: skip
    per_row = ["nonzero_token_share", "open_frac", "wall_s", "train_s"]
    premises = list(dict.fromkeys(k for r in rows for k in r.premise))
    head = ["variant", "recipe", "baseline", "n_seeds", "seeds"]
    head += [f"{b.metric}:{c}" for b in (rows[0].blocks if rows else []) for c in per_block]
    head += [f"{c}_{s}" for c in per_row for s in ("mean", "std")] + ["tokens_mean", "rollouts_mean", "steps_mean"]
    head += CONTROL_COLUMNS + (["budget"] if budget is not None else []) + ["regime"]
    head += [f"premise:{k}:{s}" for k in premises for s in ("max", "mean")]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(head)
    for r in rows:
        cells: list[Any] = [r.variant, r.recipe, int(r.is_baseline), len(r.seeds), " ".join(r.seeds)]
        for b in r.blocks:
            cells += [_num(v) for v in (*b.final, *b.best, *b.auc, b.target, b.tokens_to_target, b.rollouts_to_target)]
            cells += [b.seeds_reached, _num(b.ratio)]
        cells += [_num(v) for c in per_row for v in getattr(r, c)] + [_num(r.tokens), _num(r.rollouts), _num(r.steps)]
        cells += _control_cells(r.control)
        if budget is not None:
            cells.append(f"{budget.kind}:{budget.value}")
        cells.append(r.regime)
        cells += [_num(v) for k in premises for v in r.premise.get(k, (None, None))]
        w.writerow(cells)
    return out.getvalue()


def comparisons_csv(rows: Sequence[Row]) -> str:
    """Every comparison of every row, one line each: the matched control's (``target_kind`` final)
    and those a claim needs besides it (another control, the control's peak); the control columns
    are named as in :func:`to_csv`."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["variant", "recipe", "target_kind", *CONTROL_COLUMNS])
    for r in rows:
        for c in [*([r.control] if r.control is not None else []), *r.comparisons]:
            w.writerow([r.variant, r.recipe, c.target_kind, *_control_cells(c)])
    return out.getvalue()


def write_report(
    client: Any, results: Sequence[RunResult], rows: Sequence[Row], budget: Budget, out: Path, *, name: str, title: str, band: str
) -> tuple[str, list[Path]]:
    """Write ``table.md``, ``table.csv``, ``comparisons.csv``, ``curves.png`` (titled ``name``, ``band`` over seeds) and,
    when any run logged ``health/`` metrics, ``health.png`` into ``out``; returns the markdown table
    and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, budget, title=title, notes=start_mismatches(results))
    (out / "table.md").write_text(md)
    (out / "table.csv").write_text(to_csv(rows, budget))
    (out / "comparisons.csv").write_text(comparisons_csv(rows))
    plot(results, rows, budget, out / "curves.png", title=name, band=band)
    files = [out / "table.md", out / "table.csv", out / "comparisons.csv", out / "curves.png"]
    # Signal health beside pass@1 (issue #11): collapse shows here before it shows in pass@1.
    series = health_series(client, results, PLOT_METRICS)
    if any(m.startswith("health/") for s in series.values() for m in s):
        files.append(plot_signal_health(series, out / "health.png", title=f"{name}: signal health (mean over seeds)"))
    return md, files


def log_summary(client: Any, experiment_id: str, ablation_id: str | None, files: Sequence[Path], params: dict[str, str]) -> str:
    """A summary run (tags ``ablation_id``, ``kind=summary``) holding the table and the plot."""
    tags = {"kind": "summary", "mlflow.runName": f"summary-{ablation_id or 'experiment'}"}
    if ablation_id:
        tags["ablation_id"] = ablation_id
    run = client.create_run(experiment_id, tags=tags)
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, str(v)[:6000])
    for f in files:
        client.log_artifact(rid, str(f))
    client.set_terminated(rid, "FINISHED")
    return rid
