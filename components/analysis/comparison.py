"""The comparison of an ablation's runs, as pure functions over their eval curves: the curve
arithmetic (:func:`auc`, :func:`crossing` / :func:`x_at_target`, :func:`mean_curve`), and the rows of
the table (:func:`summarize`): per recipe, final / best / AUC pass@1 over seeds, the cost to a
target, and the comparison with its matched control on every cost axis.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.analysis.cost_axes import AXES, PASS_AT_1, Budget
from components.analysis.mlflow_io import Curve, RunResult
from components.analysis.stats import percentile_interval

TOL = 1e-9  # a curve "reaches" a target it equals up to float noise


# ---- curve arithmetic (pure) --------------------------------------------------------------------
def auc(x: np.ndarray, y: np.ndarray, budget: float) -> float:
    """Mean of the piecewise-linear curve over ``[0, budget]`` (area / budget).

    The curve is held flat before its first point and after its last, so runs that overshoot the
    cap by part of a step, or that have no start eval, are integrated over the same range.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    inner = x[(x > 0) & (x < budget)]
    grid = np.unique(np.concatenate([[0.0, budget], inner]))
    vals = np.interp(grid, x, y)
    return float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)) / budget)


def crossing(y: np.ndarray, target: float) -> tuple[int, float] | None:
    """Where the piecewise-linear curve first reaches ``target``: segment ``i`` (from point ``i - 1``
    to ``i``) and fraction ``f`` along it, or ``(0, 0.0)`` if it starts there; None if never."""
    y = np.asarray(y, dtype=float)
    for i, v in enumerate(y):
        if v >= target - TOL:
            if i == 0:
                return (0, 0.0)
            prev = y[i - 1]
            return (i, float(min(max((target - prev) / (v - prev), 0.0), 1.0)))
    return None


def x_at(x: np.ndarray, cross: tuple[int, float] | None) -> float | None:
    """The cost at a :func:`crossing` (linear interpolation between eval points)."""
    if cross is None:
        return None
    i, f = cross
    if i == 0:
        return float(x[0])
    return float(x[i - 1] + f * (x[i] - x[i - 1]))


def x_at_target(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """Cost at which the curve first reaches ``target`` (None: not reached)."""
    return x_at(x, crossing(y, target))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value); NaNs ignored."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return (math.nan, math.nan)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan)


def common_grid(results: Sequence[RunResult], kind: str, budget: float, n: int = 201) -> np.ndarray:
    """From 0 to the furthest run end (>= budget): every run is compared on the same x."""
    ends = [float(c.x(kind)[-1]) for r in results for c in r.curves.values() if len(c.values) and c.has(kind)]
    return np.linspace(0.0, max([budget, *ends]), n)


