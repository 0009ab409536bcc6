"""Reading an ablation's runs back from MLflow, through MLflow's own API only:
``MlflowClient.search_runs`` (a filter on the ``ablation_id`` tag) and ``get_metric_history`` for
the curves (``search_runs`` only has the last value of each metric).

How an eval point is placed on the cost axis: ``eval/pass_at_1`` is logged at step 0 before any
training (the start) and after training step ``s`` at step ``s``; training metrics of step ``s``
(``budget/cum_tokens``...) are logged at step ``s`` too. An eval logged *before* step ``s``'s
training metrics (by timestamp) measured the policy before that step: its cost is the cumulative
draw of step ``s - 1`` (0 at the start); otherwise it is step ``s``'s. Lightning (2.6) runs
validation when a callback sets ``trainer.should_stop``, so the last eval of a budget-capped run
is at the stop, on the final policy.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.analysis.cost_axes import (
    CUM_FORWARDED,
    CUM_OPT_STEPS,
    CUM_ROLLOUTS,
    CUM_TOKENS,
    CUM_TOKENS_NZ,
    CUM_TRAIN_S,
    OPEN_FRAC,
    PASS_AT_1,
    TIME_METRICS,
    Budget,
)


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (runs execute in their own directories)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def search_all(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """Every active run matching the filter (``search_runs`` pages through ``page_token``)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def ablation_runs(client: Any, experiment_ids: list[str], ablation_id: str | None = None) -> list[Any]:
    """The training runs of an ablation (or of whole experiments when ``ablation_id`` is None)."""
    flt = f"tags.ablation_id = '{ablation_id}'" if ablation_id else ""
    return [r for r in search_all(client, experiment_ids, flt) if r.data.tags.get("kind") != "summary"]


History = list[tuple[int, int, float]]  # (step, timestamp ms, value)


def history(client: Any, run_id: str, key: str) -> History:
    return sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))


