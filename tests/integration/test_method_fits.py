"""Each method through the real CLI: a few steps of its recipe on the embedded default, its metrics logged."""

from __future__ import annotations

import sqlite3

import pytest

from components.callbacks.token_modulation import DynaMOModulation
from components.cli import build_cli
from tests.runs import ROOT, SMALL, metrics_of


def test_sage_recipe_runs_with_hints_in_training_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "sage.yaml"
    cli = build_cli(["fit", "--config", str(recipe), *SMALL, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    m = metrics_of(tmp_path / "mlflow.db")
    # The embedded mix has an impossible 3-digit slice: some groups always fail and get hinted.
    assert sum(m["hint/prompts_with_hint"]) > 0 and sum(m["hint/used_level_1"]) > 0
    assert all(0 <= v <= 1 for v in m["eval/pass_at_1"])
    con = sqlite3.connect(tmp_path / "mlflow.db")
    assert (
        dict(con.execute("select key, value from params"))["model/sampler/class_path"] == "components.samplers.sage.SAGESampler"
    )


def test_dynamo_recipe_modulates_and_logs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "dynamo.yaml"
    cli = build_cli(["fit", "--config", str(recipe), *SMALL, "--trainer.max_steps", "2", "--model.eval.at_start", "false"])
    assert any(isinstance(cb, DynaMOModulation) for cb in cli.trainer.callbacks)
    m = metrics_of(tmp_path / "mlflow.db")
    assert len(m["dynamo/factor_mean"]) == 2
    assert all(0.6 <= v <= 1.2 for v in m["dynamo/factor_mean"] + m["dynamo/stab_min"] + m["dynamo/comp_mean"])


def test_dynamo_micro_batch_form_runs_inside_the_update_with_the_real_ratio(tmp_path, monkeypatch):
    """Through the CLI: the hook runs in every micro-batch of every mini-batch update, and after the
    first update of a generation batch it sees ratios different from 1."""
    from components.callbacks.token_modulation import DynaMOModulation
    from components.cli import build_cli
    from tests.runs import ROOT, SMALL, metrics_of

    seen: list[float] = []
    orig = DynaMOModulation.on_micro_batch

    def spy(self, logp, old_logp, entropy, advantages, mask, module):
        seen.append(float(((logp - old_logp).abs() * mask).max()))
        return orig(self, logp, old_logp, entropy, advantages, mask, module)

    monkeypatch.setattr(DynaMOModulation, "on_micro_batch", spy)
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "authors_mod.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: components.callbacks.token_modulation.DynaMOModulation\n"
        "      init_args:\n        where: micro_batch\nmodel:\n  skip_zero_advantage: false\n  num_minibatches: 4\n"
    )
    args = ["fit", "--config", str(ROOT / "recipes" / "dynamo.yaml"), "--config", str(overlay), *SMALL]
    build_cli([*args, "--trainer.max_steps", "1", "--model.eval.at_start", "false"])
    assert len(seen) >= 4  # one call per forwarded micro-batch of each of the 4 updates
    assert seen[0] == 0.0 and max(seen[1:]) > 0  # first update: ratio 1; later ones: the real ratio
    m = metrics_of(tmp_path / "mlflow.db")
    assert all(0.6 <= v <= 1.2 for v in m["dynamo/factor_mean"])


def test_cost_axes_and_logprob_gap_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), *SMALL, "--trainer.max_steps", "2"]
    build_cli([*args, "--model.num_minibatches", "2", "--model.loss.tis_cap", "2.0", "--model.eval.at_start", "false"])
    m = metrics_of(tmp_path / "mlflow.db")
    assert m["budget/cum_optimizer_steps"] == [2.0, 4.0]
    assert m["time/cum_train_s"][1] > m["time/cum_train_s"][0] > 0
    fwd = m["budget/tokens_forwarded"]
    # generation forwards contexts + new tokens; old log-probs and the update forward the batch again
    assert all(f > t for f, t in zip(fwd, m["budget/tokens"])) and m["budget/cum_tokens_forwarded"][-1] == pytest.approx(sum(fwd))
    # the HF engine samples with the policy itself: its log-probs are the trainer's
    assert max(m["rollout/logprob_gap_max"]) < 1e-4
    assert all(0.99 < w <= 1.0 + 1e-6 for w in m["rollout/tis_weight_mean"])