def mean_curve(curves: Sequence[Curve], kind: str, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Seeds interpolated onto ``grid`` of axis ``kind``: mean, min, max, std of the values, and the
    mean of every other axis all curves have at the same points."""
    ys = np.stack([np.interp(grid, c.x(kind), c.values) for c in curves])
    out = {"mean": ys.mean(0), "min": ys.min(0), "max": ys.max(0), "std": ys.std(0), kind: grid}
    for other in Budget.KINDS:
        if other != kind and all(c.has(other) for c in curves):
            out[other] = np.stack([np.interp(grid, c.x(kind), c.x(other)) for c in curves]).mean(0)
    return out


def start_mismatches(results: Sequence[RunResult], tol: float = 1e-9) -> list[str]:
    """Warnings for seeds whose start eval (cost 0, before training) differs between runs.

    The start eval uses the seed and the untrained policy only, so with one model and one held-out
    set it is identical across recipes; a difference means the runs did not start from the same
    place (the warm-start model or the data changed between runs, or a recipe changes evaluation).
    """
    notes = []
    for seed in sorted({r.seed for r in results}):
        starts = {}
        for r in results:
            c = r.curves.get(PASS_AT_1)
            if r.seed == seed and c is not None and len(c.values) and c.tokens[0] == 0:
                starts["+".join(x for x in r.group if x)] = float(c.values[0])
        if starts and max(starts.values()) - min(starts.values()) > tol:
            detail = ", ".join(f"{k} {v:.3f}" for k, v in sorted(starts.items()))
            notes.append(f"seed {seed}: the start eval differs between runs ({detail}); did the model, the data or "
                         "the eval settings change between runs?")  # fmt: skip
    return notes


# ---- the table ----------------------------------------------------------------------------------
@dataclass
class Block:
    """One eval metric's numbers for one row (over seeds)."""

    metric: str
    final: tuple[float, float]
    best: tuple[float, float]
    auc: tuple[float, float]
    target: float | None
    tokens_to_target: float | None  # on the mean-over-seeds curve
    rollouts_to_target: float | None
    seeds_reached: int  # seeds whose own curve reached the target
    ratio: float | None = None  # cost on the budget's axis to target / the baseline's
    cost_to_target: dict[str, float | None] = field(default_factory=dict)  # every axis, mean curve


@dataclass
class ControlComparison:
    """A recipe against its matched control (same variant): the cost to reach the control's final
    mean pass@1 on every axis, the control's own cost to reach it, and the gaps in final and AUC."""

    control: str
    target: float | None  # the control's final mean pass@1
    cost: dict[str, float | None]  # axis -> this recipe's cost to the target (mean-over-seeds curve)
    control_cost: dict[str, float | None]  # axis -> the control's cost to its own final
    seeds_reached: int
    n_seeds: int
    final_delta: float  # this recipe's final mean - the control's
    auc_delta: float  # AUC (on the budget's axis) mean - the control's
    start: float = math.nan  # the control's mean pass@1 at its first evaluation (step 0)
    start_std: float = math.nan  # its sample std over the control's seeds
    ratio_interval: dict[str, tuple[float, float]] = field(default_factory=dict)  # axis -> 95% bootstrap (low, high)
    target_kind: str = "final"  # final: the control's final mean pass@1; peak: the top of its mean curve

    def ratio(self, axis: str) -> float | None:
        """Cost to the target over the control's (< 1: the recipe gets there cheaper)."""
        num, den = self.cost.get(axis), self.control_cost.get(axis)
        return num / den if num is not None and den else None


@dataclass
class Row:
    variant: str
    recipe: str
    seeds: list[str]
    blocks: list[Block]
    nonzero_token_share: tuple[float, float]
    open_frac: tuple[float, float]
    wall_s: tuple[float, float]
    train_s: tuple[float, float]
    tokens: float
    rollouts: float
    is_baseline: bool = False
    steps: float = math.nan  # training steps (generation batches), mean over seeds
    optimizer_steps: float = math.nan
    forwarded_tokens: float = math.nan
    control: ControlComparison | None = None
    # Comparisons a claim needs besides ``control`` (another control, or the control's peak).
    comparisons: list[ControlComparison] = field(default_factory=list)
    regime: str = ""  # the regime the runs were in (their ``ablation_regime`` tag; '' when not recorded)
    premise: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (max, mean) over seeds

    @property
    def label(self) -> str:
        return "+".join(x for x in (self.variant, self.recipe) if x)


def _block(results: Sequence[RunResult], metric: str, kind: str, budget: float, grid: np.ndarray, target: float | None) -> Block:
    curves = [r.curves[metric] for r in results if metric in r.curves and len(r.curves[metric].values)]
    if not curves:
        nan = (math.nan, math.nan)
        return Block(metric, nan, nan, nan, target, None, None, 0)
    tok = rol = None
    reached = 0
    costs: dict[str, float | None] = {}
    if target is not None:
        mc = mean_curve(curves, kind, grid)
        cross = crossing(mc["mean"], target)
        costs = {a: x_at(mc[a], cross) for a in Budget.KINDS if a in mc}
        tok, rol = costs.get("tokens"), costs.get("rollouts")
        reached = sum(crossing(c.values, target) is not None for c in curves)
    return Block(
        metric=metric,
        final=mean_std([float(c.values[-1]) for c in curves]),
        best=mean_std([float(c.values.max()) for c in curves]),
        auc=mean_std([auc(c.x(kind), c.values, budget) for c in curves]),
        target=target,
        tokens_to_target=tok,
        rollouts_to_target=rol,
        seeds_reached=reached,
        cost_to_target=costs,
    )


def cost_to_target(curves: Sequence[Curve], target: float, axis: str, grid: np.ndarray) -> float | None:
    """Where the mean-over-seeds curve along ``axis`` first reaches ``target`` (None: never)."""
    curves = [c for c in curves if len(c.values) and c.has(axis)]
    if not curves:
        return None
    # Every curve's own eval points join the grid: the mean of piecewise-linear curves is then
    # piecewise linear on it, and the crossing is exact rather than snapped to the grid.
    grid = np.unique(np.concatenate([grid, *[c.x(axis) for c in curves]]))
    return x_at(grid, crossing(mean_curve(curves, axis, grid)["mean"], target))


TARGET_KINDS = ("final", "peak")


def control_target(curves: Sequence[Curve], kind: str = "final") -> float:
    """What a cost is measured to: the control's mean final pass@1 (``final``), or the top of its
    mean-over-seeds curve (``peak``: the best eval of the mean run, as PODS states its claim; evals sit
    at the same steps in every seed, so the mean is taken point by point on the steps axis)."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {kind!r}")
    if kind == "final":
        return float(np.mean([c.values[-1] for c in curves]))
    axis = "steps" if all(c.has("steps") for c in curves) else "tokens"
    grid = np.unique(np.concatenate([c.x(axis) for c in curves]))
    return float(mean_curve(curves, axis, grid)["mean"].max())


def ratio_bootstrap(
    cur: Sequence[Curve],
    ctl: Sequence[Curve],
    axis: str,
    grid: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    target_kind: str = "final",
) -> tuple[float, float]:
    """95% percentile interval of the cost ratio to the control's final (or peak), resampling each
    arm's seeds.

    Each resample recomputes the estimator itself: the control's mean final or peak (the target), then each
    arm's mean-over-seeds curve and where it first reaches that target. A resampled method that never
    reaches it costs infinity; a resampled control already at its target at the start (cost 0) leaves
    that draw undefined (dropped)."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        m = [cur[i] for i in rng.integers(len(cur), size=len(cur))]
        c = [ctl[i] for i in rng.integers(len(ctl), size=len(ctl))]
        target = control_target(c, target_kind)
        num, den = cost_to_target(m, target, axis, grid), cost_to_target(c, target, axis, grid)
        draws.append(math.nan if not den else (math.inf if num is None else num / den))
    iv = percentile_interval(math.nan, draws)
    return (iv.low, iv.high)


def compare_to_control(
    runs: Sequence[RunResult],
    control_runs: Sequence[RunResult],
    control: str,
    budget: Budget,
    grids: dict[str, np.ndarray],
    target_kind: str = "final",
) -> ControlComparison:
    """The :class:`ControlComparison` of ``runs`` (one recipe's seeds) against ``control_runs``, the
    cost measured to the control's final (``target_kind`` final) or peak."""
    cur = [r.curves[PASS_AT_1] for r in runs if PASS_AT_1 in r.curves and len(r.curves[PASS_AT_1].values)]
    ctl = [r.curves[PASS_AT_1] for r in control_runs if PASS_AT_1 in r.curves and len(r.curves[PASS_AT_1].values)]
    nan = math.nan
    if not cur or not ctl:
        return ControlComparison(control, None, {}, {}, 0, len(cur), nan, nan, target_kind=target_kind)
    target = control_target(ctl, target_kind)
    axes = [a for a in grids if all(c.has(a) for c in cur + ctl)]
    mine_auc = np.mean([auc(c.x(budget.kind), c.values, budget.value) for c in cur])
    ctl_auc = np.mean([auc(c.x(budget.kind), c.values, budget.value) for c in ctl])
    return ControlComparison(
        control=control,
        target=target,
        cost={a: cost_to_target(cur, target, a, grids[a]) for a in axes},
        control_cost={a: cost_to_target(ctl, target, a, grids[a]) for a in axes},
        seeds_reached=sum(crossing(c.values, target) is not None for c in cur),
        n_seeds=len(cur),
        final_delta=float(np.mean([c.values[-1] for c in cur]) - np.mean([c.values[-1] for c in ctl])),
        auc_delta=float(mine_auc - ctl_auc),
        start=float(np.mean([c.values[0] for c in ctl])),
        start_std=mean_std([float(c.values[0]) for c in ctl])[1],
        ratio_interval={a: ratio_bootstrap(cur, ctl, a, grids[a], target_kind=target_kind) for a in axes},
        target_kind=target_kind,
    )


def summarize(
    results: Sequence[RunResult],
    budget: Budget,
    baseline: str | None = None,
    target: float | None = None,
    slice_metric: str | None = None,
    controls: dict[str, str] | None = None,
    comparisons: dict[str, Sequence[tuple[str, str]]] | None = None,
) -> list[Row]:
    """One row per (variant, recipe), baseline first in each variant.

    ``comparisons`` maps a recipe name to further ``(control, target kind)`` pairs its claims are
    judged on (another control than its matched one, or the control's peak): each that ran in the
    same variant is added to the row's ``comparisons``.

    ``controls`` maps a recipe name to its matched control's name (see
    :func:`components.analysis.recipe_header.controls_by_name`); a row whose control ran in the same
    variant gets a :class:`ControlComparison` on every axis in :data:`AXES` (plus the budget's).

    ``baseline``: a recipe name (``grpo``), a recipe path or a full label; the baseline row of the
    same variant sets the default ``target`` (its final mean pass@1) and the ratio denominators.
    Tokens-to-target is read off the mean-over-seeds curve (linear interpolation between eval
    points); ``seeds_reached`` counts seeds whose own curve got there.
    """
    metrics = [PASS_AT_1] + ([slice_metric] if slice_metric else [])
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    base_name = Path(baseline).stem if baseline and baseline.endswith((".yaml", ".yml")) else baseline
    grid = common_grid(results, budget.kind, budget.value) if results else np.zeros(1)
    grids = {a: common_grid(results, a, budget.value if a == budget.kind else 0) for a in dict.fromkeys((*AXES, budget.kind))
             if results and all(c.has(a) for r in results for c in r.curves.values())}  # fmt: skip

    def is_base(g: tuple[str, str]) -> bool:
        return base_name is not None and (g[1] == base_name or "+".join(x for x in g if x) == base_name)

    rows = []
    for variant in sorted({g[0] for g in groups}):
        keys = sorted((g for g in groups if g[0] == variant), key=lambda g: (not is_base(g), g[1]))
        base_key = next((g for g in keys if is_base(g)), None)
        targets = {}
        for m in metrics:
            if target is not None and m == PASS_AT_1:
                targets[m] = target
            elif base_key is not None:
                targets[m] = _block(groups[base_key], m, budget.kind, budget.value, grid, None).final[0]
            else:
                targets[m] = None
            if targets[m] is not None and math.isnan(targets[m]):
                targets[m] = None
        for g in keys:
            rs = sorted(groups[g], key=lambda r: r.seed)
            rows.append(Row(
                variant=variant,
                recipe=g[1],
                seeds=[r.seed for r in rs],
                blocks=[_block(rs, m, budget.kind, budget.value, grid, targets[m]) for m in metrics],
                nonzero_token_share=mean_std([r.nonzero_token_share for r in rs]),
                open_frac=mean_std([r.open_frac_mean for r in rs]),
                wall_s=mean_std([r.wall_s for r in rs]),
                train_s=mean_std([r.train_s for r in rs]),
                tokens=float(np.mean([r.final_tokens for r in rs])),
                rollouts=float(np.mean([r.final_rollouts for r in rs])),
                is_baseline=g == base_key,
                steps=float(np.mean([r.final_steps for r in rs])),
                optimizer_steps=mean_std([r.optimizer_steps for r in rs])[0],
                forwarded_tokens=mean_std([r.forwarded_tokens for r in rs])[0],
                regime=next((r.regime for r in rs if r.regime), ""),
                premise=_premise(rs),
            ))  # fmt: skip
        base_row = next((r for r in rows if r.variant == variant and r.is_baseline), None)
        for row in (r for r in rows if r.variant == variant):
            for i, b in enumerate(row.blocks):
                ref = base_row.blocks[i] if base_row is not None else None
                num = b.cost_to_target.get(budget.kind)
                den = None if ref is None else ref.cost_to_target.get(budget.kind)
                b.ratio = num / den if num is not None and den else None
            ctl = (controls or {}).get(row.recipe)
            if ctl is not None and ctl != row.recipe and (variant, ctl) in groups:
                row.control = compare_to_control(groups[(variant, row.recipe)], groups[(variant, ctl)], ctl, budget, grids)
            for other, kind in (comparisons or {}).get(row.recipe, ()):
                if (other, kind) != (ctl, "final") and other != row.recipe and (variant, other) in groups:
                    row.comparisons.append(
                        compare_to_control(groups[(variant, row.recipe)], groups[(variant, other)], other, budget, grids, kind)
                    )
    return rows


def _premise(runs: Sequence[RunResult]) -> dict[str, tuple[float, float]]:
    """Per premise metric: the max over seeds of each run's max, and the mean over seeds of its mean."""
    keys = dict.fromkeys(k for r in runs for k in r.premise)
    return {k: (max(r.premise[k][0] for r in runs if k in r.premise),
                float(np.mean([r.premise[k][1] for r in runs if k in r.premise]))) for k in keys}  # fmt: skip