def eval_points(evals: History, cum: dict[str, History]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Place eval values on the cost axes. Returns ``({axis: x}, values)`` in eval order.

    ``cum`` maps an axis name to its cumulative budget history (one entry per training step). An
    eval at step ``s`` logged before that step's budget entry measured the policy before step
    ``s`` was trained (the start eval at step 0): its cost is step ``s - 1``'s (0 at the start).
    """
    first = next(iter(cum.values()))
    ts_of = {}
    for s, ts, _ in first:
        ts_of.setdefault(s, ts)
    value_of = {axis: {s: v for s, _, v in h} for axis, h in cum.items()}
    steps = sorted(ts_of)
    xs: dict[str, list[float]] = {axis: [] for axis in cum}
    ys = []
    for s, ts, v in sorted(evals, key=lambda e: (e[1], e[0])):
        after = s in ts_of and ts >= ts_of[s]
        at = s if after else max((t for t in steps if t < s), default=None)
        for axis in cum:
            xs[axis].append(0.0 if at is None else value_of[axis][at])
        ys.append(v)
    return {a: np.asarray(x, dtype=float) for a, x in xs.items()}, np.asarray(ys, dtype=float)


@dataclass
class Curve:
    """One eval metric of one run: values at eval points with their cost on each axis (``steps``
    and ``train_s`` may be None for curves made by hand)."""

    tokens: np.ndarray
    rollouts: np.ndarray
    values: np.ndarray
    steps: np.ndarray | None = None
    train_s: np.ndarray | None = None

    def x(self, kind: str) -> np.ndarray:
        x = getattr(self, kind) if kind in Budget.KINDS else None
        if x is None:
            raise ValueError(f"this curve has no {kind!r} axis")
        return x

    def has(self, kind: str) -> bool:
        return getattr(self, kind, None) is not None


@dataclass
class RunResult:
    """What the comparison needs from one finished training run."""

    run_id: str
    recipe: str
    variant: str
    seed: str
    curves: dict[str, Curve]  # eval metric -> curve
    final_tokens: float
    final_rollouts: float
    nonzero_token_share: float
    open_frac_mean: float
    wall_s: float
    train_s: float
    budget: str | None = None  # the ``ablation_settings`` budget, when the run came from ablate.py
    final_steps: float = math.nan  # training steps (generation batches)
    optimizer_steps: float = math.nan  # optimizer updates (``budget/cum_optimizer_steps``), NaN if not logged
    forwarded_tokens: float = math.nan  # tokens forwarded through the policy, NaN if not logged
    regime: str | None = None  # the ``ablation_regime`` tag (None: a run made before it was recorded)
    premise: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (max, mean): premise_summary

    @property
    def group(self) -> tuple[str, str]:
        return (self.variant, self.recipe)


def step_histories(client: Any, rid: str) -> dict[str, History]:
    """The cumulative cost of a run on every axis, one entry per training step.

    ``steps`` counts training steps (the i-th entry of the token history is step i + 1).
    ``train_s`` is ``time/cum_train_s`` when the run logged it, else the running sum of the
    per-step generate + score + update seconds (the same quantity, evaluation excluded).
    """
    tokens = history(client, rid, CUM_TOKENS)
    out = {"tokens": tokens, "rollouts": history(client, rid, CUM_ROLLOUTS)}
    out["steps"] = [(s, ts, float(i + 1)) for i, (s, ts, _) in enumerate(tokens)]
    train = history(client, rid, CUM_TRAIN_S)
    if not train:
        per_step: dict[int, float] = defaultdict(float)
        for k in TIME_METRICS:
            for s, _, v in history(client, rid, k):
                per_step[s] += v
        total, train = 0.0, []
        for s, ts, _ in tokens:
            total += per_step.get(s, 0.0)
            train.append((s, ts, total))
    out["train_s"] = train
    return out


def premise_summary(client: Any, rid: str, keys: Sequence[tuple[str, str | None]]) -> dict[str, tuple[float, float]]:
    """(max, mean) over the logged steps of each ``(metric, weight)`` of ``keys`` the run logged (a
    claim's premise check). With a ``weight`` metric (e.g. ``hint/used_level_1``, the prompts drawn
    at that level) only steps where it is > 0 count and the mean is weighted by it: the step means
    pool into the run's mean over what was drawn, not over steps where nothing was."""
    out = {}
    for key, weight in keys:
        h = {s: v for s, _, v in history(client, rid, key) if not math.isnan(v)}
        w = {s: 1.0 for s in h} if weight is None else {s: v for s, _, v in history(client, rid, weight) if v > 0}
        pts = [(h[s], w[s]) for s in sorted(h) if s in w]
        if pts:
            out[key] = (max(v for v, _ in pts), sum(v * x for v, x in pts) / sum(x for _, x in pts))
        elif h:
            out[key] = (0.0, 0.0) if weight is not None else (math.nan, math.nan)  # logged, never drawn
    return out


def load_result(
    client: Any, run: Any, metrics: Sequence[str] = (PASS_AT_1,), premise_metrics: Sequence[tuple[str, str | None]] = ()
) -> RunResult:
    """Read one run's curves (``get_metric_history``), summary numbers and the premise metrics' summaries."""
    rid, tags = run.info.run_id, run.data.tags
    cum = step_histories(client, rid)
    if not cum["tokens"]:
        raise ValueError(f"run {rid} logged no {CUM_TOKENS}: not a curate-rl training run")
    if not cum["rollouts"]:
        cum.pop("rollouts")
    curves = {}
    for key in metrics:
        h = history(client, rid, key)
        if h:
            xs, ys = eval_points(h, cum)
            nan = np.full(len(ys), math.nan)
            curves[key] = Curve(xs["tokens"], xs.get("rollouts", nan), ys, xs["steps"], xs["train_s"])
    last = run.data.metrics
    open_h = history(client, rid, OPEN_FRAC)
    settings = tags.get("ablation_settings")
    seed = tags.get("seed") or run.data.params.get("seed_everything") or rid[:8]
    tokens = cum["tokens"][-1][2]
    forwarded = next((last[k] for k in CUM_FORWARDED if k in last), math.nan)
    return RunResult(
        run_id=rid,
        recipe=tags.get("ablation_recipe") or tags.get("recipe") or run.info.run_name or rid[:8],
        variant=tags.get("ablation_variant", ""),
        seed=str(seed),
        curves=curves,
        final_tokens=tokens,
        final_rollouts=cum["rollouts"][-1][2] if "rollouts" in cum else math.nan,
        nonzero_token_share=last.get(CUM_TOKENS_NZ, math.nan) / tokens if tokens else math.nan,
        open_frac_mean=float(np.mean([v for _, _, v in open_h])) if open_h else math.nan,
        wall_s=((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000.0,
        train_s=cum["train_s"][-1][2] if cum["train_s"] else math.nan,
        budget=json.loads(settings)["budget"] if settings else None,
        final_steps=float(len(cum["tokens"])),
        optimizer_steps=last.get(CUM_OPT_STEPS, math.nan),
        forwarded_tokens=forwarded,
        regime=tags.get("ablation_regime"),
        premise=premise_summary(client, rid, premise_metrics),
    )


def load_results(
    client: Any,
    runs: Iterable[Any],
    metrics: Sequence[str] = (PASS_AT_1,),
    premise_metrics: Sequence[tuple[str, str | None]] = (),
) -> list[RunResult]:
    """Finished runs only (runs that logged no budget are skipped with a note); for a repeated
    (variant, recipe, seed) the latest run wins."""
    latest: dict[tuple[str, str, str], RunResult] = {}
    for r in sorted((r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.info.start_time):
        try:
            res = load_result(client, r, metrics, premise_metrics)
        except ValueError as e:
            print(f"note: skipped: {e}", file=sys.stderr)
            continue
        latest[(*res.group, res.seed)] = res
    return list(latest.values())
