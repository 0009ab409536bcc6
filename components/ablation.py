"""Ablations: recipes x seeds at an equal drawn budget, read back from MLflow, compared on one table.

The runner is ``scripts/ablate.py``; this module is the part worth testing on its own:

- **Run specs and commands.** A :class:`RunSpec` is one (recipe, overlays, seed); :func:`fit_command`
  turns it into the ``curate-rl fit`` command line that appends a
  :class:`~components.callbacks.budget.BudgetCap` and points the MLflow logger at the ablation with
  the tags ``ablation_id``, ``recipe``, ``seed``, ``ablation_key`` (identity of the run) and
  ``kind=train``. :func:`plan` decides which specs still need running: a spec whose run is
  ``FINISHED`` is skipped; one left ``RUNNING``/``FAILED``/``KILLED`` is redone.
- **Reading results** goes through MLflow's own API only: ``MlflowClient.search_runs`` (a filter on
  the ``ablation_id`` tag) and ``get_metric_history`` for the curves (``search_runs`` only has the
  last value of each metric).
- **The comparison** is pure functions over eval curves: :func:`auc`, :func:`crossing` /
  :func:`x_at_target`, :func:`summarize`, :func:`to_markdown`, :func:`to_csv`, :func:`plot`.

How an eval point is placed on the cost axis: ``eval/pass_at_1`` is logged at step 0 before any
training (the start) and after training step ``s`` at step ``s``; training metrics of step ``s``
(``budget/cum_tokens``...) are logged at step ``s`` too. An eval logged *before* step ``s``'s
training metrics (by timestamp) measured the policy before that step: its cost is the cumulative
draw of step ``s - 1`` (0 at the start); otherwise it is step ``s``'s. Lightning (2.6) runs
validation when a callback sets ``trainer.should_stop``, so the last eval of a budget-capped run
is at the stop, on the final policy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PASS_AT_1 = "eval/pass_at_1"
CUM_TOKENS = "budget/cum_tokens"
CUM_ROLLOUTS = "budget/cum_rollouts"
CUM_TOKENS_NZ = "budget/cum_tokens_nonzero_adv"
CUM_TRAIN_S = "time/cum_train_s"  # cumulative training wall seconds, evaluation excluded (logged by the module)
CUM_OPT_STEPS = "budget/cum_optimizer_steps"  # optimizer updates (several per generation batch)
# Tokens forwarded through the policy (sampling plus pilot, hint-writing and scoring passes), under
# the names the module may log them; the first one a run has is reported.
CUM_FORWARDED = ("budget/cum_tokens_forwarded", "budget/cum_forwarded_tokens")
OPEN_FRAC = "gate/open_frac"
TIME_METRICS = ("time/generate_s", "time/score_s", "time/update_s")
BUDGET_CAP = "components.callbacks.budget.BudgetCap"
# The cost axes every comparison reports. ``steps`` are training steps = generation batches (what the
# papers call steps); ``train_s`` is training wall time without evaluation.
AXES = ("tokens", "steps", "train_s")
AXIS_NAMES = {"tokens": "drawn tokens", "rollouts": "drawn rollouts", "steps": "steps", "train_s": "train s"}
TOL = 1e-9  # a curve "reaches" a target it equals up to float noise


# ---- what to run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """The cap every run of an ablation gets, on one cost axis: ``tokens`` (generated), ``rollouts``
    (drawn), ``steps`` (training steps = generation batches) or ``train_s`` (training wall seconds,
    evaluation excluded)."""

    kind: str
    value: int

    KINDS = ("tokens", "rollouts", "steps", "train_s")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"budget kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}")
        if self.value <= 0:
            raise ValueError(f"budget must be positive, got {self.value}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, _, value = text.partition(":")
        return cls(kind, int(float(value)))

    @property
    def metric(self) -> str:
        return {"tokens": CUM_TOKENS, "rollouts": CUM_ROLLOUTS, "steps": "", "train_s": CUM_TRAIN_S}[self.kind]

    def cap_args(self, max_steps: int) -> tuple[dict[str, Any] | None, int]:
        """The ``BudgetCap`` init args (None: no cap callback) and the trainer's step limit for this
        budget: a step budget is the trainer's own ``max_steps``; the others stop through the cap."""
        if self.kind == "steps":
            return None, self.value
        return {f"max_{self.kind}": self.value}, max_steps


def stem(path: str) -> str:
    return Path(path).stem


