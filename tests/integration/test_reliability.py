"""Reliability: exact resume, clean stops, atomic per-run checkpoints, one-line errors for bad
input, reward faults, and (slow) a long run's memory.

Runs use the tiny model with a handful of prompts so each real `curate-rl` start stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.callbacks.checkpoint import AtomicCheckpointIO
from components.cli import build_cli, main
from components.errors import RunAborted
from tests.runs import ROOT

GRPO = str(ROOT / "recipes" / "grpo.yaml")
TINY = [
    "--data.train_size",
    "24",
    "--data.heldout_size",
    "4",
    "--data.batch_size",
    "4",
    "--model.sampler.group_size",
    "4",
    "--model.eval.samples",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--model.log_completions_every_n_steps",
    "0",
    # two mini-batches: the update shuffles rows with torch's RNG, which resume must restore
    "--model.num_minibatches",
    "2",
]

PARTS = '''
"""Rewards for the reliability tests (imported by the test and by `curate-rl` subprocesses)."""
import math
import os
import time
from pathlib import Path

from components.rewards.verifier import VerifierReward


class SlowReward(VerifierReward):
    """The task's verifier; its RELTEST_SLOW_AT-th call touches RELTEST_MARKER and sleeps RELTEST_SLEEP s."""

    calls = 0

    def score(self, prompt, rollouts):
        SlowReward.calls += 1
        at = int(os.environ.get("RELTEST_SLOW_AT", "0"))
        if at and SlowReward.calls == at:
            Path(os.environ["RELTEST_MARKER"]).touch()
            time.sleep(float(os.environ.get("RELTEST_SLEEP", "120")))
        super().score(prompt, rollouts)


class FaultyReward(VerifierReward):
    """The task's verifier, but every ``every``-th prompt raises (``fault=raise``) or gets NaN rewards."""

    def __init__(self, fault: str = "raise", every: int = 1) -> None:
        super().__init__()
        self.fault, self.every, self.n = fault, every, 0

    def score(self, prompt, rollouts):
        super().score(prompt, rollouts)
        self.n += 1
        if self.n % self.every == 0:
            if self.fault == "raise":
                raise ValueError("the grader crashed")
            for r in rollouts:
                r.reward = math.nan


class ConstReward(VerifierReward):
    """Every rollout passes: every group is degenerate."""

    def score(self, prompt, rollouts):
        for r in rollouts:
            r.reward, r.passed = 1.0, True
