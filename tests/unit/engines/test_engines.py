"""Rollout engines sample what the loss assumes.

HF engine: nothing comes from the model's generation_config.json, the sampling log-probs equal a
teacher-forced forward of the policy, EOS is every id the model declares, stop strings work.
vLLM engine, sleep mode only: against the stand-in in ``tests/vllm_standin``, because real vLLM
refuses sleep mode on CPU (everything else runs against real vLLM in ``test_vllm.py`` and
``tests/integration/test_vllm_fits.py``): several generates per step with sleep and wake, a sync
after every optimizer step. Without any engine: FSDP2 shards are gathered for the sync one
parameter at a time.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from components.engines.base import SamplingParams, eos_token_ids
from components.engines.hf import HFEngine
from components.engines.hf_generate import HFGenerateEngine
from components.policy import encode_prompt, load_policy
from tests.engines import max_gap, nasty_model, sgd_step, teacher_forced, vllm_engine, vllm_weights_equal


# ---- HF engines: the decode loop, and transformers' generate (its fallback under FSDP) -------------
@pytest.mark.parametrize("engine", [HFEngine, HFGenerateEngine])
def test_hf_engine_ignores_the_models_generation_config(tmp_path, engine):
    model, tok = load_policy(str(nasty_model(tmp_path)))
    assert model.generation_config.repetition_penalty == 1.5 and model.generation_config.top_k == 3
    eng = engine()
    eng.bind(model, tok)
    ctxs = [encode_prompt(tok, "12 + 30 ="), encode_prompt(tok, "7 - 3 =")]
    torch.manual_seed(0)
    for temperature in (1.0, 0.7):
        outs = eng.generate(ctxs, [4, 3], SamplingParams(temperature, 1.0, 10))
        assert max_gap(model, ctxs, outs, temperature) < 1e-4
    # min_length 12 would have forbidden EOS before 12 tokens; here rollouts end at EOS earlier.
    assert any(r.finished and len(r.token_ids) < 12 for rs in outs for r in rs)
    # With top-p < 1 the sampling distribution is truncated: the loss's log-probs differ, as documented.
    outs = eng.generate(ctxs, [4, 3], SamplingParams(1.0, 0.5, 10))
    assert max_gap(model, ctxs, outs, 1.0) > 1e-3
    assert model.generation_config.repetition_penalty == 1.5  # the model's own config is left as it was


def test_eos_is_every_id_the_model_declares(tmp_path):
    model, tok = load_policy("embedded:tiny")
    space = tok.convert_tokens_to_ids(" ")
    model.generation_config.eos_token_id = [tok.eos_token_id, space]
    assert eos_token_ids(model, tok) == [tok.eos_token_id, space]
    eng = HFEngine()
    eng.bind(model, tok)
    ctx = encode_prompt(tok, "12 + 30 =")
    torch.manual_seed(0)
    rs = eng.generate([ctx], [16], SamplingParams(1.0, 1.0, 8))[0]
    ended_on_space = [r for r in rs if r.token_ids and r.token_ids[-1] == space]
    assert ended_on_space, "the tiny model answers ' 42'-like strings: some rollouts must start with a space"
    for r in rs:
        assert space not in r.token_ids[:-1] and tok.eos_token_id not in r.token_ids[:-1]
        assert len(r.logprobs) == len(r.token_ids)
    assert all(r.finished for r in ended_on_space)


@pytest.mark.parametrize("engine", [HFEngine, HFGenerateEngine])
def test_stop_strings_end_a_rollout(engine):
    model, tok = load_policy("embedded:tiny")
    eng = engine()
    eng.bind(model, tok)
    ctx = encode_prompt(tok, "12 + 30 =")
    torch.manual_seed(0)
    rs = eng.generate([ctx], [16], SamplingParams(1.0, 1.0, 8, stop=["4"]))[0]
    stopped = [r for r in rs if "4" in r.text]
    assert stopped
    for r in stopped:
        assert r.text.endswith("4") and r.finished and len(r.logprobs) == len(r.token_ids)
    for r in rs:
        assert teacher_forced(model, ctx, r.token_ids, 1.0).sub(torch.tensor(r.logprobs)).abs().max() < 1e-4


@pytest.mark.parametrize("engine", [HFEngine, HFGenerateEngine])
def test_stop_string_is_matched_in_the_generated_text_only(engine):
    """A context ending in '=' and the stop string '= ': a stop is only what the model wrote (as
    vLLM matches it), so a rollout starting with ' ' does not end on it. Both HF engines: the
    generate one is what the HF engine samples through under FSDP."""
    model, tok = load_policy("embedded:tiny")
    eng = engine()
    eng.bind(model, tok)
    ctx = encode_prompt(tok, "12 + 30 =")
    torch.manual_seed(0)
    rs = eng.generate([ctx], [8], SamplingParams(1.0, 1.0, 8, stop=["= "]))[0]
    assert all("= " in r.text or not r.finished or r.token_ids[-1] in eng.eos_ids for r in rs)
    assert any(len(r.token_ids) > 1 for r in rs)


@pytest.mark.parametrize("engine", [HFEngine, HFGenerateEngine])
def test_data_parallel_ranks_sample_from_streams_of_their_own(monkeypatch, engine):
    """Every rank's global generator is seeded alike: rank 1 must not reuse rank 0's draws, and
    rank 0 samples as a single device does."""
    import components.engines.base as base

    model, tok = load_policy("embedded:tiny")
    eng = engine()
    eng.bind(model, tok)
    ctx = encode_prompt(tok, "12 + 30 =")

    def draw(rank: int) -> list[list[int]]:
        if rank >= 0:  # what data_parallel_rank() reads from torch.distributed on that rank
            monkeypatch.setattr(base, "data_parallel_rank", lambda: rank)
        torch.manual_seed(0)
        return [r.token_ids for r in eng.generate([ctx], [32], SamplingParams(1.0, 1.0, 8))[0]]

    single, rank0, rank1 = draw(-1), draw(0), draw(1)
    assert rank0 == single
    assert rank1 != rank0


def test_lockstep_engine_only_under_sharded_ranks():
    """Outside torch.distributed (and for an unsharded model) the decode loop samples itself."""
    model, tok = load_policy("embedded:tiny")
    eng = HFEngine()
    eng.bind(model, tok)
    assert eng._lockstep_engine() is None


# ---- vLLM engine: sleep mode against the stand-in (real vLLM refuses sleep mode on CPU) ----------


def test_standin_fails_the_way_vllm_does(standin, tmp_path, monkeypatch):
    model, tok = load_policy("embedded:tiny")
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ctx = {"prompt_token_ids": encode_prompt(tok, "3 + 4 =")}
    with pytest.raises(AssertionError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        standin.LLM(str(tmp_path), distributed_executor_backend="external_launcher")
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        standin.SamplingParams(n=2, temperature=0.0)
    llm = standin.LLM(str(tmp_path), load_format="dummy", enable_sleep_mode=True)
    with pytest.raises(TypeError):  # multiprocess engine: a generator argument cannot be serialised
        llm.collective_rpc("wake_up", args=((t for t in ()),))
    llm.generate([ctx], standin.SamplingParams(max_tokens=2))
    llm.sleep(level=1)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        llm.generate([ctx], standin.SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        llm.worker.model_runner.model.load_weights(iter([]))
    llm.wake_up(tags=["weights"])
    llm.wake_up(tags=["weights", "kv_cache"])  # names an awake tag: vLLM wakes nothing
    with pytest.raises(RuntimeError, match="illegal memory access"):
        llm.generate([ctx], standin.SamplingParams(max_tokens=2))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    class Colliding:
        def update_weights(self, weights):
            return weights

    monkeypatch.setattr(sys.modules[__name__], "Colliding", Colliding, raising=False)
    with pytest.raises(AssertionError, match="conflicts with the worker extension"):
        standin.LLM(str(tmp_path), load_format="dummy", worker_extension_cls=f"{__name__}.Colliding")


def test_vllm_two_generates_per_step_with_sleep_and_a_sync_after_each_step(standin):
    model, tok = load_policy("embedded:tiny")
    eng = vllm_engine(model, tok, enable_sleep_mode=True)
    eng.start(model, device=torch.device("cuda", 0))
    assert eng.llm.device == "cuda:0" and os.environ.get("LOCAL_RANK") is None  # restored after the build
    assert vllm_weights_equal(eng, model)  # the dummy weights were replaced by the policy's
    ctxs = [encode_prompt(tok, "12 + 30 ="), encode_prompt(tok, "7 - 3 =")]
    for step in range(3):
        for _ in range(2):  # e.g. SAGE / DAPO refills: several generates in one step
            outs = eng.generate(ctxs, [3, 2], SamplingParams(1.0, 1.0, 6))
            assert [len(rs) for rs in outs] == [3, 2]
            assert max_gap(model, ctxs, outs, 1.0) < 1e-4  # vLLM samples from the policy's current weights
        eng.sleep()  # before the update
        assert eng.llm.worker.sleeping == {"weights", "kv_cache"}
        sgd_step(model, ctxs[0], step)
        eng.sync_weights(model)
        assert vllm_weights_equal(eng, model)
        assert eng.llm.worker.sleeping == {"kv_cache"}
    outs = eng.generate(ctxs, [2, 2], SamplingParams(1.0, 1.0, 6))
    assert max_gap(model, ctxs, outs, 1.0) < 1e-4
    assert eng.llm.stale_prefix_hits == 0  # the prefix cache was reset after every sync
    calls = [c for c, _ in eng.llm.calls]
    for i, c in enumerate(calls):  # every sync is followed by a prefix-cache reset
        if c == "collective_rpc":
            assert calls[i + 1] == "reset_prefix_cache"
    assert eng.llm.worker.weights_arg_types and set(eng.llm.worker.weights_arg_types) == {"generator"}  # streamed


def test_fsdp2_weights_are_gathered_one_at_a_time_for_the_sync(monkeypatch):
    """FSDP2 on one process (gloo, world size 1): the parameters are DTensors, and the stream the
    vLLM engine's sync consumes gathers each with ``full_tensor()`` only when it is asked for the
    next one, never all at once; a tied parameter is sent once. (Into real vLLM, with real shards
    on two processes: tests/integration/test_vllm_fits.py::test_fsdp2_two_processes_one_engine_per_rank.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from components.engines.vllm import _free_port, full_weights

    model, _ = load_policy("embedded:tiny")
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        gathered = []
        real = DTensor.full_tensor

        def counting(self, *a, **k):
            gathered.append(1)
            return real(self, *a, **k)

        monkeypatch.setattr(DTensor, "full_tensor", counting)
        stream = full_weights(model)
        sent = [next(stream)]
        assert len(gathered) == 1  # lazily: one parameter gathered per item
        sent += list(stream)
        assert len(gathered) == len(reference) == len(sent)  # the tied embedding / head once
        assert all(torch.equal(t, reference[n]) and not isinstance(t, DTensor) for n, t in sent)
    finally:
        dist.destroy_process_group()
