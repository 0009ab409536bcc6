"""Regimes: named (data, model) presets that any recipe can be run under.

Each regime is a YAML overlay in ``configs/regimes/<name>.yaml`` (composable with any recipe:
``curate-rl fit --config recipes/grpo.yaml --config configs/regimes/sparse.yaml``) plus, where its
model is not the shipped one, the :class:`~components.analysis.warm_start.WarmStartSpec` that builds it.
Built models are cached in ``.cache/curate-rl/regimes/<name>`` under the working directory (ignored
by git), which is the local folder the overlay's ``model.model`` names; a ``regime.json`` beside
the weights records the spec's hash, so a changed spec rebuilds and an unchanged one is reused.

    from components.analysis.regimes import build_regime
    path = build_regime("sparse")      # builds on first use, then returns the cached folder

``dense`` and the pre-filter overlays use the shipped ``embedded:tiny`` (nothing to build).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.analysis.warm_start import WarmStartSpec, warm_start
from components.data.datamodule import default_tasks, reasoning_tasks
from components.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "regimes"
CACHE_ROOT = Path(".cache") / "curate-rl" / "regimes"


@dataclass
class Regime:
    """A named preset: its overlay file and, if it needs its own model, how to build it."""

    name: str
    description: str
    warm_start: WarmStartSpec | None = None  # None: the overlay uses a shipped model
    # A shipped build of ``warm_start`` (``embedded:<name>``) that the overlay names, so the regime
    # needs no build step; ``build_regime(name, force=True)`` still rebuilds it into the cache.
    shipped: str | None = None

    @property
    def config(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"


def _regimes() -> dict[str, Regime]:
    dense_slices = ["d1", "d2"]  # as the shipped model: 3-digit items are never trained on
    return {
        r.name: r
        for r in [
            Regime("dense", "today's mix (1/2/3-digit sums, 1:3:1) with the shipped tiny model (d2 ~0.24)"),
            Regime(
                "filtered",
                "the dense pair, training pool pre-filtered with the initial policy: keep prompts solved 1..15 of 16",
            ),
            Regime("filtered_ada", "Reinforce-Ada's pre-filter: keep prompts solved >= 1 of 16 (compose after a regime)"),
            Regime("filtered_ada_hard", "Reinforce-Ada's hard set: keep prompts solved 1-2 of 16 (compose after a regime)"),
            Regime(
                "sparse",
                "today's mix with the shipped model's warm start stopped early, at sampled d2 pass rate >= 0.12",
                # The shipped model's own run (same seed, data, init), stopped at a lower target.
                WarmStartSpec(default_tasks(), dense_slices, "d2", 0.12, eval_every=50),
            ),
            Regime(
                "reasoning",
                "1/2/3-digit sums with worked column-wise steps before '#### answer'; warm start to d2 >= 0.25",
                WarmStartSpec(reasoning_tasks(), dense_slices, "d2", 0.25, max_positions=128, eval_every=50, eval_items=200),
                shipped="embedded:reasoning",  # components/assets/reasoning: this spec's build (3.4 MB)
            ),
        ]
    }


REGIMES: dict[str, Regime] = _regimes()


def get_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise ConfigError("regime", f"{name!r} is not a regime; valid: {sorted(REGIMES)}")
    return REGIMES[name]


def regime_model_dir(name: str, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder a regime's built model lives in (what its overlay's ``model.model`` names)."""
    return Path(cache_root or CACHE_ROOT) / name


def cached_report(name: str, cache_root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The build report of a cached, up-to-date regime model; None when missing or built from another spec."""
    reg = get_regime(name)
    if reg.warm_start is None:
        return None
    meta = regime_model_dir(name, cache_root) / "regime.json"
    if not meta.exists():
        return None
    report = json.loads(meta.read_text())
    return report if report.get("spec_key") == reg.warm_start.key() else None


def build_regime(
    name: str,
    force: bool = False,
    cache_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Make sure regime ``name``'s model exists and return what to pass as ``model.model``.

    A regime on a shipped model returns ``embedded:tiny`` (or its own shipped build) at once. Otherwise the cached folder is
    returned when its ``regime.json`` matches the current spec; else (or with ``force``) the model is
    warm-started into it first (minutes on one core; see docs/results.md, Regimes).
    """
    reg = get_regime(name)
    if reg.warm_start is None:
        return "embedded:tiny"
    if reg.shipped and not force:
        return reg.shipped
    folder = regime_model_dir(name, cache_root)
    if not force and cached_report(name, cache_root) is not None:
        return str(folder)
    log(f"building regime {name!r} into {folder}: {reg.description}")
    report = warm_start(reg.warm_start, folder, log=log)
    report.update(regime=name, spec_key=reg.warm_start.key())
    (folder / "regime.json").write_text(json.dumps(report, indent=2))
    return str(folder)