def label_of(recipe: str, overlays: Sequence[str] = (), after: Sequence[str] = ()) -> str:
    """``<overlay stems>+<recipe stem>+<regime stems>``: the same name the CLI gives the run's
    ``recipe`` tag (the config files' stems in the order they are composed)."""
    return "+".join([stem(o) for o in overlays] + [stem(recipe)] + [stem(a) for a in after])


REGIME_DIR = "configs/regimes"


def regime_files(name: str, root: Path | None = None) -> tuple[str, ...]:
    """The overlay files of a regime name: ``dense`` -> configs/regimes/dense.yaml; regimes combine
    with ``+`` (``sparse+filtered_ada``: composed in that order, after the recipe, as the regime
    presets are written to be used). Raises ``ValueError`` naming the valid regimes."""
    out = []
    for part in name.split("+"):
        path = f"{REGIME_DIR}/{part}.yaml"
        if not _resolve(path, root).is_file():
            valid = (
                sorted(p.stem for p in _resolve(REGIME_DIR, root).glob("*.yaml")) if _resolve(REGIME_DIR, root).is_dir() else []
            )
            raise ValueError(f"regime {part!r}: no {path} (valid: {', '.join(valid) or 'none yet'})")
        out.append(path)
    return tuple(out)


@dataclass(frozen=True)
class RunSpec:
    """One run of an ablation: a recipe file, the overlays composed before it, a seed, and the
    regime overlays composed after it."""

    recipe: str
    overlays: tuple[str, ...] = ()
    seed: int = 0
    regime: tuple[str, ...] = ()

    @property
    def recipe_name(self) -> str:
        return stem(self.recipe)

    @property
    def variant(self) -> str:
        """The overlay set and regime as a name ('' when none): rows are compared within a variant."""
        return "+".join(stem(o) for o in (*self.overlays, *self.regime))

    @property
    def label(self) -> str:
        return label_of(self.recipe, self.overlays, self.regime)

    @property
    def configs(self) -> tuple[str, ...]:
        """The config files in the order they are composed."""
        return (*self.overlays, self.recipe, *self.regime)

    @property
    def key(self) -> str:
        """Identity of the run inside an ablation (stored as the ``ablation_key`` tag)."""
        key: dict[str, Any] = {"recipe": self.recipe, "overlays": list(self.overlays), "seed": self.seed}
        if self.regime:  # absent when empty, so runs made before regimes existed keep their identity
            key["regime"] = list(self.regime)
        return json.dumps(key, sort_keys=True)

    def files_sha(self, root: Path | None = None) -> str:
        """Hash of the recipe and overlay files' contents: an edited recipe is a different run."""
        h = hashlib.sha1()
        for p in (*self.overlays, self.recipe, *self.regime):
            h.update(_resolve(p, root).read_bytes())
        return h.hexdigest()[:12]

    def tags(self, ablation_id: str, settings: str, root: Path | None = None) -> dict[str, str]:
        return {
            "ablation_id": ablation_id,
            "kind": "train",
            "recipe": self.label,  # the CLI sets the same value from the config file names
            "seed": str(self.seed),
            "ablation_key": self.key,
            "ablation_recipe": self.recipe_name,
            "ablation_variant": self.variant,
            "ablation_settings": settings,
            "ablation_files_sha": self.files_sha(root),
        }


