"""A recipe's header comment: what it declares about the comparison it belongs to.

The header is the file's leading ``#`` lines. Four of them are read, by this module only:

- ``# control: recipes/x.yaml`` (or ``none``): the matched control from the method's paper; the
  ablation runner adds it to every run (:func:`with_controls`) and the report compares against it
  (:func:`controls_by_name`);
- ``# method keys: a.b c.d``: the config keys (dotted prefixes) that are the method, the only keys
  in which a recipe may differ from its control (``tests/integration/test_recipe_keys.py``);
- ``# authors variant of: recipes/x.yaml``: a paper's own training settings (``recipes/authors/``),
  which comparisons do not use; an overlay composed after ``recipes/x.yaml``;
- ``# paper scale of: configs/gpu-1x.yaml recipes/x.yaml``: a paper's model, batch and lengths
  (``configs/repro/``); an overlay composed after those files, in that order.

An overlay holds only the keys in which it differs from what it is composed after; :func:`with_base`
gives the files a recipe or overlay runs with, in order.
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
    module's defaults). ``# authors variant of: recipes/x.yaml`` marks a paper's own training
    settings (recipes/authors/), which comparisons do not use, and ``# paper scale of: a.yaml b.yaml``
    a paper's scale (configs/repro/): both are overlays of the files they name.
    """

    path: str
    control: str | None
    method_keys: tuple[str, ...]
    authors_of: str | None = None
    paper_scale_of: tuple[str, ...] = ()

    @property
    def base(self) -> tuple[str, ...]:
        """The files this overlay is composed after, in order (``()`` for a recipe that runs alone)."""
        return (self.authors_of,) if self.authors_of else self.paper_scale_of


def recipe_header(path: str | Path, root: Path | None = None) -> RecipeHeader:
    """Parse the ``# control:`` / ``# method keys:`` / ``# authors variant of:`` / ``# paper scale of:``
    header lines."""
    p = Path(path)
    p = p if p.is_absolute() or root is None else root / p
    fields: dict[str, str] = {}
    for line in p.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key in ("control", "method keys", "authors variant of", "paper scale of"):
            fields[key] = value.strip()
    control = fields.get("control")
    return RecipeHeader(
        path=str(path),
        control=None if control in (None, "", "none") else control,
        method_keys=tuple(fields.get("method keys", "").split()),
        authors_of=fields.get("authors variant of"),
        paper_scale_of=tuple(fields.get("paper scale of", "").split()),
    )


def with_base(path: str | Path, root: Path | None = None) -> tuple[str, ...]:
    """The config files ``path`` runs with, in the order they are composed: what its header says it
    overlays (relative to ``root``), then ``path`` itself."""
    return (*recipe_header(path, root).base, str(path))


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
