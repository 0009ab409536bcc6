"""Engine test helpers shared by the unit tests and the fits: a model with a hostile generation config,
the teacher-forced log-prob gap, and the vLLM stand-in (``tests/vllm_standin``) and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.policy import load_policy

STANDIN = Path(__file__).resolve().parent / "vllm_standin"


def nasty_model(folder: Path, **gen_overrides) -> Path:
    """The embedded tiny model in a folder whose generation_config.json changes sampling a lot."""
    model, tok = load_policy("embedded:tiny")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.update(
        do_sample=True,
        temperature=0.3,
        repetition_penalty=1.5,
        top_k=3,
        top_p=0.3,
        no_repeat_ngram_size=2,
        min_length=12,
        min_p=0.2,
        suppress_tokens=[5, 6, 7],
        **gen_overrides,
    )
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    return folder


def teacher_forced(model, context: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([context + tokens])).logits[0, len(context) - 1 : -1].float()
    return torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def max_gap(model, contexts, outs, temperature: float) -> float:
    gaps = [
        (teacher_forced(model, c, r.token_ids, temperature) - torch.tensor(r.logprobs)).abs().max().item()
        for c, rs in zip(contexts, outs)
        for r in rs
        if r.token_ids
    ]
    assert gaps, "no tokens were generated"
    return max(gaps)


def vllm_engine(model, tok, **kw):
    from components.engines.vllm import VLLMEngine

    eng = VLLMEngine(dtype="float32", **kw)
    eng.bind(model, tok)
    return eng


def vllm_weights_equal(eng, model) -> bool:
    theirs = dict(eng.llm.worker.model_runner.model.named_parameters())
    return all(torch.equal(theirs[n], p.detach()) for n, p in model.named_parameters())


def sgd_step(model, ctx: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([ctx]), labels=torch.tensor([ctx])).loss.backward()
    opt.step()
    opt.zero_grad()
