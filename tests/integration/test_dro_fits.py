"""DRO through the real CLI: R3 alone trains and logs its metrics; bad DRO data is one line."""

from __future__ import annotations

import pytest

from components.rewards.r3 import (
    R3Reward,
)
from tests.runs import ROOT

E2E = [
    "--trainer.max_steps", "2",
    "--data.train_size", "40",
    "--data.heldout_size", "8",
    "--data.batch_size", "4",
    "--model.eval.samples", "2",
    "--trainer.val_check_interval", "2",
    "--trainer.enable_progress_bar", "false",
    "--model.log_completions_every_n_steps", "1",
]  # fmt: skip


def test_dro_recipe_trains_on_r3_alone_and_logs_dro_metrics(tmp_path, monkeypatch):
    import sqlite3

    from components.cli import build_cli

    monkeypatch.chdir(tmp_path)
    filt = ["--trainer.callbacks+=components.callbacks.query_filter.OnlineVarianceFilter"]
    cli = build_cli(["fit", "--config", str(ROOT / "recipes" / "dro.yaml"), *E2E, *filt])
    assert cli.trainer.global_step == 2 and isinstance(cli.model.reward, R3Reward)
    con = sqlite3.connect(tmp_path / "mlflow.db")
    m: dict[str, list[float]] = {}
    for k, v in con.execute("select key, value from metrics order by step"):
        m.setdefault(k, []).append(v)
    for k in (
        "dro/r3_mean",
        "dro/r3_verifier_corr",
        "dro/no_marker_frac",
        "dro/filter_stage1_dropped",
        "dro/online_filter_dropped",
    ):
        assert k in m, k
    assert m["dro/filter_rounds"][-1] == 1 and m["dro/filter_cum_tokens_generated"][-1] > 0
    # The training reward is R3 (log-probabilities: negative), never the verifier's 0/1.
    assert all(v < 0 for v in m["reward/mean"])
    assert m["budget/tokens_forwarded"][0] >= m["dro/filter_tokens_forwarded"][0] > 0


@pytest.mark.parametrize(
    "args, field",
    [
        (["--data.tasks", '[{"name": "column_sum", "config": {"digits": 1, "format": "plain"}}]'], "reference_field"),
        (["--model.reward.marker", "→"], "model.reward.marker"),
        # on the 64-position tiny model, prompt + 50 new tokens fit; + marker + reference answer do not
        (["--model.model", "embedded:tiny", "--model.sampling.max_new_tokens", "50"], "model.reward.target"),
    ],
)
def test_bad_dro_data_is_one_line(args, field, tmp_path, monkeypatch, capsys):
    from components.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / "dro_nofilter.yaml"), *E2E, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
