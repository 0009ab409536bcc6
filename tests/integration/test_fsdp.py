"""FSDP2 sharding through Lightning's ModelParallelStrategy, on CPU with gloo (2 processes)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

from tests.runs import ROOT


def test_fsdp2_two_process_fit_and_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "-m",
        "components.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / "fsdp.yaml"),
        "--config",
        str(ROOT / "recipes" / "grpo.yaml"),
        "--data.train_size",
        "80",
        "--data.heldout_size",
        "8",
        "--data.batch_size",
        "4",
        "--model.eval.samples",
        "1",
        "--trainer.val_check_interval",
        "2",
        "--checkpoint.every_n_train_steps",
        "2",
        "--model.log_completions_every_n_steps",
        "0",
    ]
    run = subprocess.run([*base, "--trainer.max_steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (ckpt,) = (tmp_path / "checkpoints").glob("*/last.ckpt")  # a sharded checkpoint (a folder) under FSDP2, one folder per run
    (exported,) = (tmp_path / "outputs").glob("*/final_policy/model.safetensors")  # one folder per run
    again = subprocess.run(
        [*base, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "mlflow.db")
    steps = [s for (s,) in con.execute("select step from metrics where key = 'loss/policy' order by step")]
    assert steps and max(steps) == 2  # steps 0, 1 in the first run, step 2 after resuming
    # Budget metrics are the run's: each of the 2 ranks draws 4 prompts x G=8 = 32 rollouts a step,
    # and the logged count is the sum over ranks (rank 0 alone would log 32).
    drawn = {s: v for s, v in con.execute("select step, value from metrics where key = 'budget/rollouts'")}
    assert set(drawn.values()) == {64.0}, drawn
    cum = dict(con.execute("select step, value from metrics where key = 'budget/cum_rollouts'"))
    assert cum[2] == 3 * 64.0  # the cumulative budget resumed from the checkpoint and kept summing
