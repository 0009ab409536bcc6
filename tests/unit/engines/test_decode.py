"""The HF engine's decode loop (components/engines/decode.py) and seeded evaluation.

Per-row counter-based streams: uniform, sampling from the softmax, a row's tokens independent of
the batch it shares; batched and per-item held-out evaluation draw the same tokens and give the
same pass rates; training rollouts follow torch's global generator (a seeded run repeats itself).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from components.data.datamodule import PromptDataModule
from components.engines.base import SamplingParams
from components.engines.decode import derive_keys, row_uniforms, sample_step
from components.engines.hf import HFEngine
from components.policy import encode_prompt, load_policy
from components.rewards.verifier import VerifierReward
from components.step.evaluation import EvalConfig, Evaluator, item_keys
from tests.engines import teacher_forced


def _engine(**kw) -> HFEngine:
    model, tok = load_policy("embedded:tiny")
    eng = HFEngine(**kw)
    eng.bind(model, tok)
    return eng


def test_row_uniforms_are_uniform_and_differ_by_key_and_step():
    keys = derive_keys(torch.full((20000,), 7), torch.arange(20000))
    u0, u1 = row_uniforms(keys, 0), row_uniforms(keys, 1)
    assert ((u0 >= 0) & (u0 < 1)).all()
    counts = torch.histc(u0.float(), bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 200  # ~4.5 sigma of a binomial(20000, 0.1)
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.05
    assert len(set(keys.tolist())) == 20000
    assert torch.equal(row_uniforms(keys[:5], 3), row_uniforms(keys, 3)[:5])  # a function of (key, step) only


def test_inverse_cdf_draws_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    n = 40000
    keys = derive_keys(torch.zeros(n, dtype=torch.long), torch.arange(n))
    tok, lp = sample_step(logits.expand(n, 6), 0.7, 1.0, keys, 0)
    p = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tok, minlength=6).float() / n
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()
    assert torch.allclose(lp, torch.log_softmax(logits[0] / 0.7, -1)[tok])
    # top-p: tokens outside the nucleus are never drawn, the log-prob is the truncated distribution's
    tok, lp = sample_step(logits.expand(n, 6), 1.0, 0.5, keys, 0)
    kept = torch.softmax(logits[0], -1).sort(descending=True)
    nucleus = set(kept.indices[: int((kept.values.cumsum(0) < 0.5).sum()) + 1].tolist())
    assert set(tok.tolist()) <= nucleus
    # greedy
    tok, lp = sample_step(logits.expand(3, 6), 0.0, 1.0, keys[:3], 0)
    assert (tok == logits.argmax()).all()


def test_keyed_rows_do_not_depend_on_the_batch_they_share():
    eng = _engine(max_batch_rows=7)
    tok = eng.tokenizer
    ctxs = [encode_prompt(tok, t) for t in ["12 + 30 =", "7 - 3 =", "5 + 5 =", "12 + 30 ="]]
    keys = torch.tensor([11, 22, 33, 44])
    params = SamplingParams(1.0, 1.0, 8)
    together = eng.generate(ctxs, [3, 2, 4, 3], params, keys=keys)
    alone = [eng.generate([c], [n], params, keys=keys[i : i + 1])[0] for i, (c, n) in enumerate(zip(ctxs, [3, 2, 4, 3]))]
    reordered = eng.generate(ctxs[::-1], [3, 4, 2, 3], params, keys=keys.flip(0))[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert [r.token_ids for r in a] == [r.token_ids for r in b] == [r.token_ids for r in c]
        for ra, rb in zip(a, b):
            assert torch.allclose(torch.tensor(ra.logprobs), torch.tensor(rb.logprobs), atol=1e-5)
    assert [r.token_ids for r in together[0]] != [r.token_ids for r in together[3]]  # same text, other key
    for c, rs in zip(ctxs, together):  # the recorded log-probs are the policy's
        for r in rs:
            assert (teacher_forced(eng.model, c, r.token_ids, 1.0) - torch.tensor(r.logprobs)).abs().max() < 1e-4


def test_unkeyed_rollouts_follow_the_global_generator():
    eng = _engine()
    ctx = [encode_prompt(eng.tokenizer, "12 + 30 =")]
    params = SamplingParams(1.0, 1.0, 8)
    torch.manual_seed(3)
    a = eng.generate(ctx, [8], params)[0]
    torch.manual_seed(3)
    b = eng.generate(ctx, [8], params)[0]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1


def test_batched_and_per_item_evaluation_agree():
    dm = PromptDataModule(batch_size=4, train_size=40, heldout_size=24)
    dm.setup("fit")
    eng = _engine(max_batch_rows=16)
    reward = VerifierReward()
    reward.setup(SimpleNamespace(sampling=SamplingParams()), dm.verifier)
    held = dm.heldout + dm.heldout[:3]  # repeated items get streams of their own
    ctxs = [encode_prompt(eng.tokenizer, p.text) for p in held]
    cfg = EvalConfig(samples=4, seed=5)
    torch.manual_seed(0)
    ev = Evaluator(cfg)
    ev.run(held, ctxs, eng, reward, SamplingParams(max_new_tokens=8))
    batched = ev.results()
    torch.manual_seed(1)  # evaluation draws nothing from the global generator
    for i in range(len(held)):
        ev.run(held[i : i + 1], ctxs[i : i + 1], eng, reward, SamplingParams(max_new_tokens=8))
    assert ev.results() == batched
    # the same tokens, item by item
    keys = item_keys(5, [p.uid for p in held])
    whole = eng.generate(ctxs, [4] * len(held), SamplingParams(max_new_tokens=8), keys=keys)
    for i in (0, 7, len(held) - 1):
        one = eng.generate(ctxs[i : i + 1], [4], SamplingParams(max_new_tokens=8), keys=keys[i : i + 1])[0]
        assert [r.token_ids for r in one] == [r.token_ids for r in whole[i]]
    assert keys[0] != keys[len(dm.heldout)] and held[0].uid == held[len(dm.heldout)].uid
    assert 0 < batched["eval/pass_at_1"] < 1


@pytest.mark.parametrize("shared", [True, False])
def test_grouped_query_attention_and_the_copied_cache_path_sample_the_policy(shared, monkeypatch):
    """A model with fewer key/value heads than query heads, through the shared-context attention and
    through the path that copies each context's cache to its rows (models it does not cover)."""
    from transformers import LlamaForCausalLM

    from components.engines import shared_prefix
    from components.policy import tiny_config

    if not shared:
        monkeypatch.setattr(shared_prefix, "supported", lambda model: False)
    _, tok = load_policy("embedded:tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tok), tok, num_attention_heads=4, num_key_value_heads=2)).eval()
    eng = HFEngine()
    eng.bind(model, tok)
    ctxs = [encode_prompt(tok, t) for t in ["12 + 30 =", "7 - 3 =", "123 + 4 ="]]
    outs = eng.generate(ctxs, [3, 2, 4], SamplingParams(1.0, 1.0, 12), keys=torch.tensor([1, 2, 3]))
    for c, rs in zip(ctxs, outs):
        for r in rs:
            assert (teacher_forced(model, c, r.token_ids, 1.0) - torch.tensor(r.logprobs)).abs().max() < 1e-4
    assert model.config._attn_implementation == "sdpa"  # switched back after decoding
