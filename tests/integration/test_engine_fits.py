"""The engines inside real fits: a model with a hostile generation config, memory over steps, the vLLM engine's sleep mode (stand-in) with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from components.engines.hf import HFEngine
from components.policy import load_policy
from tests.engines import max_gap, nasty_model, vllm_weights_equal
from tests.runs import ROOT


def test_hf_engine_trains_on_a_model_with_a_nasty_generation_config(tmp_path, monkeypatch):
    """A fit on a model whose generation_config sets repetition_penalty / top_k / top_p: every
    rollout's sampling log-probs equal the policy's teacher-forced log-probs at that moment."""
    from components.cli import build_cli

    folder = nasty_model(tmp_path / "model")
    gaps: list[float] = []
    original = HFEngine.generate

    def probed(self, contexts, n_each, params, **kw):
        outs = original(self, contexts, n_each, params, **kw)
        if params.temperature > 0 and params.top_p == 1.0:
            gaps.append(max_gap(self.model, contexts, outs, params.temperature))
        return outs

    monkeypatch.setattr(HFEngine, "generate", probed)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "grpo.yaml"),
            "--model.model",
            str(folder),
            "--trainer.max_steps",
            "2",
            "--data.train_size",
            "40",
            "--data.heldout_size",
            "4",
            "--data.batch_size",
            "4",
            "--model.sampler.group_size",
            "4",
            "--model.eval.samples",
            "1",
            "--model.eval.at_start",
            "false",
            "--model.log_completions_every_n_steps",
            "0",
            "--model.export_dir",
            "null",
            "--model.sampling.temperature",
            "0.8",
        ]
    )
    assert cli.trainer.global_step == 2
    assert len(gaps) >= 2 and max(gaps) < 1e-4


def test_evaluation_at_start_leaves_training_draws_alone(tmp_path, monkeypatch):
    """An engine without per-item keys (transformers' generate: the HF engine's path under FSDP;
    vLLM alike) samples evaluation from torch's global generator: the step-0 evaluation must not
    change the rollouts training then draws."""
    from components.cli import build_cli
    from components.engines.hf_generate import HFGenerateEngine

    seen: list[list[list[int]]] = []
    original = HFGenerateEngine.generate

    def recorded(self, contexts, n_each, params, **kw):
        outs = original(self, contexts, n_each, params, **kw)
        if set(n_each) == {4}:  # training's groups (evaluation asks 1 sample per item)
            seen.append([r.token_ids for rs in outs for r in rs])
        return outs

    monkeypatch.setattr(HFGenerateEngine, "generate", recorded)
    runs = []
    for at_start in ("true", "false"):
        seen.clear()
        (tmp_path / at_start).mkdir()
        monkeypatch.chdir(tmp_path / at_start)
        build_cli(
            ["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), "--model.engine", "components.engines.hf_generate.HFGenerateEngine",
             "--trainer.max_steps", "2", "--trainer.logger", "false", "--data.train_size", "40", "--data.heldout_size", "8",
             "--data.batch_size", "4", "--model.sampler.group_size", "4", "--model.eval.samples", "1",
             "--model.eval.at_start", at_start, "--model.log_completions_every_n_steps", "0", "--model.export_dir", "null"]
        )  # fmt: skip
        runs.append(list(seen))
    assert len(runs[0]) == 2 and runs[0] == runs[1]


@pytest.mark.slow
def test_generate_memory_does_not_grow_with_steps_times_vocab():
    """One generate of 8 rows x 256 new tokens over a 32k vocabulary: keeping every step's scores
    would hold 8 x 256 x 32000 x 4 B = 262 MB; the engine keeps one step's (1 MB)."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_generate_memory.py"),
            "--batch",
            "8",
            "--steps",
            "256",
            "--vocab",
            "32000",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["mode"]: r for r in map(json.loads, run.stdout.strip().splitlines())}
    scores_bytes = 8 * 256 * 32000 * 4
    assert rows["output_scores"]["peak_mib"] > 0.8 * scores_bytes / 2**20  # the measurement sees O(steps x vocab)
    assert rows["engine"]["peak_mib"] < 0.3 * scores_bytes / 2**20


def test_vllm_engine_sleeps_in_a_fit_with_resume(standin, tmp_path, monkeypatch):
    """Sleep mode in a fit, against the stand-in (real vLLM refuses sleep mode on CPU; the real
    engine's fits and resume are tests/integration/test_vllm_fits.py): start at on_train_start,
    sleep before each update, sync after it, closed at teardown; a resumed fit starts the engine
    with the restored weights."""
    from components.cli import build_cli
    from components.engines.vllm import VLLMEngine

    closed: list = []  # the engines' LLMs, kept when the module's teardown closes them
    real_close = VLLMEngine.close

    def keeping(self):
        closed.append(self.llm)
        real_close(self)

    monkeypatch.setattr(VLLMEngine, "close", keeping)

    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(ROOT / "recipes" / "grpo.yaml"),
        "--model.engine",
        "components.engines.vllm.VLLMEngine",
        "--model.engine.dtype",
        "float32",
        "--model.engine.enable_sleep_mode",
        "true",
        "--data.train_size",
        "40",
        "--data.heldout_size",
        "4",
        "--data.batch_size",
        "2",
        "--model.sampler.group_size",
        "4",
        "--model.eval.samples",
        "1",
        "--model.eval.at_start",
        "false",
        "--trainer.val_check_interval",
        "2",
        "--checkpoint.every_n_train_steps",
        "2",
        "--model.log_completions_every_n_steps",
        "0",
        "--model.export_dir",
        "null",
    ]
    first = build_cli([*args, "--trainer.max_steps", "2"])
    eng = first.model.engine
    assert eng.llm is None and len(closed) == 1  # closed at teardown
    eng.llm = closed[0]
    assert vllm_weights_equal(eng, first.model.policy)  # synced after the last optimizer step
    calls = [c for c, _ in eng.llm.calls]
    assert calls.count("sleep") >= 2 and eng.llm.stale_prefix_hits == 0
    first_rpc = calls.index("collective_rpc")
    assert "generate" not in calls[:first_rpc]  # the initial sync comes before any generate
    trained = {n: p.detach().clone() for n, p in first.model.policy.named_parameters()}
    ckpt = next((tmp_path / "checkpoints").rglob("last.ckpt"))  # checkpoints/<run>/last.ckpt
    second = build_cli([*args, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
    assert second.trainer.global_step == 3
    eng2 = second.model.engine
    assert len(closed) == 2
    eng2.llm = closed[1]
    assert eng2 is not eng and eng2.llm.calls[0][0] == "collective_rpc"
    # The resumed engine's first generate sampled with the restored weights, not the base model's.
    restored = float(sum(p.double().sum() for p in trained.values()))
    base, _ = load_policy("embedded:tiny")
    assert abs(restored - float(sum(p.double().sum() for p in base.parameters()))) > 1e-3
    assert eng2.llm.generate_weight_sums[0] == pytest.approx(restored, abs=1e-6)
