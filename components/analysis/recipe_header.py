"""A recipe's header comment: what it declares about the comparison it belongs to.

The header is the file's leading ``#`` lines. Three of them are read, by this module only:

- ``# control: recipes/x.yaml`` (or ``none``): the matched control from the method's paper; the
  ablation runner adds it to every run (:func:`with_controls`) and the report compares against it
  (:func:`controls_by_name`);
- ``# method keys: a.b c.d``: the config keys (dotted prefixes) that are the method, the only keys
  in which a recipe may differ from its control (``tests/test_recipe_keys.py``);
- ``# authors variant of: recipes/x.yaml``: a paper's own training settings (``recipes/authors/``),
  which comparisons do not use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


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
    p = Path(path)
    p = p if p.is_absolute() or root is None else root / p
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
    """Recipe name -> its matched control's name, for :func:`components.analysis.comparison.summarize`."""
    out = {}
    for r in recipes:
        ctl = recipe_header(r, root).control
        if ctl is not None:
            out[Path(r).stem] = Path(ctl).stem
    return out
