"""The README and docs/ stay true to the repository.

- every recipe (``recipes/...yaml``), config overlay (``configs/...yaml``) and script (``scripts/...py``)
  the pages name exists (``{a,b}`` shell braces are expanded);
- every relative markdown link resolves to an existing file, and its ``#anchor`` to a heading of the
  linked page (GitHub's heading slugs);
- every documented ``curate-rl fit`` command resolves with ``--print_config``;
- the README stays short (the issue's 300 lines) and every row of its recipe table names a recipe
  that exists (a new recipe needs no README edit to pass: adding a method is a code file, a recipe,
  a claims entry and a test; its README row follows when it is ready for users).

Placeholders are skipped, not guessed: a path or a command with ``<name>``-style or ``NAME``-style
placeholders, shell variables (``$X``) or ``...`` is not checked. ``--ckpt_path`` is dropped from a
command before it is resolved (a run-time file; ``--print_config`` does not read it).

Commands resolve in-process through ``components.cli.main`` (what ``--print_config`` on the command
line does, and what ``resolved_config`` of the ablation runner calls), about 0.3 s each after the
first import, from a temporary working directory so that nothing is written into the repository.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
# A recipe, overlay or script path as the pages write it (optionally with shell braces).
PATH = re.compile(r"(?<![\w./-])((?:recipes|configs|scripts)/[\w./{},<>-]*?\.(?:yaml|py))(?![\w.])")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FIT = re.compile(r"(?:\bcurate-rl|\bcomponents\.cli) fit\b(.*)")
INLINE_CODE = re.compile(r"`([^`]+)`")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _split(page: Path) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, inside = [], [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return prose, code


def _expand_braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(text[: m.start()] + alt + text[m.end() :])]


def _placeholder(text: str) -> bool:
    return "<" in text or "$" in text or "..." in text or bool(re.search(r"(?<![\w-])[A-Z][A-Z_]+(?![\w-])", text))


def _named_paths() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        for path in PATH.findall(page.read_text(encoding="utf-8")):
            for p in _expand_braces(path):
                if not _placeholder(p):
                    found.add((_rel(page), p))
    return sorted(found)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _split(page)[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = _slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        for line in _split(page)[0]:
            for target in LINK.findall(line):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    found.add((_rel(page), target))
    return sorted(found)


def _fit_commands() -> list[tuple[str, tuple[str, ...]]]:
    """(page, fit arguments) for every ``curate-rl fit`` command in a code block or an inline code span,
    continuation lines joined, comments and placeholder commands dropped, duplicates removed."""
    texts: list[tuple[str, str]] = []
    for page in PAGES:
        prose, code = _split(page)
        joined = "\n".join(code).replace("\\\n", " ")
        texts += [(_rel(page), line) for line in joined.splitlines()]
        for line in prose:
            texts += [(_rel(page), span) for span in INLINE_CODE.findall(line) if FIT.search(span)]
    found: dict[tuple[str, ...], str] = {}
    for page, text in texts:
        m = FIT.search(text)
        if not m:
            continue
        rest = re.sub(r"\s+#.*$", "", m.group(1)).strip()
        if _placeholder(rest):
            continue
        args = shlex.split(rest)
        clean: list[str] = []
        skip = False
        for a in args:
            if skip:
                skip = False
            elif a == "--ckpt_path":
                skip = True
            elif a.startswith("--ckpt_path=") or a == "--print_config":
                pass
            else:
                clean.append(a)
        if clean:  # a bare `curate-rl fit` is a mention, not a command
            found.setdefault(tuple(clean), page)
    return sorted((page, args) for args, page in found.items())


NAMED_PATHS = _named_paths()
LINKS = _links()
COMMANDS = _fit_commands()


def test_the_pages_exist_and_name_something():
    assert (ROOT / "docs").is_dir() and len(PAGES) >= 5, [str(p) for p in PAGES]
    assert NAMED_PATHS and LINKS and COMMANDS


@pytest.mark.parametrize(("page", "path"), NAMED_PATHS, ids=[f"{pg}:{p}" for pg, p in NAMED_PATHS])
def test_named_recipe_overlay_or_script_exists(page, path):
    assert (ROOT / path).is_file(), f"{page} names {path}, which does not exist"


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{pg}:{t}" for pg, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    source = ROOT / page
    dest = (source.parent / path).resolve() if path else source
    assert dest.exists(), f"{page} links to {target}: {dest} does not exist"
    if anchor and dest.suffix == ".md":
        anchors = _anchors(dest)
        assert anchor in anchors, f"{page} links to {target}: no heading with that anchor in {dest.name}"


def test_readme_is_short_and_its_recipe_table_names_real_recipes():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    rows = {m for m in re.findall(r"^\| `(recipes/[\w-]+\.yaml)` \|", text, flags=re.M)}
    recipes = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml")}
    assert len(rows) >= 10, "the README's recipe table is missing"
    assert not rows - recipes, f"README rows for recipes that do not exist: {sorted(rows - recipes)}"


def _print_config(args: tuple[str, ...]) -> tuple[int, str, str]:
    from components.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["fit", *args, "--print_config"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("page", "args"), COMMANDS, ids=[" ".join(a) for _, a in COMMANDS])
def test_documented_fit_command_resolves(page, args, tmp_path, monkeypatch):
    # Paths are written relative to the repository root; resolve them there, run from a scratch folder.
    args = tuple(str(ROOT / a) if not a.startswith("-") and (ROOT / a).exists() else a for a in args)
    monkeypatch.chdir(tmp_path)
    code, out, err = _print_config(args)
    assert code == 0, f"{page}: curate-rl fit {' '.join(args)} --print_config exited {code}: {err.strip()[-600:]}"
    cfg = yaml.safe_load(out)
    assert isinstance(cfg, dict) and "model" in cfg and "trainer" in cfg, f"{page}: no config printed: {out[:300]}"
    assert not any(tmp_path.iterdir()), f"--print_config wrote {sorted(p.name for p in tmp_path.iterdir())}"
