"""What a list of config files resolves to (``curate-rl fit --print_config``), flattened to dotted
keys, and where two resolved configs differ: the check that a comparison is fair
(``tests/integration/test_recipe_keys.py``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


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


def under_any(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences_outside(a: dict[str, Any], b: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """Dotted keys where configs ``a`` and ``b`` differ (a value, or present in one only) that are
    not under any of the ``allowed`` prefixes: what would make a comparison unfair."""
    fa, fb = flatten(a), flatten(b)
    allowed = tuple(allowed)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, _MISSING) != fb.get(k, _MISSING) and not under_any(k, allowed))


_MISSING = object()
