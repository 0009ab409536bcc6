"""What an ablation runs: recipes x overlays x regimes x seeds at an equal budget, the ``curate-rl fit``
command of each run, and which runs are still to do. The runner is ``scripts/ablate.py``.

A :class:`RunSpec` is one (recipe, overlays, seed, regime); a recipe that is an overlay (an authors
variant, ``# authors variant of: recipes/x.yaml``) runs composed after the recipe its header names.
:func:`fit_command` turns a spec into the ``curate-rl fit`` command line that appends a
:class:`~components.callbacks.budget.BudgetCap` and points the MLflow logger at the ablation with the
tags ``ablation_id``, ``recipe``, ``seed``, ``ablation_key`` (identity of the run) and ``kind=train``.
:func:`plan` decides which specs still need running: a spec whose run is ``FINISHED`` is skipped;
one left ``RUNNING``/``FAILED``/``KILLED`` is redone, and a finished run whose inputs changed (the
model folder it loaded, a data file passed after ``--``: :func:`inputs_fingerprint`) is refused.
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
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # where embedded:<name> models live
_WEIGHTS = ("config.json", "*.safetensors", "*.bin", "*.gguf")  # what identifies a model folder


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


def _hash_path(h: Any, path: Path, patterns: Sequence[str] = ("*",)) -> None:
    """Feed a file's bytes, or a folder's matching files (sorted, recursive, names and bytes), into ``h``."""
    if path.is_file():
        h.update(path.read_bytes())
        return
    files = sorted({f for pat in patterns for f in path.rglob(pat) if f.is_file() and not f.name.startswith(".")})
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())


def model_folder(ref: str) -> Path | None:
    """The local folder of a ``model.model`` value (``embedded:<name>`` or a path), None for a hub id."""
    if ref.startswith("embedded:"):
        p = ASSETS / ref.removeprefix("embedded:")
        return p if p.is_dir() else None
    p = Path(ref)
    return p if p.exists() else None


def inputs_fingerprint(configs: Sequence[str | Path], extra_args: Sequence[str] = ()) -> tuple[str, str]:
    """A hash of what a run reads besides its config files, and what it covered: the model it loads
    (``model.model`` from the configs, then ``extra_args``: its config and weight files) and every
    file or folder named in ``extra_args`` (data passed after ``--``). Relative paths mean what they
    mean in the working directory, as for the runs. Rebuilding a model at the same path, or editing
    a data file, changes it."""
    from components.analysis.regimes import effective_mix_and_model  # torch-heavy: only when planning

    _, model = effective_mix_and_model(configs, extra_args)
    h = hashlib.sha1()
    folder = model_folder(str(model))
    what = [f"model {model}"]
    h.update(str(model).encode())
    if folder is not None:
        _hash_path(h, folder, _WEIGHTS)
    for a in extra_args:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        p = Path(value)
        if not value.startswith("-") and p.exists() and p.resolve() != (folder.resolve() if folder else None):
            h.update(value.encode())
            _hash_path(h, p)
            what.append(value)
    return h.hexdigest()[:12], ", ".join(what)


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
    from components.analysis.regimes import regime_label

    configs = [_resolve(p, root) for p in spec.configs]
    tags = spec.tags(ablation_id, settings, root)
    tags["ablation_inputs_sha"] = inputs_fingerprint(configs, extra_args)[0]
    tags["ablation_regime"] = regime_label(configs, extra_args, spec.regime)
    env = {
        "MLFLOW_RUN_CONTEXT": json.dumps(tags),
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


def plan(
    specs: Sequence[RunSpec],
    runs: Iterable[Any],
    ablation_id: str,
    settings: str,
    root: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Plan:
    """Which specs still need a run. ``runs`` are MLflow ``Run`` objects of this ablation.

    A spec is done when a ``FINISHED`` run has its ``ablation_key`` and the same recipe/overlay
    file contents; any other state (``RUNNING`` from a killed process, ``FAILED``, ``KILLED``) is
    redone. Raises ``ValueError`` when finished runs of this ablation used other settings (budget,
    extra arguments), or read other inputs (:func:`inputs_fingerprint` of the spec's configs and
    ``extra_args``: a model rebuilt at the same path, an edited data file): such runs are not
    comparable, use another ablation id. Runs made before the fingerprint was recorded are kept.
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
        same = [r for r in finished if r.data.tags.get("ablation_files_sha") == sha]
        if same:
            fp, what = inputs_fingerprint([_resolve(p, root) for p in spec.configs], extra_args)
            old = same[-1].data.tags.get("ablation_inputs_sha")
            if old is not None and old != fp:
                raise ValueError(
                    f"ablation {ablation_id!r}: {spec.label} seed {spec.seed} finished (run {same[-1].info.run_id}) on "
                    f"other inputs than this run would read ({what}: fingerprint {old}, now {fp}); a model rebuilt "
                    "at the same path or an edited data file is not the same run. Use another --ablation-id."
                )
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
