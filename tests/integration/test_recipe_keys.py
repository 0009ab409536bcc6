"""Fair comparisons: every recipe runs on the shared base (the module's defaults) and differs from its
matched control only in the keys its header declares as the method's.

A recipe's header names its control (``# control: recipes/x.yaml``) and its method keys
(``# method keys: model.sampler model.advantage``); the resolved configs (``--print_config``) of a
recipe and its control may differ only under those keys (the recipe's or the control's own).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components.analysis.config_diff import differences_outside, flatten, under_any
from components.analysis.recipe_header import RecipeHeader, controls_by_name, recipe_header, with_base, with_controls
from tests.runs import ROOT, resolved

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
AUTHORS = sorted((ROOT / "recipes" / "authors").glob("*.yaml"))
def _config(*paths: Path) -> dict:
    return resolved(*paths)  # cached for the session (tests/runs.py)


def _header(path: Path | str) -> RecipeHeader:
    return recipe_header(path, ROOT)


def _composed(overlay: Path) -> dict:
    """The config of an overlay (an authors variant) composed after what its header names."""
    return _config(*(ROOT / p for p in with_base(overlay, ROOT)))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_differs_from_its_control_only_in_method_keys(recipe):
    h = _header(recipe)
    assert h.method_keys, f"{recipe.name}: no '# method keys:' header line"
    control = ROOT / (h.control or "recipes/grpo.yaml")
    assert control.is_file(), f"{recipe.name}: control {h.control} does not exist"
    allowed = h.method_keys + _header(control).method_keys
    diff = differences_outside(_config(recipe), _config(control), allowed)
    assert not diff, f"{recipe.name} differs from its control {control.name} outside its method keys: {diff}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_method_keys_are_all_that_differs_from_the_shared_base(recipe):
    """The shared base is the module's defaults: a recipe overrides nothing else (no lr, no clip,
    no schedule), so any two recipes of a comparison differ only in their method keys."""
    h = _header(recipe)
    chain = [h]
    while chain[-1].control is not None:  # the control's own method keys are the control's method
        chain.append(_header(ROOT / chain[-1].control))
    allowed = [k for x in chain for k in x.method_keys]
    base = _config(ROOT / "recipes" / "grpo.yaml")
    diff = differences_outside(_config(recipe), base, allowed + list(_header(ROOT / "recipes/grpo.yaml").method_keys))
    assert not diff, f"{recipe.name} sets keys outside the method keys of itself and its controls: {diff}"


def test_the_check_fails_when_a_recipe_changes_a_shared_setting(tmp_path):
    """A copy of grpo_n4.yaml with its own learning rate and aggregation is flagged on exactly those."""
    text = (ROOT / "recipes" / "grpo_n4.yaml").read_text()
    text += "  loss:\n    agg: token-mean\n  optimizer:\n    class_path: torch.optim.AdamW\n    init_args:\n      lr: 3.0e-4\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    h = _header(bad)
    diff = differences_outside(_config(bad), _config(ROOT / "recipes" / "grpo.yaml"), h.method_keys)
    assert "model.loss.agg" in diff and any(k.startswith("model.optimizer") for k in diff)
    assert not any(k.startswith("model.sampler") for k in diff)


def test_every_comparison_control_of_the_issue_exists():
    expected = {
        "ada_seq": "grpo_n4",  # GRPO n=4 on the same prompts
        "ada_seq_pos": "grpo_n4",
        "ada_est": "grpo",  # GRPO at the same total rollouts (8 x prompts)
        "pods": "grpo",  # GRPO with n = m = 8
        "dapo": "grpo_dapo",  # GRPO with DAPO's clip and aggregation
        "dynamo": "grpo",  # GRPO with G = rollouts_per_prompt = 8
        "dynamo_alloc": "grpo",
        "sage": "grpo",  # GRPO at the same G without hints
        "dr_grpo": "grpo",
    }
    controls = controls_by_name([str(r) for r in RECIPES], ROOT)
    for recipe, ctl in expected.items():
        assert controls[recipe] == ctl, recipe
    # GVM's control is RAFT++ once it exists, else GRPO.
    assert controls["gvm"] in ("raftpp", "grpo")
    assert with_controls(["recipes/ada_seq.yaml", "recipes/pods.yaml"], ROOT) == [
        "recipes/grpo_n4.yaml",
        "recipes/ada_seq.yaml",
        "recipes/grpo.yaml",
        "recipes/pods.yaml",
    ]


@pytest.mark.parametrize("variant", AUTHORS, ids=[r.stem for r in AUTHORS])
def test_authors_variants_keep_the_method_and_change_only_training_settings(variant):
    h = _header(variant)
    assert h.authors_of, f"{variant.name}: no '# authors variant of:' header line"
    recipe = ROOT / h.authors_of
    keys = _header(recipe).method_keys
    mine, theirs = flatten(_composed(variant)), flatten(_config(recipe))
    for k in set(mine) | set(theirs):
        if under_any(k, keys) and not k.startswith("model.loss"):
            assert mine.get(k) == theirs.get(k), f"{variant.name} changes the method key {k}"
    assert mine != theirs, f"{variant.name} changes nothing"


def test_gvm_authors_variant_uses_the_authors_clip():
    cfg = flatten(_composed(ROOT / "recipes" / "authors" / "gvm.yaml"))
    assert (cfg["model.loss.clip_low"], cfg["model.loss.clip_high"], cfg["model.loss.dual_clip"]) == (0.2, 0.2, 3.0)
    assert cfg["model.loss.kl_coef"] == pytest.approx(1e-3)


def test_shared_base_takes_several_updates_per_generation_batch():
    cfg = flatten(_config(ROOT / "recipes" / "grpo.yaml"))
    assert cfg["model.ppo_epochs"] * cfg["model.num_minibatches"] >= 2
