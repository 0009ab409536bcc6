"""DynaMO in the authors' form (recipes/dynamo_authors.yaml): its own judged row, through the real CLI."""

from __future__ import annotations

from components.analysis.claims import CLAIMS
from components.analysis.recipe_header import recipe_header
from components.callbacks.token_modulation import DynaMOModulation
from components.cli import build_cli
from tests.runs import ROOT, SMALL, metrics_of


def test_the_authors_form_is_its_own_recipe_with_a_claim_and_differs_from_ours_in_two_choices():
    h = recipe_header(ROOT / "recipes" / "dynamo_authors.yaml", ROOT)
    assert h.control == "recipes/grpo.yaml" and h.authors_of is None  # a recipe the sweeps run, not an overlay
    assert CLAIMS["dynamo_authors"][0].delta == CLAIMS["dynamo"][0].delta
    assert CLAIMS["dynamo_authors"][0].premise is not None  # the allocation must leave its warm-up


def test_the_authors_form_modulates_per_micro_batch_and_refreshes_per_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "dynamo_authors.yaml"
    # 8 prompts per step from a pool of 16: an epoch every 2 steps
    cli = build_cli(["fit", "--config", str(recipe), *SMALL, "--data.train_size", "16", "--trainer.max_steps", "4",
                     "--model.eval.at_start", "false"])  # fmt: skip
    (mod,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DynaMOModulation)]
    assert mod.where == "micro_batch" and cli.model.updater.skip_zero_advantage is False
    m = metrics_of(tmp_path / "mlflow.db")
    assert m["dynamo/epochs"][-1] >= 1  # priorities were refreshed from an epoch's snapshot
    assert m["dynamo/exploring_frac"][0] == 1.0 and min(m["dynamo/exploring_frac"]) < 1.0  # warm-up, then priorities
    assert all(0.6 <= v <= 1.2 for v in m["dynamo/factor_mean"])
