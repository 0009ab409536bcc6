"""Regimes through the real CLI: the pre-filter inside a fit, every regime overlay composed with a recipe."""

from __future__ import annotations

import pytest
import yaml

from components.analysis.regimes import REGIMES, build_regime, regime_model_dir
from components.cli import build_cli, main
from components.data.datamodule import ReasoningGymTask
from components.errors import ConfigError
from tests.runs import ROOT


def test_prefilter_runs_inside_a_fit_with_the_run_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), "--config", str(ROOT / "configs" / "regimes" / "filtered.yaml"),
         "--data.prefilter.k", "2", "--data.prefilter.max_solved", "1", "--trainer.max_steps", "1",
         "--data.train_size", "24", "--data.heldout_size", "4", "--data.batch_size", "4", "--model.eval.samples", "1"]
    )  # fmt: skip
    rep = cli.datamodule.prefilter_report
    assert rep is not None and rep.kept == len(cli.datamodule.train_pool) and rep.kept + rep.dropped_low + rep.dropped_high == 24
    assert (tmp_path / rep.cache_file).resolve().parent == (tmp_path / ".cache" / "curate-rl" / "prefilter").resolve()
    assert cli.trainer.global_step == 1


def test_every_regime_has_an_overlay_that_composes_with_a_recipe(capsys):
    assert {p.stem for p in (ROOT / "configs" / "regimes").glob("*.yaml")} == set(REGIMES)
    for name, reg in REGIMES.items():
        overlay = yaml.safe_load(reg.config.read_text())
        if reg.shipped:  # the overlay loads the shipped build, which build_regime returns
            assert overlay["model"]["model"] == reg.shipped == build_regime(name)
        elif reg.warm_start is not None:  # the overlay loads the folder build_regime fills
            assert overlay["model"]["model"] == str(regime_model_dir(name))
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), "--config", str(reg.config), "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        want = overlay["data"]["prefilter"]
        got = printed["data"]["prefilter"]
        assert got == want if want is None else {k: got[k] for k in want} == want
    reasoning = yaml.safe_load(REGIMES["reasoning"].config.read_text())
    assert [ReasoningGymTask(**t) for t in reasoning["data"]["tasks"]] == REGIMES["reasoning"].warm_start.tasks
    assert build_regime("dense") == "embedded:tiny"
    with pytest.raises(ConfigError, match="regime.*valid"):
        build_regime("nope")