def _resolve(path: str, root: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else root / p


def settings_of(budget: Budget, extra_args: Sequence[str], max_steps: int) -> str:
    """Everything that must be equal across the runs of one ablation, as a canonical string."""
    return json.dumps({"budget": str(budget), "extra_args": list(extra_args), "max_steps": max_steps}, sort_keys=True)


def default_ablation_id(prefix: str, settings: str) -> str:
    """A stable id from the settings (not the recipes or seeds): re-running the same command resumes,
    and a recipe added later joins the same ablation."""
    return f"{prefix}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"


def fit_command(
    spec: RunSpec,
    budget: Budget,
    *,
    ablation_id: str,
    tracking_uri: str,
    experiment: str,
    settings: str,
    extra_args: Sequence[str] = (),
    max_steps: int = 1_000_000,
    root: Path | None = None,
    python: str = sys.executable,
    run_dir: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The ``curate-rl fit`` command of one run and the environment it needs (config paths are
    resolved against ``root``).

    The run executes in the caller's working directory, so relative paths inside a config mean what
    they mean to ``curate-rl fit`` run from there (a regime's ``.cache/curate-rl/regimes/<name>``
    model, the shared pre-filter cache); what the run writes (Lightning's root, checkpoints, the
    exported policy) goes to ``run_dir``, so concurrent runs never share an output folder.

    Later arguments win in LightningCLI, so the ablation's own settings (budget cap, step limit,
    seed, logger) come after the pass-through ``extra_args`` and cannot be overridden by them.
    ``--trainer.callbacks+=`` appends the cap to whatever callbacks the recipe lists.

    The run's tags travel in ``MLFLOW_RUN_CONTEXT`` (JSON tags MLflow adds to the run it creates),
    not in ``--trainer.logger.init_args.tags``: jsonargparse re-reads every value there as YAML
    (``"null"`` becomes None, ``"1e3"`` 1000.0, JSON-looking text a dict that MLflow rejects), and
    the identity tags must come back exactly.
    """
    cmd = [python, "-m", "components.cli", "fit"]
    for path in spec.configs:
        cmd += ["--config", str(_resolve(path, root).resolve())]
    if run_dir is not None:
        out = Path(run_dir).resolve()
        cmd += [
            "--trainer.default_root_dir", str(out),
            "--checkpoint.dirpath", str(out / "checkpoints"),
            "--model.export_dir", str(out / "outputs" / "final_policy"),
        ]  # fmt: skip
    cmd += list(extra_args)
    cap_args, max_steps = budget.cap_args(max_steps)
    logger = {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": experiment, "tracking_uri": tracking_uri, "run_name": f"{spec.label}-s{spec.seed}"},
    }
    if cap_args is not None:
        cmd.append(f"--trainer.callbacks+={json.dumps({'class_path': BUDGET_CAP, 'init_args': cap_args})}")
    cmd += [
        "--trainer.max_steps", str(max_steps),
        "--seed_everything", str(spec.seed),
        "--trainer.logger", json.dumps(logger),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    env = {
        "MLFLOW_RUN_CONTEXT": json.dumps(spec.tags(ablation_id, settings, root)),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return cmd, env


@dataclass
class Plan:
    todo: list[RunSpec]
    done: list[RunSpec]
    stale_run_ids: list[str]  # unfinished runs of specs in ``todo`` (left RUNNING by a killed ablation...)
    notes: list[str] = field(default_factory=list)


def plan(specs: Sequence[RunSpec], runs: Iterable[Any], ablation_id: str, settings: str, root: Path | None = None) -> Plan:
    """Which specs still need a run. ``runs`` are MLflow ``Run`` objects of this ablation.

    A spec is done when a ``FINISHED`` run has its ``ablation_key`` and the same recipe/overlay
    file contents; any other state (``RUNNING`` from a killed process, ``FAILED``, ``KILLED``) is
    redone. Raises ``ValueError`` when finished runs of this ablation used other settings (budget,
    extra arguments): such runs are not comparable, use another ablation id.
    """
    by_key: dict[str, list[Any]] = defaultdict(list)
    for r in runs:
        tags = r.data.tags
        if tags.get("kind") == "summary":
            continue
        other = tags.get("ablation_settings")
        if r.info.status == "FINISHED" and other is not None and other != settings:
            raise ValueError(
                f"ablation {ablation_id!r} already has finished runs with other settings ({other}); "
                f"these are {settings}. Use another --ablation-id (or leave it unset)."
            )
        by_key[tags.get("ablation_key", "")].append(r)
    out = Plan([], [], [])
    for spec in specs:
        runs_of = by_key.get(spec.key, [])
        finished = [r for r in runs_of if r.info.status == "FINISHED"]
        sha = spec.files_sha(root)
        if any(r.data.tags.get("ablation_files_sha") == sha for r in finished):
            out.done.append(spec)
            continue
        if finished:
            out.notes.append(
                f"{spec.label} seed {spec.seed}: recipe/overlay files changed since run "
                f"{finished[-1].info.run_id}; running it again"
            )
        out.todo.append(spec)
        out.stale_run_ids += [r.info.run_id for r in runs_of if r.info.status == "RUNNING"]
    return out


# ---- recipes: matched controls and method keys ---------------------------------------------------
@dataclass(frozen=True)
class RecipeHeader:
    """What a recipe's header comment declares about the comparison it belongs to.

    ``# control: recipes/x.yaml`` (or ``none``) names the matched control from the method's paper;
    ``# method keys: a.b c.d`` lists the config keys (dotted prefixes) that are the method: the only
    keys in which the recipe may differ from its control (and the control from the shared base, the
    module's defaults). ``# authors variant of: recipes/x.yaml`` marks a paper's full training
    settings (recipes/authors/), which comparisons do not use.
    """

    path: str
    control: str | None
    method_keys: tuple[str, ...]
    authors_of: str | None = None


def recipe_header(path: str | Path, root: Path | None = None) -> RecipeHeader:
    """Parse the ``# control:`` / ``# method keys:`` / ``# authors variant of:`` header lines."""
    p = _resolve(str(path), root)
    fields: dict[str, str] = {}
    for line in p.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key in ("control", "method keys", "authors variant of"):
            fields[key] = value.strip()
    control = fields.get("control")
    return RecipeHeader(
        path=str(path),
        control=None if control in (None, "", "none") else control,
        method_keys=tuple(fields.get("method keys", "").split()),
        authors_of=fields.get("authors variant of"),
    )


def with_controls(recipes: Sequence[str], root: Path | None = None) -> list[str]:
    """``recipes`` with each one's matched control added (before it, once), as the runner runs them."""
    out: list[str] = []
    for r in recipes:
        ctl = recipe_header(r, root).control
        if ctl is not None and ctl not in out:
            out.append(ctl)
        if r not in out:
            out.append(r)
    return out


def controls_by_name(recipes: Sequence[str], root: Path | None = None) -> dict[str, str]:
    """Recipe name -> its matched control's name, for :func:`summarize`."""
    out = {}
    for r in recipes:
        ctl = recipe_header(r, root).control
        if ctl is not None:
            out[stem(r)] = stem(ctl)
    return out


def resolved_config(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The full config ``curate-rl fit --config <paths...>`` resolves to (``--print_config``),
    without the ``config`` entry (the list of files)."""
    import contextlib

    import yaml

    from components.cli import main

    args = ["fit"]
    for path in paths:
        args += ["--config", str(path)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([*args, "--print_config"])
    cfg = yaml.safe_load(buf.getvalue())
    if not isinstance(cfg, dict):
        raise ValueError(f"--print_config of {list(map(str, paths))} printed no config: {buf.getvalue()[:500]}")
    cfg.pop("config", None)
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys (lists stay values: a list of callbacks is one setting)."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: cfg}


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences_outside(a: dict[str, Any], b: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """Dotted keys where configs ``a`` and ``b`` differ (a value, or present in one only) that are
    not under any of the ``allowed`` prefixes: what would make a comparison unfair."""
    fa, fb = flatten(a), flatten(b)
    allowed = tuple(allowed)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, _MISSING) != fb.get(k, _MISSING) and not _under(k, allowed))


_MISSING = object()


# ---- reading MLflow -----------------------------------------------------------------------------
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


def load_result(client: Any, run: Any, metrics: Sequence[str] = (PASS_AT_1,)) -> RunResult:
    """Read one run's curves (``get_metric_history``) and summary numbers."""
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
    )


def load_results(client: Any, runs: Iterable[Any], metrics: Sequence[str] = (PASS_AT_1,)) -> list[RunResult]:
    """Finished runs only (runs that logged no budget are skipped with a note); for a repeated
    (variant, recipe, seed) the latest run wins."""
    latest: dict[tuple[str, str, str], RunResult] = {}
    for r in sorted((r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.info.start_time):
        try:
            res = load_result(client, r, metrics)
        except ValueError as e:
            print(f"note: skipped: {e}", file=sys.stderr)
            continue
        latest[(*res.group, res.seed)] = res
    return list(latest.values())


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


def compare_to_control(
    runs: Sequence[RunResult], control_runs: Sequence[RunResult], control: str, budget: Budget, grids: dict[str, np.ndarray]
) -> ControlComparison:
    """The :class:`ControlComparison` of ``runs`` (one recipe's seeds) against ``control_runs``."""
    cur = [r.curves[PASS_AT_1] for r in runs if PASS_AT_1 in r.curves and len(r.curves[PASS_AT_1].values)]
    ctl = [r.curves[PASS_AT_1] for r in control_runs if PASS_AT_1 in r.curves and len(r.curves[PASS_AT_1].values)]
    nan = math.nan
    if not cur or not ctl:
        return ControlComparison(control, None, {}, {}, 0, len(cur), nan, nan)
    target = float(np.mean([c.values[-1] for c in ctl]))
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
        final_delta=float(np.mean([c.values[-1] for c in cur]) - target),
        auc_delta=float(mine_auc - ctl_auc),
        start=float(np.mean([c.values[0] for c in ctl])),
    )


def summarize(
    results: Sequence[RunResult],
    budget: Budget,
    baseline: str | None = None,
    target: float | None = None,
    slice_metric: str | None = None,
    controls: dict[str, str] | None = None,
) -> list[Row]:
    """One row per (variant, recipe), baseline first in each variant.

    ``controls`` maps a recipe name to its matched control's name (see :func:`recipe_header`); a
    row whose control ran in the same variant gets a :class:`ControlComparison` on every axis in
    :data:`AXES` (plus the budget's).

    ``baseline``: a recipe name (``grpo``), a recipe path or a full label; the baseline row of the
    same variant sets the default ``target`` (its final mean pass@1) and the ratio denominators.
    Tokens-to-target is read off the mean-over-seeds curve (linear interpolation between eval
    points); ``seeds_reached`` counts seeds whose own curve got there.
    """
    metrics = [PASS_AT_1] + ([slice_metric] if slice_metric else [])
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    base_name = stem(baseline) if baseline and baseline.endswith((".yaml", ".yml")) else baseline
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
    return rows


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


def _metric_name(metric: str) -> str:
    return "pass@1" if metric == PASS_AT_1 else metric.removeprefix("eval/").replace("pass_at_1/", "pass@1 ")


def to_markdown(rows: Sequence[Row], budget: Budget, title: str = "", notes: Sequence[str] = ()) -> str:
    """The comparison as markdown: per variant, a table for held-out pass@1 with the cost columns,
    then one for the slice (if any), then a legend."""
    lines = [f"## {title}", ""] if title else []
    lines += [f"**Warning:** {n}" for n in notes] + ([""] if notes else [])
    if rows:
        targets = ", ".join(f"{_metric_name(b.metric)} {b.target:.3f}" for b in rows[0].blocks if b.target is not None)
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
            n = _metric_name(metric)
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


def to_csv(rows: Sequence[Row], budget: Budget | None = None) -> str:
    """Flat numbers (mean and std columns), one line per row; empty cells for "not reached"/undefined.
    ``budget`` adds a ``budget`` column (``kind:value``), which says at what every run was stopped."""

    def num(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else repr(float(x))

    per_block = ["final_mean", "final_std", "best_mean", "best_std", "auc_mean", "auc_std", "target", "tokens_to_target",
                 "rollouts_to_target", "seeds_reached", "ratio_to_baseline"]  # fmt: skip
    per_row = ["nonzero_token_share", "open_frac", "wall_s", "train_s"]
    head = ["variant", "recipe", "baseline", "n_seeds", "seeds"]
    head += [f"{b.metric}:{c}" for b in (rows[0].blocks if rows else []) for c in per_block]
    head += [f"{c}_{s}" for c in per_row for s in ("mean", "std")] + ["tokens_mean", "rollouts_mean", "steps_mean"]
    head += ["control", "control_target", "control_seeds_reached", "control_final_delta", "control_auc_delta"]
    head += [f"{a}_to_control_target{suf}" for a in AXES for suf in ("", "_control", "_ratio")]
    head += ["control_start"] + (["budget"] if budget is not None else [])
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(head)
    for r in rows:
        cells: list[Any] = [r.variant, r.recipe, int(r.is_baseline), len(r.seeds), " ".join(r.seeds)]
        for b in r.blocks:
            cells += [num(v) for v in (*b.final, *b.best, *b.auc, b.target, b.tokens_to_target, b.rollouts_to_target)]
            cells += [b.seeds_reached, num(b.ratio)]
        cells += [num(v) for c in per_row for v in getattr(r, c)] + [num(r.tokens), num(r.rollouts), num(r.steps)]
        c = r.control
        if c is None:
            cells += [""] * (6 + 3 * len(AXES))
        else:
            cells += [c.control, num(c.target), c.seeds_reached, num(c.final_delta), num(c.auc_delta)]
            cells += [num(v) for a in AXES for v in (c.cost.get(a), c.control_cost.get(a), c.ratio(a))]
            cells += [num(c.start)]
        if budget is not None:
            cells.append(f"{budget.kind}:{budget.value}")
        w.writerow(cells)
    return out.getvalue()


def plot(
    results: Sequence[RunResult], rows: Sequence[Row], budget: Budget, path: Path, title: str = "", band: str = "minmax"
) -> Path:
    """Held-out pass@1 (and the slice, if any) against cumulative cost: the mean over seeds on a
    common grid, with a min–max (or ±std) band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.signal_health import line_styles

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
        ax.set_ylabel(f"held-out {_metric_name(metric)}")
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
    :func:`components.signal_health.plot_signal_health`."""
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