'''


@pytest.fixture
def parts(tmp_path, monkeypatch):
    d = tmp_path / "parts"
    d.mkdir()
    (d / "relparts.py").write_text(PARTS)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(d), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for k in ("RELTEST_SLOW_AT", "RELTEST_MARKER", "RELTEST_SLEEP"):
        monkeypatch.delenv(k, raising=False)
    sys.modules.pop("relparts", None)
    return d


def _params(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"parameters differ (max abs): {diff}"


def _runs(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    out = [s for (s,) in con.execute("select status from runs order by start_time")]
    con.close()
    return out


def _metric(db: Path, key: str) -> list[float]:
    con = sqlite3.connect(db)
    out = [v for (v,) in con.execute("select value from metrics where key = ? order by step", (key,))]
    con.close()
    return out


def _cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


# ---- exact resume ---------------------------------------------------------------------------
def test_resume_from_a_periodic_checkpoint_is_exact(tmp_path, monkeypatch):
    """Steps 1-4 at once, and steps 1-2 then 3-4 from the step-2 checkpoint: identical weights.
    The held-out evaluation at step 2 (which the resumed run does not repeat) and the one-ahead
    prefetch of the prompt stream must not shift anything."""
    args = ["fit", "--config", GRPO, *TINY, "--checkpoint.every_n_train_steps", "2"]
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ref = _params(build_cli([*args, "--trainer.max_steps", "4"]))
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    build_cli([*args, "--trainer.max_steps", "2"])
    (ckpt,) = (tmp_path / "b" / "checkpoints").glob("*/last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 2 and "rng" in state["curate_rl"]
    resumed = build_cli([*args, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 4
    _assert_same(ref, _params(resumed))
    # each run has its own checkpoint folder; no "-v1" files next to a stale last.ckpt
    folders = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert len(folders) == 2 and not list((tmp_path / "b" / "checkpoints").rglob("*-v1.ckpt"))


@pytest.mark.parametrize(
    "sig, sleep, code, abandoned",
    [(signal.SIGTERM, 120.0, 143, True), (signal.SIGINT, 4.0, 130, False)],
    ids=["sigterm-abandons-a-long-step", "sigint-finishes-a-short-step"],
)
def test_stop_signal_checkpoints_marks_killed_and_resumes_exactly(parts, tmp_path, monkeypatch, sig, sleep, code, abandoned):
    """A real `curate-rl` run gets a signal in step 3 (its reward is slow there). A step longer than
    half the grace period is abandoned and rolled back (the checkpoint is at step 2); a short one
    finishes (checkpoint at step 3). Either way the exit code is 128 + signal, the MLflow run is
    KILLED, and resuming gives the uninterrupted run's weights bit for bit."""
    args = ["fit", "--config", GRPO, *TINY, "--model.reward", "relparts.SlowReward", "--trainer.max_steps", "5"]
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    marker = tmp_path / "in_step_3"
    env = {**_cli_env(), "RELTEST_SLOW_AT": "18", "RELTEST_MARKER": str(marker), "RELTEST_SLEEP": str(sleep)}
    # one score() call per prompt: 4 held-out at start, 4 per step, 4 held-out after step 2: call 18 is in step 3
    proc = subprocess.Popen(
        [sys.executable, "-m", "components.cli", *args, "--guard.grace_period_s", "8", "--checkpoint.every_n_train_steps", "100"],
        cwd=run_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 300, "the run never reached step 3"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    (ckpt,) = (run_dir / "checkpoints").glob("*/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == (2 if abandoned else 3)
    assert _runs(run_dir / "mlflow.db") == ["KILLED"]

    monkeypatch.chdir(tmp_path)
    resumed = _params(build_cli([*args, "--ckpt_path", str(ckpt)]))
    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path / "ref")
    _assert_same(_params(build_cli(args)), resumed)


def test_resume_of_a_different_recipe_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "curate_rl_identity": {"model.sampler": "DynamicSampling"}}, ckpt)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", GRPO, *TINY, "--ckpt_path", str(ckpt)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.sampler=DynamicSampling" in err and "FixedGroupSampler" in err and "force_resume" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_atomic_checkpoint_write_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_keep_last_k_bounds_the_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", GRPO, *TINY, "--trainer.max_steps", "5", "--model.eval.at_start", "false"]
    build_cli(
        [*args, "--checkpoint.every_n_train_steps", "1", "--checkpoint.keep_last_k", "2", "--trainer.val_check_interval", "100"]
    )
    (folder,) = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]


# ---- faults during training -----------------------------------------------------------------
def test_reward_that_raises_fails_the_rollout_and_stops_past_the_limit(parts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", GRPO, *TINY, "--trainer.max_steps", "3", "--model.eval.at_start", "false"]
    # every 4th prompt raises: 25% of rollouts, tolerated under a 30% limit
    cli = build_cli(
        [*args, "--model.reward", "relparts.FaultyReward", "--model.reward.every", "4", "--guard.max_reward_error_share", "0.3"]
    )
    assert cli.trainer.global_step == 3
    assert _metric(tmp_path / "mlflow.db", "reward/errors") == [4.0, 4.0, 4.0]
    # ... and past the default 5% limit the run stops with one line, the MLflow run FAILED
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main([*args, "--model.reward", "relparts.FaultyReward", "--model.reward.every", "4"])
    assert e.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("curate-rl: run aborted: reward: 4 of 16 rollouts (25%) raised") and "the grader crashed" in last
    assert _runs(tmp_path / "b" / "mlflow.db") == ["FAILED"]


def test_nan_reward_is_counted_and_stops_the_run(parts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunAborted, match="NaN"):
        build_cli(
            ["fit", "--config", GRPO, *TINY, "--trainer.max_steps", "3", "--model.eval.at_start", "false"]
            + ["--model.reward", "relparts.FaultyReward", "--model.reward.fault", "nan", "--model.reward.every", "2"]
        )
    assert _metric(tmp_path / "mlflow.db", "reward/nan") == [8.0]


def test_degenerate_steps_are_skipped_and_an_idle_run_is_stopped(parts, tmp_path, monkeypatch):
    """Every rollout passes: no step trains (even with a KL term, which alone would move the
    policy), each is logged as degenerate, and the idle limit stops the run when configured."""
    monkeypatch.chdir(tmp_path)
    before = None
    args = ["fit", "--config", GRPO, *TINY, "--model.eval.at_start", "false", "--model.reward", "relparts.ConstReward"]
    args += ["--model.loss.kl_coef", "0.1", "--model.loss.entropy_coef", "0.01"]
    cli = build_cli([*args, "--trainer.max_steps", "2"])
    from components.policy import load_policy

    before = load_policy("embedded:tiny")[0].state_dict()
    _assert_same(before, _params(cli))
    assert _metric(tmp_path / "mlflow.db", "train/degenerate_step") == [1.0, 1.0]
    assert _metric(tmp_path / "mlflow.db", "guard/idle_steps") == [1.0, 2.0]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(RunAborted, match="nothing has trained for 2 steps"):
        build_cli([*args, "--trainer.max_steps", "5", "--guard.max_idle_steps", "2", "--guard.idle_error", "true"])


# ---- bad input: one line, exit 2, nothing written ------------------------------------------
def _bad_inputs(d: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (extra arguments, text the error line must contain)."""
    (d / "broken.jsonl").write_text('{"prompt": "1+1 =", "answer": "2"}\n{"prompt": "2+2 =", "answer": \n')
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9 =", "answer": "1"}\n'.encode("latin-1"))
    (d / "fields.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1 =", "solution": str(i + 1)}) + "\n" for i in range(10)))
    (d / "long.jsonl").write_text(
        "".join(json.dumps({"prompt": ("1+" * (40 if i == 3 else 2)) + "1 =", "answer": "1"}) + "\n" for i in range(10))
    )
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text('{"model_type": "llama", ')
    torch.save({"state_dict": {}, "curate_rl_identity": {"model.sampler": "DynamicSampling"}}, d / "other.ckpt")

    def files(name: str, **kw) -> list[str]:
        return ["--data.files", json.dumps([{"path": str(d / name), "heldout_fraction": 0.2, **kw}])]

    readonly = "/proc/curate-rl-test" if os.geteuid() == 0 else str(d / "readonly" / "ckpts")
    if os.geteuid() != 0:
        (d / "readonly").mkdir()
        (d / "readonly").chmod(0o555)
    return {
        "malformed-jsonl": (files("broken.jsonl"), "broken.jsonl line 2 is not valid JSON"),
        "non-utf8": (files("latin1.jsonl"), "latin1.jsonl line 1 is not UTF-8"),
        "missing-answer-field": (files("fields.jsonl"), "data.files.answer_field"),
        "negative-lr": (["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr=-1e-4"], "Invalid learning rate"),
        "zero-lr": (["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0"], "init_args.lr: must be > 0"),
        "missing-model": (["--model.model", str(d / "no" / "such" / "model")], "neither an existing folder nor a hub id"),
        "uncached-hub-id": (["--model.model", "nobody/no-such-model"], "HF_HUB_OFFLINE"),
        "corrupt-config-json": (["--model.model", str(d / "badmodel")], "config.json is not valid JSON"),
        "missing-ckpt": (["--ckpt_path", str(d / "nope.ckpt")], "ckpt_path:"),
        "other-recipe-ckpt": (["--ckpt_path", str(d / "other.ckpt")], "model.sampler=DynamicSampling"),
        "read-only-output": (["--checkpoint.dirpath", readonly], "checkpoint.dirpath"),
        "prompt-too-long": (files("long.jsonl"), "1 of 10 prompts do not fit"),
        "impossible-budget": (
            ["--model.sampler", "components.samplers.ada_est.AdaEstSampler", "--model.sampler.budget", "2"],
            "model.sampler.budget",
        ),
        "greedy-training": (["--model.sampling.temperature", "0"], "model.sampling.temperature"),
    }


BAD_CASES = [
    "malformed-jsonl",
    "non-utf8",
    "missing-answer-field",
    "negative-lr",
    "zero-lr",
    "missing-model",
    "uncached-hub-id",
    "corrupt-config-json",
    "missing-ckpt",
    "other-recipe-ckpt",
    "read-only-output",
    "prompt-too-long",
    "impossible-budget",
    "greedy-training",
]


def _run_cli_forked(args: list[str], cwd: Path, err_path: Path) -> int:
    """Run the ``curate-rl`` entry point (``components.cli:main``) in a forked child process.

    The child has its own working directory, stdout/stderr and exit status, exactly as the
    console script; only the interpreter start and the imports (about 10 s of CPU, mostly torch
    and Lightning) are inherited from this process, which keeps the battery cheap.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.argv = ["curate-rl", *args]
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra, expect = _bad_inputs(inputs)[case]
    run = tmp_path / "run"
    run.mkdir()
    args = ["fit", "--config", GRPO, "--data.train_size", "8", "--data.heldout_size", "2", *extra]
    if case == "greedy-training":  # one case through the installed console script itself
        res = subprocess.run(["curate-rl", *args], cwd=run, env=_cli_env(), capture_output=True, text=True, timeout=600)
        code, stderr = res.returncode, res.stderr
    else:
        code = _run_cli_forked(args, run, tmp_path / "stderr.txt")
        stderr = (tmp_path / "stderr.txt").read_text()
    err = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert err and err[-1].startswith("curate-rl: ") and expect in err[-1], err[-1:]
    assert sorted(p.name for p in run.iterdir()) == [], "something was written"


# ---- long run (slow) ------------------------------------------------------------------------
@pytest.mark.slow
def test_long_run_memory_and_store_stay_bounded(tmp_path, monkeypatch):
    """2,000 steps on the tiny model: resident memory grows < 5% after warm-up; the checkpoint
    folder holds keep_last_k + last.ckpt; the MLflow store grows by a steady amount per step."""
    import lightning as L
    import psutil

    monkeypatch.chdir(tmp_path)
    proc = psutil.Process()
    samples: dict[int, tuple[float, float]] = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % 100 == 0:
                db = tmp_path / "mlflow.db"
                samples[step] = (proc.memory_info().rss / 2**20, db.stat().st_size / 2**20 if db.exists() else 0.0)
                print(f"step {step}: rss {samples[step][0]:.1f} MiB, mlflow.db {samples[step][1]:.2f} MiB", flush=True)

    import components.cli as cli_mod

    orig = cli_mod.CurateCLI._instantiate_trainer

    def with_probe(self, config, callbacks):
        return orig(self, config, [*callbacks, Probe()])

    monkeypatch.setattr(cli_mod.CurateCLI, "_instantiate_trainer", with_probe)
    build_cli(
        ["fit", "--config", GRPO, *TINY, "--trainer.max_steps", "2000", "--trainer.val_check_interval", "100"]
        + ["--checkpoint.every_n_train_steps", "50", "--model.log_completions_every_n_steps", "50"]
    )
    warm = samples[200][0]
    final = samples[2000][0]
    growth = (final - warm) / warm
    print(f"rss after warm-up (step 200) {warm:.1f} MiB, at step 2000 {final:.1f} MiB: growth {growth:.2%}")
    assert growth < 0.05
    (folder,) = (tmp_path / "checkpoints").iterdir()
    assert len(list(folder.iterdir())) == 4  # keep_last_k=3 + last.ckpt
    # the store grows linearly with steps (metrics rows), not faster
    per_step = [(samples[s + 100][1] - samples[s][1]) / 100 for s in range(1000, 2000, 100)]
    assert max(per_step) < 3 * (sum(per_step) / len(per_step)) + 1e-3
    assert math.isfinite(final)
