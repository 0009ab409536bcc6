"""Overlays hold only what differs: ``recipes/authors/x.yaml`` (header ``# authors variant of:
recipes/x.yaml``) and ``configs/repro/x.yaml`` (header ``# paper scale of: configs/gpu-1x.yaml
recipes/x.yaml``) each compose after the files their header names, resolve, and set no key to the
value it already has there.

Configs resolve in-process (``tests.runs.resolved``: ``resolved_config``, what ``--print_config``
prints, cached for the test session), a fraction of a second each.
"""

from __future__ import annotations

import pytest
import yaml

from components.analysis.config_diff import flatten
from components.analysis.recipe_header import recipe_header, with_base
from tests.runs import ROOT, resolved

OVERLAYS = sorted((ROOT / "recipes" / "authors").glob("*.yaml")) + sorted((ROOT / "configs" / "repro").glob("*.yaml"))


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [loader.construct_object(k) for k, _ in node.value]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"keys given twice in one mapping (only the last counts): {twice}")
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[f"{p.parent.name}/{p.stem}" for p in OVERLAYS])
def test_overlay_composes_after_its_base_and_sets_only_what_differs(overlay):
    base = recipe_header(overlay, ROOT).base
    assert base, f"{overlay.name}: no '# authors variant of:' or '# paper scale of:' header line"
    assert all((ROOT / p).is_file() for p in base), f"{overlay.name}: its header names missing files {base}"
    assert with_base(overlay, ROOT) == (*base, str(overlay))
    own = flatten(yaml.load(overlay.read_text(), Loader=_StrictLoader))
    assert own, f"{overlay.name} sets nothing"
    before = flatten(resolved(*(ROOT / p for p in base)))
    after = flatten(resolved(*(ROOT / p for p in base), overlay))
    same = sorted(k for k in own if after.get(k) == before.get(k))
    assert not same, f"{overlay.name} sets keys to the value they already have after {list(base)}: {same}"
    for key, value in own.items():
        assert key in after, f"{overlay.name}: {key} is not a key of the resolved config"
        if not isinstance(value, list):  # a list resolves with its items' defaults filled in
            assert after[key] == value, f"{overlay.name}: {key} = {value!r} resolved to {after[key]!r}"
