"""Reliability: exact resume, clean stops, atomic per-run checkpoints, one-line errors for bad
input, reward faults, and (slow) a long run's memory.

Runs use the tiny model with a handful of prompts so each real `curate-rl` start stays cheap.
"""

from __future__ import annotations

import contextlib
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
    """The task's verifier; its RELTEST_SLOW_AT-th call touches RELTEST_MARKER, then waits until the
    test creates RELTEST_RELEASE (at most RELTEST_SLEEP s): the test, not the clock, decides."""

    calls = 0

    def score(self, prompt, rollouts):
        SlowReward.calls += 1
        at = int(os.environ.get("RELTEST_SLOW_AT", "0"))
        if at and SlowReward.calls == at:
            Path(os.environ["RELTEST_MARKER"]).touch()
            release = os.environ.get("RELTEST_RELEASE")
            deadline = time.monotonic() + float(os.environ.get("RELTEST_SLEEP", "600"))
            while time.monotonic() < deadline and not (release and Path(release).exists()):
                time.sleep(0.05)
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
    for k in ("RELTEST_SLOW_AT", "RELTEST_MARKER", "RELTEST_SLEEP", "RELTEST_RELEASE"):
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
    # the resume continues the checkpoint's MLflow run and its checkpoint folder (no "-v1" files
    # next to a stale last.ckpt), evaluates the last step, and exports the policy under the run
    folders = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert len(folders) == 1 and not list((tmp_path / "b" / "checkpoints").rglob("*-v1.ckpt"))
    assert _runs(tmp_path / "b" / "mlflow.db") == ["FINISHED"]
    con = sqlite3.connect(tmp_path / "b" / "mlflow.db")
    steps = [s for (s,) in con.execute("select step from metrics where key = 'eval/pass_at_1' order by step")]
    con.close()
    assert steps == [0, 1, 3]  # at start, after steps 2 and 4 (Lightning logs step k's metrics at k - 1)
    assert (tmp_path / "b" / "outputs" / folders[0] / "final_policy" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "sig, code, abandoned",
    [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)],
    ids=["sigterm-abandons-a-long-step", "sigint-finishes-a-short-step"],
)
def test_stop_signal_checkpoints_marks_killed_and_resumes_exactly(parts, tmp_path, monkeypatch, sig, code, abandoned):
    """A real `curate-rl` run gets a signal in step 3, while its reward waits for the test. A step
    that outlives half the grace period is abandoned and rolled back (the checkpoint is at step 2):
    the test never releases the reward. A step that ends in time finishes (checkpoint at step 3):
    the test releases the reward once the run has said it got the signal, and the grace period is
    generous. Either way the exit code is 128 + signal, the MLflow run is KILLED, and resuming
    gives the uninterrupted run's weights bit for bit. No step's length depends on the machine."""
    args = ["fit", "--config", GRPO, *TINY, "--model.reward", "relparts.SlowReward", "--trainer.max_steps", "5"]
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    marker, release = tmp_path / "in_step_3", tmp_path / "release"
    env = {**_cli_env(), "RELTEST_SLOW_AT": "18", "RELTEST_MARKER": str(marker), "RELTEST_RELEASE": str(release)}
    # one score() call per prompt: 4 held-out at start, 4 per step, 4 held-out after step 2: call 18 is in step 3
    grace = "4" if abandoned else "600"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "components.cli",
            *args,
            "--guard.grace_period_s",
            grace,
            "--checkpoint.every_n_train_steps",
            "100",
        ],
        cwd=run_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not marker.exists():  # the run touches it from inside step 3's reward
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(sig)
    lines = []
    if not abandoned:  # release the reward once the run has taken the signal
        for line in proc.stderr:
            lines.append(line)
            if "received; stopping" in line:
                release.touch()
                break
    _, err = proc.communicate(timeout=600)
    err = "".join(lines) + err
    assert proc.returncode == code, err
    assert "Traceback" not in err
    (ckpt,) = (run_dir / "checkpoints").glob("*/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == (2 if abandoned else 3)
    assert _runs(run_dir / "mlflow.db") == ["KILLED"]

    con = sqlite3.connect(run_dir / "mlflow.db")
    ((killed_id,),) = con.execute("select run_uuid from runs").fetchall()
    con.close()
    monkeypatch.chdir(tmp_path)  # another store: the resume starts a new run, tagged with the killed one
    resumed = _params(build_cli([*args, "--ckpt_path", str(ckpt)]))
    con = sqlite3.connect(tmp_path / "mlflow.db")
    parent = con.execute("select value from tags where key = 'curate_rl.parent_run'").fetchall()
    con.close()
    assert parent == [(killed_id,)]
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
    torch.save({"state_dict": {}, "global_step": 137}, d / "step137.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "global_step": 2}, d / "whole.ckpt")
    (d / "truncated.ckpt").write_bytes((d / "whole.ckpt").read_bytes()[:3000])
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "empty.jsonl").write_text("")
    (d / "indent.yaml").write_text("trainer:\n  max_steps: 3\n   val_check_interval: 2\n")
    (d / "typo.yaml").write_text(
        "model:\n  sampler:\n    class_path: components.samplers.base.FixedGroupSampler\n    init_args:\n      group_sise: 4\n"
    )

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
        "unknown-minibatch-split": (["--model.minibatch_split", "prompt"], "model.minibatch_split: must be group or row"),
        "negative-eval-temperature": (["--model.eval.temperature", "-1"], "model.eval.temperature: must be >= 0"),
        "negative-max-steps": (["--trainer.max_steps", "-5"], "trainer.max_steps: must be >= 1"),
        "zero-max-steps": (["--trainer.max_steps", "0"], "nothing to train"),
        "unlimited-max-steps": (["--trainer.max_steps", "-1"], "the prompt stream never ends"),
        "text-file-ckpt": (["--ckpt_path", str(d / "notes.txt")], "notes.txt is not a readable checkpoint"),
        "truncated-ckpt": (["--ckpt_path", str(d / "truncated.ckpt")], "truncated.ckpt is not a readable checkpoint"),
        "resume-past-max-steps": (
            ["--ckpt_path", str(d / "step137.ckpt"), "--trainer.max_steps", "20"],
            "step137.ckpt is at step 137: nothing is left to train",
        ),
        "group-size-1-grpo": (["--model.sampler.group_size", "1"], "model.sampler.group_size: 1 with model.advantage.name=grpo"),
        "group-size-1-rloo": (
            ["--model.sampler.group_size", "1", "--model.advantage.name", "rloo"],
            "model.advantage.name=rloo",
        ),
        "batch-larger-than-pool": (["--data.batch_size", "5000"], "larger than the training pool"),
        "gpu-overlay-without-gpu": (["--config", str(ROOT / "configs" / "gpu-1x.yaml")], "trainer.accelerator: gpu is set"),
        "empty-data-file": (files("empty.jsonl"), "empty.jsonl holds no records"),
        "data-glob": (files("*.jsonl"), "globs are not expanded"),
        "yaml-indentation": (["--config", str(d / "indent.yaml")], "indent.yaml"),
        "init-arg-typo": (["--config", str(d / "typo.yaml")], "valid arguments of FixedGroupSampler: group_size"),
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
    "unknown-minibatch-split",
    "negative-eval-temperature",
    "negative-max-steps",
    "zero-max-steps",
    "text-file-ckpt",
    "truncated-ckpt",
    "resume-past-max-steps",
    "group-size-1-grpo",
    "group-size-1-rloo",
    "batch-larger-than-pool",
    "empty-data-file",
    "data-glob",
    "yaml-indentation",
    "init-arg-typo",
]
if not torch.cuda.is_available():
    BAD_CASES.append("gpu-overlay-without-gpu")


