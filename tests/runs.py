"""What the tests that run fits share: the repository root, a small run's flags, the logged metrics."""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A few-step fit on the embedded default: a small pool, a small held-out set, evaluation every 2 steps.
SMALL = [
    "--data.train_size",
    "120",
    "--data.heldout_size",
    "16",
    "--data.batch_size",
    "8",
    "--model.eval.samples",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--model.log_completions_every_n_steps",
    "1",
]


def metrics_of(db: Path) -> dict[str, list[float]]:
    """Every metric an MLflow sqlite store holds, as a list of values in step order."""
    con = sqlite3.connect(db)
    out: dict[str, list[float]] = {}
    for key, value in con.execute("select key, value from metrics order by step"):
        out.setdefault(key, []).append(value)
    con.close()
    return out


_RESOLVED: dict[tuple[str, ...], dict] = {}


def resolved(*paths: str | Path) -> dict:
    """What ``curate-rl fit --config <paths...>`` resolves to (``--print_config``), cached for the
    whole test session: each composition of recipes and overlays is resolved once, however many
    tests read it. Returns a copy, so a test may edit what it gets."""
    key = tuple(str(p) for p in paths)
    if key not in _RESOLVED:
        from components.analysis.config_diff import resolved_config

        _RESOLVED[key] = resolved_config(paths)
    return copy.deepcopy(_RESOLVED[key])
