"""GPU-only paths. Skipped without CUDA (and the vLLM test without vLLM installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from components.engines.base import SamplingParams
from components.engines.hf import HFEngine
from components.policy import encode_prompt, load_policy

pytestmark = pytest.mark.gpu


def test_hf_engine_and_loss_forward_on_cuda():
    model, tok = load_policy("embedded:tiny")
    model = model.cuda()
    eng = HFEngine()
    eng.bind(model, tok)
    ctx = encode_prompt(tok, "12 + 30 =")
    out = eng.generate([ctx], [4], SamplingParams(1.0, 1.0, 6))
    assert len(out[0]) == 4 and all(len(r.token_ids) == len(r.logprobs) for r in out[0])


def test_recipe_fit_on_cuda(tmp_path, monkeypatch):
    from components.cli import build_cli

    monkeypatch.chdir(tmp_path)
    from tests.runs import ROOT as root
    cli = build_cli(
        [
            "fit",
            "--config",
            str(root / "recipes" / "grpo.yaml"),
            "--trainer.accelerator",
            "gpu",
            "--trainer.max_steps",
            "2",
            "--data.train_size",
            "100",
            "--data.heldout_size",
            "16",
        ]
    )
    assert cli.trainer.global_step == 2
    assert next(cli.model.policy.parameters()).is_cuda


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_engine_generates_sleeps_and_syncs():
    """The real vLLM on a GPU (it has run on CPU only, tests/unit/engines/test_vllm.py; never on a GPU): sleep mode with two generates per step,
    a sync after a weight change, and sampling log-probs equal to the policy's teacher-forced ones."""
    from components.engines.vllm import VLLMEngine

    model, tok = load_policy("embedded:tiny")
    model = model.cuda()
    eng = VLLMEngine(gpu_memory_utilization=0.2, dtype="float32", enable_sleep_mode=True)
    eng.bind(model, tok)
    eng.start(model, device=torch.device("cuda", torch.cuda.current_device()))
    ctx = encode_prompt(tok, "12 + 30 =")
    for _ in range(2):
        out = eng.generate([ctx, ctx], [3, 0], SamplingParams(1.0, 1.0, 6))
        assert len(out[0]) == 3 and out[1] == []
    eng.sleep()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    eng.sync_weights(model)
    for r in eng.generate([ctx], [4], SamplingParams(1.0, 1.0, 6))[0]:
        ids = torch.tensor([ctx + r.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(ctx) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(ctx) :, None]).squeeze(1).cpu()
        assert (lp - torch.tensor(r.logprobs)).abs().max() < 1e-3
    greedy = eng.generate([ctx], [2], SamplingParams(0.0, 1.0, 6))[0]
    assert greedy[0].token_ids == greedy[1].token_ids
