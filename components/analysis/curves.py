"""The report's plots: ``curves.png`` (held-out pass@1 against cumulative cost, the mean over seeds
with a band, :func:`plot`) and ``health.png`` (the ``health/`` metrics of
:mod:`components.step.signal_health` beside pass@1 against step, :func:`plot_signal_health`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.analysis.comparison import Row, common_grid, mean_curve
from components.analysis.cost_axes import PASS_AT_1, Budget, metric_label
from components.analysis.mlflow_io import RunResult, history

PLOT_METRICS = (
    "eval/pass_at_1",
    "health/distinct_answer_frac",
    "health/distinct_completion_frac",
    "health/lone_adv_max",
    "health/lone_mass_share",
    "health/kl_init_probe",
    "health/kl_ref",
)


def plot(
    results: Sequence[RunResult], rows: Sequence[Row], budget: Budget, path: Path, title: str = "", band: str = "minmax"
) -> Path:
    """Held-out pass@1 (and the slice, if any) against cumulative cost: the mean over seeds on a
    common grid, with a min–max (or ±std) band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [b.metric for b in rows[0].blocks] if rows else [PASS_AT_1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    grid = common_grid(results, budget.kind, budget.value)
    styles = line_styles(len(rows))  # past 10 recipes tab10 repeats its colours
    for ax, metric in zip(axes[0], metrics):
        for (color, ls), row in zip(styles, rows):
            curves = [r.curves[metric] for r in results if r.group == (row.variant, row.recipe) and metric in r.curves]
            if not curves:
                continue
            mc = mean_curve(curves, budget.kind, grid)
            lo, hi = (mc["min"], mc["max"]) if band == "minmax" else (mc["mean"] - mc["std"], mc["mean"] + mc["std"])
            label = f"{row.label} (n={len(curves)})"
            ax.plot(grid, mc["mean"], color=color, ls=ls, lw=2.4 if row.is_baseline else 1.4, label=label)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.12, lw=0)
        target = next((b.target for b in rows[0].blocks if b.metric == metric), None) if rows else None
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1)
        ax.axvline(budget.value, color="grey", ls="--", lw=1)
        ax.set_xlabel(f"cumulative generated {budget.kind}")
        ax.set_ylabel(f"held-out {metric_label(metric)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(rows) > 8 else 8, ncol=2 if len(rows) > 8 else 1, loc="lower right")
    band_name = "min–max" if band == "minmax" else "±std"
    fig.suptitle(f"{title} (mean over seeds, band: {band_name})" if title else f"mean over seeds, band: {band_name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def health_series(
    client: Any, results: Sequence[RunResult], metrics: Sequence[str]
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Each recipe's per-step metrics (``health/*``, pass@1) as the mean over its seeds at every step
    all of its seeds logged: ``{row label: {metric: [(step, mean), ...]}}``, the input of
    :func:`plot_signal_health`."""
    by_group: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        by_group[r.group].append(r)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for (variant, recipe), runs in sorted(by_group.items()):
        label = "+".join(x for x in (variant, recipe) if x)
        series: dict[str, list[tuple[float, float]]] = {}
        for metric in metrics:
            per_run = [{s: v for s, _, v in history(client, r.run_id, metric)} for r in runs]
            if not all(per_run):
                continue
            common = sorted(set.intersection(*(set(h) for h in per_run)))
            series[metric] = [(float(s), float(np.mean([h[s] for h in per_run]))) for s in common]
        out[label] = series
    return out


def line_styles(n: int) -> list[tuple[Any, str]]:
    """``n`` distinct (colour, line style) pairs for a plot's lines: tab10 up to 10; past that its
    colours repeat, so tab20's dark shades first, then its light shades dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if n <= 10:
        return [(plt.get_cmap("tab10")(i), "-") for i in range(n)]
    return [(plt.get_cmap("tab20")((2 * i) % 20 + (i // 10) % 2), "-" if i % 20 < 10 else "--") for i in range(n)]


def plot_signal_health(
    series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | Path,
    metrics: Sequence[str] = PLOT_METRICS,
    title: str = "",
) -> Path:
    """Small multiples of the health metrics (and pass@1) against step, one line per run or recipe.

    ``series[label][metric]`` is a list of ``(step, value)``; metrics no run has are left out.
    E.g. from MLflow: ``{run_label: {m: [(p.step, p.value) for p in client.get_metric_history(rid, m)]}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(s.get(m) for s in series.values())]
    if not shown:
        raise ValueError(f"plot_signal_health: none of {list(metrics)} in the series given")
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    styles = dict(zip(series, line_styles(len(series))))  # the same colour per run in every panel
    for ax, metric in zip(axes.flat, shown):
        for label, s in series.items():
            pts = sorted(s.get(metric, ()))
            if pts:
                color, ls = styles[label]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, lw=1.3, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