def _fork_cli(args: list[str], cwd: Path, err_path: Path, env: dict[str, str] | None = None, out_path: Path | None = None) -> int:
    """Start the ``curate-rl`` entry point (``components.cli:main``) in a forked child; its pid.

    The child has its own working directory, stdout/stderr and exit status, exactly as the
    console script; only the interpreter start and the imports (about 10 s of CPU, mostly torch
    and Lightning) are inherited from this process, which keeps the battery cheap.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(out_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
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
    return pid


def _wait_cli(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run_cli_forked(args: list[str], cwd: Path, err_path: Path) -> int:
    """Run the ``curate-rl`` entry point in a forked child (see :func:`_fork_cli`); its exit code."""
    return _wait_cli(_fork_cli(args, cwd, err_path))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra, expect = _bad_inputs(inputs)[case]
    run = tmp_path / "run"
    run.mkdir()
    args = ["fit", "--config", GRPO, "--data.train_size", "8", "--data.heldout_size", "2", "--data.batch_size", "4", *extra]
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


# ---- the MLflow store ---------------------------------------------------------------------
ONE_STEP = ["fit", "--config", GRPO, *TINY, "--trainer.max_steps", "1", "--model.eval.at_start", "false"]


def test_runs_started_at_once_in_a_fresh_folder_all_run(tmp_path):
    """Three runs started together in one fresh folder (the store is created and migrated under
    its lock, not by each MLflow client at once), then a fourth in the same store."""
    pids = [_fork_cli(ONE_STEP, tmp_path, tmp_path / f"err{i}.txt") for i in range(3)]
    codes = [_wait_cli(pid) for pid in pids]
    errs = [(tmp_path / f"err{i}.txt").read_text() for i in range(3)]
    assert codes == [0, 0, 0], [e[-1500:] for e in errs]
    assert not any("Traceback" in e for e in errs)
    fourth = _wait_cli(_fork_cli(ONE_STEP, tmp_path, tmp_path / "err3.txt", out_path=tmp_path / "out3.txt"))
    assert fourth == 0, (tmp_path / "err3.txt").read_text()[-1500:]
    assert _runs(tmp_path / "mlflow.db") == ["FINISHED"] * 4
    # the run's last lines: where its run, checkpoints and final policy are (each run its own folders)
    summary = (tmp_path / "out3.txt").read_text().splitlines()[-7:]
    assert summary[0] == "curate-rl: finished at step 1" and summary[1].startswith("  held-out pass@1 ")
    run_id = summary[2].split()[2]
    assert summary[3] == f"  open it        mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    assert summary[4].endswith(
        "/#/experiments/1/runs?viewStateShareKey=curate-rl-eval-first&compareRunsMode=CHART&workflowType=machine_learning"
    )
    ckpts, policy = Path(summary[5].split()[-1]), Path(summary[6].split()[-1])
    assert ckpts.parent == tmp_path / "checkpoints" and ckpts.name.endswith(run_id[:8]) and (ckpts / "last.ckpt").exists()
    assert policy == tmp_path / "outputs" / ckpts.name / "final_policy" and (policy / "model.safetensors").exists()
    assert len(list((tmp_path / "outputs").iterdir())) == 4
    con = sqlite3.connect(tmp_path / "mlflow.db")
    tags = dict(con.execute("select key, value from experiment_tags"))
    owners = con.execute("select count(distinct value) from tags where key = 'curate_rl.pid'").fetchone()[0]
    con.close()
    assert tags["mlflow.experimentKind"] == "custom_model_development" and owners == 4
    view = json.loads(tags["mlflow.sharedViewState.curate-rl-eval-first"])  # MLflow's saved-view envelope
    sections = [s["name"] for s in json.loads(view["state"])["compareRunSections"]]
    assert sections[:2] == ["eval", "eval/pass_at_1"] and sections.index("budget") > sections.index("reward")


def _store_cases(d: Path) -> dict[str, bytes]:
    d.mkdir()
    _run_cli_forked(ONE_STEP, d, d / "err.txt")
    good = (d / "mlflow.db").read_bytes()
    return {"not-a-database": b"this is a text file\n", "truncated": good[: len(good) // 3]}


@pytest.mark.parametrize("case", ["not-a-database", "truncated"])
def test_a_corrupt_store_is_one_line_exit_2_and_left_as_it_was(case, tmp_path):
    content = _store_cases(tmp_path / "good")[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "mlflow.db").write_bytes(content)
    code = _run_cli_forked(ONE_STEP, run, tmp_path / "stderr.txt")
    stderr = (tmp_path / "stderr.txt").read_text()
    err = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr and len([line for line in err if line.startswith("curate-rl:")]) == 1
    assert err[-1].startswith("curate-rl: config error: trainer.logger.init_args.tracking_uri: ")
    assert str(run / "mlflow.db") in err[-1] and "mv " in err[-1]
    assert [p.name for p in run.iterdir()] == ["mlflow.db"] and (run / "mlflow.db").read_bytes() == content


def test_an_unwritable_store_folder_is_one_line_exit_2(tmp_path):
    folder = "/proc/curate-rl-test" if os.geteuid() == 0 else str(tmp_path / "ro" / "store")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    run = tmp_path / "run"
    run.mkdir()
    args = [*ONE_STEP, "--trainer.logger.init_args.tracking_uri", f"sqlite:///{folder}/mlflow.db"]
    code = _run_cli_forked(args, run, tmp_path / "stderr.txt")
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert code == 2 and err[-1].startswith("curate-rl: config error: trainer.logger.init_args.tracking_uri: ")
    assert "not writable" in err[-1] and "Traceback" not in "".join(err)
    assert list(run.iterdir()) == []


def test_a_run_killed_with_sigkill_is_failed_by_the_next_run_a_live_one_stays_running(parts, tmp_path):
    """Two runs sit in their first reward call (the test releases neither); one is killed with
    SIGKILL. The next run in that store marks the dead one FAILED and leaves the live one RUNNING."""
    children = {}
    for name in ("dead", "alive"):
        marker = tmp_path / f"{name}.in_step"
        env = {"RELTEST_SLOW_AT": "1", "RELTEST_MARKER": str(marker), "RELTEST_SLEEP": "600"}
        args = [*ONE_STEP, "--model.reward", "relparts.SlowReward", "--trainer.max_steps", "3"]
        children[name] = (_fork_cli(args, tmp_path, tmp_path / f"{name}.txt", env), marker)
    try:
        for name, (pid, marker) in children.items():
            while not marker.exists():  # the child touches it from inside its run's first step
                assert os.waitpid(pid, os.WNOHANG) == (0, 0), (tmp_path / f"{name}.txt").read_text()[-2000:]
                time.sleep(0.2)
        assert _runs(tmp_path / "mlflow.db") == ["RUNNING", "RUNNING"]
        dead_pid = children["dead"][0]
        os.kill(dead_pid, signal.SIGKILL)
        assert _wait_cli(dead_pid) == -signal.SIGKILL
        assert _run_cli_forked(ONE_STEP, tmp_path, tmp_path / "next.txt") == 0
        con = sqlite3.connect(tmp_path / "mlflow.db")
        status = dict(
            con.execute("select t.value, r.status from runs r join tags t on t.run_uuid = r.run_uuid and t.key = 'curate_rl.pid'")
        )
        con.close()
        assert status[str(dead_pid)] == "FAILED"
        assert status[str(children["alive"][0])] == "RUNNING"
        assert sorted(status.values()) == ["FAILED", "FINISHED", "RUNNING"]
        assert "marked FAILED" in (tmp_path / "next.txt").read_text()
    finally:
        for pid, _ in children.values():
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


# ---- the terminal ---------------------------------------------------------------------------
def test_a_default_fit_prints_no_third_party_warnings_and_ends_with_its_summary(tmp_path):
    """The console entry point as a user runs it (no PYTHONWARNINGS, the progress bar on, 120
    columns): stderr holds no warning and no Lightning tip, the bar shows steps (no epoch, no
    v_num) with its metrics on one line, and stdout ends with where everything went."""
    env = {k: v for k, v in _cli_env().items() if k != "PYTHONWARNINGS"}
    env["COLUMNS"] = "120"
    args = ["fit", "--config", GRPO, *[a for a in TINY if a not in ("--trainer.enable_progress_bar", "false")]]
    res = subprocess.run(
        [sys.executable, "-m", "components.cli", *args, "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # nothing on stderr but our own lines: no warning, no Lightning tip, device or end-of-fit info
    noisy = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("curate-rl:")]
    assert not noisy, noisy
    bar = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert bar and "3/3" in bar[-1] and "pass@1:" in bar[-1] and "reward:" in bar[-1]
    assert "Epoch" not in res.stdout and "v_num" not in res.stdout
    assert all(len(ln) <= 120 for ln in res.stdout.splitlines() if "━" in ln)
    last = res.stdout.strip().splitlines()[-5:]
    assert [ln.split()[0] for ln in last] == ["MLflow", "open", "eval", "checkpoints", "final"]
    # a resume says on one line of its own which run, step and file it continues (Lightning's
    # restore lines are silenced), and the run goes on in the same MLflow run
    (ckpt,) = (tmp_path / "checkpoints").glob("*/last.ckpt")
    step = torch.load(ckpt, weights_only=True)["global_step"]  # the last step checkpoint (every 2 steps)
    res2 = subprocess.run(
        [sys.executable, "-m", "components.cli", *args, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"]
        + ["--ckpt_path", str(ckpt)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res2.returncode == 0, res2.stderr[-3000:]
    run_id = last[0].split()[2]
    assert res2.stderr.splitlines() == [f"curate-rl: resuming MLflow run {run_id} at step {step} from {ckpt}"]
    assert res2.stdout.strip().splitlines()[-5].split()[2] == run_id and _runs(tmp_path / "mlflow.db") == ["FINISHED"]
