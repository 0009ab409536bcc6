"""Regimes: named (data, model) presets that any recipe can be run under, one YAML file each.

A regime is the file ``configs/regimes/<name>.yaml``: an overlay composable with any recipe
(``curate-rl fit --config recipes/grpo.yaml --config configs/regimes/sparse.yaml``) whose header
comment says what it is and, when its model is a warm start, how that model is built. The list of
regimes is the folder's files: adding a regime is adding a file, no code. A file holds:

* ``# REGIME <name>: <description>`` — the first header line (the description runs to its first
  sentence end, across lines);
* ``data.tasks`` — the task mix (null: the embedded default mix);
* ``model.model`` — the model the regime's runs load: ``embedded:<name>`` (shipped), or a local
  folder that :func:`build_regime` fills (conventionally ``.cache/curate-rl/regimes/<name>``);
  absent for a *modifier* regime (a pre-filter) that composes after a regime setting data and model;
* ``# warm start: {...}`` — a header line holding a YAML mapping of
  :class:`~components.analysis.warm_start.WarmStartSpec` fields other than ``tasks`` (the mix is
  ``data.tasks``), e.g. ``{train_tags: [d1, d2], target_tag: d2, target: 0.12, eval_every: 50}``.
  Present when the model is built by a warm start (on a shipped ``embedded:`` model it records how
  the shipped build was made, and ``build_regime(name, force=True)`` rebuilds it into the cache).

A built model's folder holds ``regime.json`` (the build report with the spec's hash): a changed
spec rebuilds, an unchanged one is reused.

    from components.analysis.regimes import build_regime
    path = build_regime("sparse")      # builds on first use, then returns the cached folder
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from components.analysis.warm_start import WarmStartSpec, warm_start
from components.data.datamodule import ReasoningGymTask, default_tasks
from components.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "regimes"
CACHE_ROOT = Path(".cache") / "curate-rl" / "regimes"
DEFAULT_MODEL = "embedded:tiny"  # the module's default model.model (components/step/module.py)
_SPEC_FIELDS = tuple(f.name for f in fields(WarmStartSpec) if f.name != "tasks")


@dataclass
class Regime:
    """A named preset: its overlay file, its mix and model, and, if it needs its own model, how to build it."""

    name: str
    description: str
    warm_start: WarmStartSpec | None = None  # None: the overlay uses a shipped model (or sets none)
    # A shipped build of ``warm_start`` (``embedded:<name>``) that the overlay names, so the regime
    # needs no build step; ``build_regime(name, force=True)`` still rebuilds it into the cache.
    shipped: str | None = None
    path: Path | None = None  # the overlay file (None: ``CONFIG_DIR/<name>.yaml``)
    model: str | None = None  # the overlay's model.model (None: a modifier that sets no model)
    tasks: list[ReasoningGymTask] | None = None  # the overlay's data.tasks (None: the default mix)

    @property
    def config(self) -> Path:
        return self.path or CONFIG_DIR / f"{self.name}.yaml"

    @property
    def modifier(self) -> bool:
        """Sets neither data nor model (a pre-filter): composes after a regime that does."""
        return self.model is None

    @property
    def build_dir(self) -> Path | None:
        """The local folder the overlay loads and :func:`build_regime` fills (None: shipped or no model)."""
        if self.model is None or self.model.startswith("embedded:"):
            return None
        return Path(self.model)


def _header(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


def _tasks(entries: Any, where: str) -> list[ReasoningGymTask] | None:
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{where}: data.tasks", "must be a list of task entries ({name, config, weight, tag})")
    try:
        return [ReasoningGymTask(**e) for e in entries]
    except TypeError as e:
        raise ConfigError(f"{where}: data.tasks", f"{e}; valid keys: name, config, weight, tag, prompt_template") from None


def load_regime(path: str | os.PathLike) -> Regime:
    """The :class:`Regime` of one regime file (see the module docstring for its form)."""
    p = Path(path)
    text = p.read_text()
    head = _header(text)
    body = yaml.safe_load(text) or {}
    if not isinstance(body, dict):
        raise ConfigError(str(p), "a regime file is a YAML mapping (a config overlay)")
    name = p.stem
    first = " ".join(head)
    m = re.match(r"REGIME\s+([\w.+-]+)\s*:\s*(.*)", first)
    if m and m.group(1) != name:
        raise ConfigError(f"{p}: header", f"names regime {m.group(1)!r}; the file name says {name!r}")
    desc = m.group(2) if m else first
    desc = re.split(r"(?<=\.)\s", desc.split(" warm start:")[0], maxsplit=1)[0]
    model = (body.get("model") or {}).get("model") if isinstance(body.get("model"), dict) else None
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    tasks = _tasks(data.get("tasks"), str(p))
    spec = None
    ws = [h.split(":", 1)[1] for h in head if h.lower().startswith("warm start:")]
    if ws:
        opts = yaml.safe_load(ws[0]) or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{p}: # warm start", f"must be a YAML mapping of {list(_SPEC_FIELDS)}")
        bad = sorted(set(opts) - set(_SPEC_FIELDS))
        if bad:
            raise ConfigError(f"{p}: # warm start", f"unknown fields {bad}; valid: {list(_SPEC_FIELDS)}")
        if model is None:
            raise ConfigError(f"{p}: model.model", "a regime with a warm start must name the model it loads")
        spec = WarmStartSpec(tasks=tasks if tasks is not None else default_tasks(), **opts)
        spec.validate()
    shipped = model if spec is not None and model is not None and model.startswith("embedded:") else None
    return Regime(name, desc, spec, shipped, p, model, tasks)


def load_regimes(config_dir: str | os.PathLike | None = None) -> dict[str, Regime]:
    """Every regime file of ``config_dir`` (default ``configs/regimes``), by name."""
    folder = Path(config_dir or CONFIG_DIR)
    return {p.stem: load_regime(p) for p in sorted(folder.glob("*.yaml"))}


REGIMES: dict[str, Regime] = load_regimes()


def get_regime(name: str, config_dir: str | os.PathLike | None = None) -> Regime:
    """Regime ``name``: from ``config_dir`` when given, else :data:`REGIMES` (then the folder again,
    so a file added after import is found)."""
    if config_dir is None and name in REGIMES:
        return REGIMES[name]
    found = load_regimes(config_dir)
    if name not in found:
        valid = sorted(found) if config_dir is not None else sorted({*REGIMES, *found})
        raise ConfigError("regime", f"{name!r} is not a regime; valid: {valid}")
    return found[name]


def regime_model_dir(name: str, cache_root: str | os.PathLike | None = None, config_dir: str | os.PathLike | None = None) -> Path:
    """The folder a regime's built model lives in: what its overlay's ``model.model`` names, or, for a
    shipped model (or with ``cache_root``), ``<cache_root>/<name>``."""
    reg = get_regime(name, config_dir)
    if cache_root is None and reg.build_dir is not None:
        return reg.build_dir
    return Path(cache_root or CACHE_ROOT) / name


def cached_report(
    name: str, cache_root: str | os.PathLike | None = None, config_dir: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """The build report of a built, up-to-date regime model; None when missing or built from another spec."""
    reg = get_regime(name, config_dir)
    if reg.warm_start is None:
        return None
    meta = regime_model_dir(name, cache_root, config_dir) / "regime.json"
    if not meta.exists():
        return None
    report = json.loads(meta.read_text())
    return report if report.get("spec_key") == reg.warm_start.key() else None


def build_regime(
    name: str,
    force: bool = False,
    cache_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    config_dir: str | os.PathLike | None = None,
) -> str:
    """Make sure regime ``name``'s model exists and return what to pass as ``model.model``.

    A regime on a shipped model returns it at once (a modifier regime: the default model). Otherwise
    the built folder is returned when its ``regime.json`` matches the current spec; else (or with
    ``force``) the model is warm-started into it first, resuming an interrupted build of the same
    spec (minutes on one core; see docs/results.md, Regimes).
    """
    reg = get_regime(name, config_dir)
    if reg.warm_start is None:
        return reg.model or DEFAULT_MODEL
    if reg.shipped and not force:
        return reg.shipped
    folder = regime_model_dir(name, cache_root, config_dir)
    if not force and cached_report(name, cache_root, config_dir) is not None:
        return str(folder)
    log(f"building regime {name!r} into {folder}: {reg.description}")
    report = warm_start(reg.warm_start, folder, log=log, resume=not force)
    report.update(regime=name, spec_key=reg.warm_start.key())
    (folder / "regime.json").write_text(json.dumps(report, indent=2))
    return str(folder)


# ---- which regime a run was in --------------------------------------------------------------------
def _value_after(args: Sequence[str], key: str) -> str | None:
    """The last value given to ``--key`` in a CLI argument list (``--key v`` or ``--key=v``)."""
    found = None
    for i, a in enumerate(args):
        if a == key and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(key + "="):
            found = a.split("=", 1)[1]
    return found


def _tasks_arg(value: str) -> Any:
    """``--data.tasks`` as ``curate-rl fit`` reads it: a file path or inline YAML."""
    p = Path(value)
    return yaml.safe_load(p.read_text() if p.is_file() else value)


def effective_mix_and_model(configs: Sequence[str | os.PathLike], extra_args: Sequence[str] = ()) -> tuple[Any, str]:
    """The ``data.tasks`` (as YAML data, None = default mix) and ``model.model`` a run composed from
    ``configs`` (later files win) and then ``extra_args`` resolves to."""
    tasks: Any = None
    model = DEFAULT_MODEL
    for c in configs:
        body = yaml.safe_load(Path(c).read_text()) or {}
        data, mdl = body.get("data"), body.get("model")
        if isinstance(data, dict) and "tasks" in data:
            tasks = data["tasks"]
        if isinstance(mdl, dict) and mdl.get("model") is not None:
            model = mdl["model"]
    if (t := _value_after(extra_args, "--data.tasks")) is not None:
        tasks = t
    if isinstance(tasks, str):  # a file of entries (or inline YAML), as `fit --data.tasks` takes it
        tasks = _tasks_arg(tasks)
    model = _value_after(extra_args, "--model.model") or model
    return tasks, model


def _norm_tasks(tasks: Any) -> str:
    """A mix as comparable text (entries with their defaults filled; None: the default mix)."""
    if tasks is None:
        return "default"
    out = []
    for t in tasks:
        d = dict(t) if isinstance(t, dict) else dict(vars(t))
        if "name" in d:
            try:
                d = dict(vars(ReasoningGymTask(**d)))
                d["weight"] = float(d["weight"])
            except TypeError:
                pass
        out.append(d)
    return json.dumps(out, sort_keys=True, default=str)


def regime_label(
    configs: Sequence[str | os.PathLike],
    extra_args: Sequence[str] = (),
    regime_files: Sequence[str | os.PathLike] = (),
    config_dir: str | os.PathLike | None = None,
) -> str:
    """The regime a run was in, named from the regime files: the ``--regime`` files it composed
    (``sparse+filtered_ada``), else the regime file whose mix and model equal the run's (the recipe
    may set them, as the DRO recipes do, or arguments after ``--``), else ``custom`` with the mix's
    slices and the model. Never ``dense`` for a mix that is not the dense regime's."""
    if regime_files:
        return "+".join(Path(f).stem for f in regime_files)
    tasks, model = effective_mix_and_model(configs, extra_args)
    key = (_norm_tasks(tasks), model)
    for reg in load_regimes(config_dir).values():
        if not reg.modifier and (_norm_tasks(reg.tasks), reg.model) == key:
            return reg.name
    tags = "default mix" if tasks is None else "/".join(str(t.get("tag") or t.get("name")) for t in tasks if isinstance(t, dict))
    return f"custom ({tags}; {model})"
