"""Every recipe runs a few real steps through LightningCLI on the tiny model, with metric sanity,
plus config round-trips, bad-config errors and resume from a mid-run checkpoint."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch

from components.cli import build_cli, main
from components.policy import load_policy
from tests.runs import ROOT, SMALL, metrics_of

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CORE_METRICS = [
    "gate/open_frac",
    "gate/all_zero_frac",
    "gate/all_one_frac",
    "signal/adv_energy",
    "budget/rollouts",
    "budget/tokens",
    "budget/rollouts_in_loss",
    "budget/tokens_in_loss",
    "budget/cum_rollouts",
    "budget/cum_tokens",
    "reward/mean",
    "eval/pass_at_1",
    "train/never_solved_frac",
    "loss/policy",
    "loss/kl",
    "policy/entropy",
    "policy/clip_frac",
    "time/generate_s",
    "time/update_s",
]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_smoke(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {k: v.clone() for k, v in load_policy("embedded:tiny")[0].state_dict().items()}
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.max_steps", "3", *SMALL])
    assert cli.trainer.global_step == 3
    after = cli.model.policy.state_dict()
    m = metrics_of(tmp_path / "mlflow.db")
    # RunGuard leaves the policy untouched on a step whose every group is degenerate (e.g. the
    # reasoning regime on the embedded model, which never solves it): only then may nothing change.
    all_degenerate = m.get("train/degenerate_step") == [1.0, 1.0, 1.0]
    assert all_degenerate or any(not torch.equal(before[k], after[k]) for k in before), "parameters did not change"
    # (a run whose every step was skipped took no update, so it has no loss/ or policy/ metrics)
    missing = [k for k in CORE_METRICS if k not in m and not (all_degenerate and k.startswith(("loss/", "policy/")))]
    assert not missing, f"metrics missing from the MLflow store: {missing}"
    for k in ("loss/policy", "reward/mean", "eval/pass_at_1", "signal/adv_energy", "budget/cum_tokens"):
        assert all(math.isfinite(v) for v in m.get(k, [])), k
    assert all(0 <= v <= 1 for v in m["eval/pass_at_1"] + m["gate/open_frac"])
    assert m["budget/cum_rollouts"][-1] >= m["budget/rollouts_in_loss"][-1] > 0 or m["gate/open_frac"][-1] == 0
    (exported,) = (tmp_path / "outputs").glob("*/final_policy/model.safetensors")  # one folder per run
    con = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(con.execute("select key, value from params"))
    tags = dict(con.execute("select key, value from tags"))
    assert params["model/sampler/class_path"].startswith("components.samplers")
    assert tags["recipe"] == recipe.stem


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_print_config_round_trips(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe), "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("overlay", [c for c in CONFIGS if c.stem in ("cpu-tiny",)], ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_overlay_composes(overlay, recipe, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(overlay), "--config", str(recipe), "--print_config"])
    out = capsys.readouterr().out
    assert "embedded:tiny" in out or "embedded:reasoning" in out  # the reasoning regime's recipes ship their model


@pytest.mark.parametrize("overlay", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_overlay_parses_with_grpo(overlay, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(overlay), "--config", str(ROOT / "recipes" / "grpo.yaml"), "--print_config"])
    assert "model:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, field",
    [
        (["--model.sampler", "NoSuchSampler"], "model.sampler"),
        (["--model.sampler.group_size", "0"], "model.sampler.group_size"),
        (["--model.advantage.name", "nope"], "model.advantage.name"),
        (["--model.loss.agg", "mean"], "model.loss.agg"),
        (["--model.sampling.temperature", "hot"], "model.sampling.temperature"),
        (["--model.no_such_field", "1"], "no_such_field"),
        (["--data.tasks", "[]"], "data.tasks"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(args, field, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and err[0].startswith("curate-rl: config error:")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_continues_at_the_right_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(ROOT / "recipes" / "grpo.yaml"),
        *SMALL,
        "--checkpoint.every_n_train_steps",
        "2",
        "--model.eval.at_start",
        "false",
    ]
    first = build_cli([*args, "--trainer.max_steps", "2"])
    per_step = first.model.cumulative["rollouts"] / 2
    hist_total = sum(n for n, _ in first.model.prompt_history.values())
    (ckpt,) = (tmp_path / "checkpoints").glob("*/last.ckpt")  # one folder per run
    second = build_cli([*args, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)])
    assert second.trainer.global_step == 4
    # cumulative budget and per-prompt history were restored, then grew by exactly two steps
    assert second.model.cumulative["rollouts"] == pytest.approx(4 * per_step)
    assert sum(n for n, _ in second.model.prompt_history.values()) == 2 * hist_total


def test_ppo_epochs_minibatches_and_kl_are_real(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "grpo.yaml"),
            *SMALL,
            "--trainer.max_steps",
            "2",
            "--model.ppo_epochs",
            "2",
            "--model.num_minibatches",
            "2",
            "--model.loss.kl_coef",
            "0.1",
            "--model.loss.entropy_coef",
            "0.01",
            "--model.micro_batch_rows",
            "5",
            "--model.optimizer",
            "torch.optim.AdamW",
            "--model.optimizer.lr",
            "1e-3",
        ]
    )
    assert cli.trainer.global_step == 2
    m = metrics_of(tmp_path / "mlflow.db")
    # old log-probs were kept: after the first mini-batch update the ratio moves away from 1
    assert any(abs(v - 1) > 1e-4 for v in m["policy/ratio_mean"])
    # the frozen reference differs from the policy after the first step
    assert m["loss/kl"][-1] > 0
    assert cli.model.ref_policy is not None


def test_step_with_no_group_in_the_loss_still_counts_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {k: v.clone() for k, v in load_policy("embedded:tiny")[0].state_dict().items()}
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "grpo.yaml"),
            *SMALL,
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks+=components.callbacks.base.ZeroVarianceFilter",
            "--trainer.callbacks.min_std",
            "10",
        ]
    )
    assert cli.trainer.global_step == 2
    after = cli.model.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    m = metrics_of(tmp_path / "mlflow.db")
    assert m["filter/dropped_frac"] == [1.0, 1.0] and m["budget/rollouts_in_loss"] == [0.0, 0.0]


def test_skipping_zero_advantage_rows_gives_the_same_update(tmp_path, monkeypatch):
    params = []
    for skip in ("true", "false"):
        monkeypatch.chdir(tmp_path)
        d = tmp_path / skip
        d.mkdir()
        monkeypatch.chdir(d)
        cli = build_cli(
            [
                "fit",
                "--config",
                str(ROOT / "recipes" / "grpo.yaml"),
                *SMALL,
                "--trainer.max_steps",
                "1",
                "--model.eval.at_start",
                "false",
                "--model.skip_zero_advantage",
                skip,
                # Plain SGD: the update is the gradient itself. Adam's first step is ~lr * sign(g),
                # blind to a wrong loss scale and over-sensitive to float noise in near-zero grads.
                "--model.optimizer",
                "torch.optim.SGD",
                "--model.optimizer.lr",
                "1.0",
                # One update: later updates would compare two different (exactly equivalent) float
                # paths after an lr-1 SGD step, which amplifies reduction-order noise past atol.
                "--model.num_minibatches",
                "1",
            ]
        )
        m = metrics_of(d / "mlflow.db")
        assert 0 < m["budget/rollouts_nonzero_adv"][0] < m["budget/rollouts_in_loss"][0]  # some rows were skippable
        params.append({k: v.clone() for k, v in cli.model.policy.state_dict().items()})
    assert all(torch.allclose(params[0][k], params[1][k], atol=1e-6) for k in params[0])


def test_all_zero_advantages_skip_the_update_and_still_count(tmp_path, monkeypatch):
    # Effectively greedy sampling (temperature 0 is refused for training rollouts; a tiny top_p
    # keeps only the most likely token): every rollout of a prompt is the same, every advantage zero.
    monkeypatch.chdir(tmp_path)
    before = {k: v.clone() for k, v in load_policy("embedded:tiny")[0].state_dict().items()}
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "grpo.yaml"),
            *SMALL,
            "--trainer.max_steps",
            "2",
            "--model.sampling.top_p",
            "1e-9",
        ]
    )
    assert cli.trainer.global_step == 2
    assert all(torch.equal(before[k], v) for k, v in cli.model.policy.state_dict().items())
    m = metrics_of(tmp_path / "mlflow.db")
    # every group degenerate: RunGuard skips the step's update and says so
    assert m["budget/rollouts_nonzero_adv"] == [0.0, 0.0] and m["train/degenerate_step"] == [1.0, 1.0]


REPRO = sorted((ROOT / "configs" / "repro").glob("*.yaml"))


@pytest.mark.parametrize("repro", REPRO, ids=[p.stem for p in REPRO])
def test_paper_scale_configs_compose_with_the_gpu_overlay(repro, capsys):
    """configs/repro/<method>.yaml (the paper's model, batch, group size, mini-batch, lr, lengths, KL)
    print composed after configs/gpu-1x.yaml and the method's recipe (their header's ``paper scale
    of``); they are never run here (no GPU, no hub)."""
    import yaml

    from components.analysis.recipe_header import with_base

    configs = with_base(repro, ROOT)
    assert configs[0] == "configs/gpu-1x.yaml" and configs[1].startswith("recipes/"), configs
    with pytest.raises(SystemExit):
        main(["fit", *(a for p in configs for a in ("--config", str(ROOT / p))), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert "/" in cfg["model"]["model"] and cfg["model"]["model"] != "Qwen/Qwen2.5-0.5B-Instruct"  # the paper's hub id
    assert cfg["model"]["engine"]["class_path"].endswith("VLLMEngine")  # the overlay's engine is kept
    assert cfg["model"]["optimizer"]["init_args"]["lr"] <= 5e-6
    assert cfg["model"]["sampler"]["class_path"].startswith("components.samplers.")
    assert cfg["data"]["batch_size"] >= 1 and cfg["model"]["num_minibatches"] >= 1
