"""What an ablation runs: recipes x overlays x regimes x seeds at an equal budget, the ``curate-rl fit``
command of each run, and which runs are still to do. The runner is ``scripts/ablate.py``.

A :class:`RunSpec` is one (recipe, overlays, seed, regime); a recipe that is an overlay (an authors
variant, ``# authors variant of: recipes/x.yaml``) runs composed after the recipe its header names.
:func:`fit_command` turns a spec into the ``curate-rl fit`` command line that appends a
:class:`~components.callbacks.budget.BudgetCap` and points the MLflow logger at the ablation with the
tags ``ablation_id``, ``recipe``, ``seed``, ``ablation_key`` (identity of the run) and ``kind=train``.
:func:`plan` decides which specs still need running: a spec whose run is ``FINISHED`` is skipped;
one left ``RUNNING``/``FAILED``/``KILLED`` is redone.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.analysis.cost_axes import Budget
from components.analysis.recipe_header import recipe_header

BUDGET_CAP = "components.callbacks.budget.BudgetCap"


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
    regime overlays composed after it. ``base``: what the recipe's header says it overlays (an
    authors variant's recipe), composed just before it; :meth:`of` reads it from the header."""

    recipe: str
    overlays: tuple[str, ...] = ()
    seed: int = 0
    regime: tuple[str, ...] = ()
    base: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, recipe: str, overlays: Sequence[str] = (), seed: int = 0, regime: Sequence[str] = (), root: Path | None = None
    ) -> RunSpec:
        """The spec of ``recipe`` with its ``base`` from its header (:func:`recipe_header`)."""
        return cls(recipe, tuple(overlays), seed, tuple(regime), recipe_header(recipe, root).base)

    @property
    def recipe_name(self) -> str:
        return stem(self.recipe)

    @property
    def variant(self) -> str:
        """The overlay set and regime as a name ('' when none): rows are compared within a variant."""
        return "+".join(stem(o) for o in (*self.overlays, *self.regime))

    @property
    def label(self) -> str:
        return label_of(self.recipe, (*self.overlays, *self.base), self.regime)

    @property
    def configs(self) -> tuple[str, ...]:
        """The config files in the order they are composed."""
        return (*self.overlays, *self.base, self.recipe, *self.regime)

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
        for p in self.configs:
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

    A recipe that is an overlay (an authors variant) runs composed after the files its header
    names; ``spec.base`` must be those (build the spec with :meth:`RunSpec.of`).
    """
    base = recipe_header(spec.recipe, root).base
    if spec.base != base:
        raise ValueError(f"{spec.recipe} is composed after {list(base)}, the spec says {list(spec.base)}: use RunSpec.of")
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
