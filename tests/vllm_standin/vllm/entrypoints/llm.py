"""Stand-in for ``vllm.LLM`` (tests only; see tests/vllm_standin/README.md).

Signatures follow vLLM 0.32's ``LLM`` (``generate``, ``collective_rpc``, ``sleep``, ``wake_up``,
``reset_prefix_cache``); the executor's sleep-tag bookkeeping follows ``vllm/v1/executor/abstract.py``.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import _SAMPLING_EPS, SamplingParams

logger = logging.getLogger("vllm")

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"

# EngineArgs fields this stand-in accepts besides LLM's named parameters (vLLM raises TypeError on others).
_ENGINE_ARGS = {
    "load_format",
    "distributed_executor_backend",
    "worker_extension_cls",
    "generation_config",
    "logprobs_mode",
    "enable_prefix_caching",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "enable_sleep_mode",
    "enforce_eager",
    "kv_cache_memory_bytes",
    "block_size",
}


class _Model:
    """vLLM's model as the worker sees it: named parameters and ``load_weights``."""

    def __init__(self, hf: torch.nn.Module, worker: Worker) -> None:
        self.hf, self.worker = hf, worker

    def named_parameters(self):
        return self.hf.named_parameters()

    def named_modules(self, *args, **kwargs):
        return self.hf.named_modules(*args, **kwargs)

    def load_weights(self, weights) -> set[str]:
        if "weights" in self.worker.sleeping:
            raise RuntimeError(ILLEGAL_ACCESS + " (load_weights into slept weights)")
        self.worker.weights_arg_types.append(type(weights).__name__)
        params = dict(self.hf.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # KeyError on a name vLLM's model does not have, as in vLLM
                loaded.add(name)
        self.worker.weights_version += 1
        return loaded


class _ModelRunner:
    def __init__(self, model: _Model) -> None:
        self.model = model
        self.vllm_config = SimpleNamespace(model_config=None)

    def get_model(self) -> _Model:
        return self.model


class Worker:
    """The GPU worker: owns the model; sleep / wake_up of its memory; vLLM's native
    ``update_weights`` (weight-transfer API) so that extensions colliding with it are refused."""

    def __init__(self, hf: torch.nn.Module) -> None:
        self.sleeping: set[str] = set()
        self.weights_version = 0
        self.weights_arg_types: list[str] = []
        self.model_runner = _ModelRunner(_Model(hf, self))
        self._backup: dict[str, torch.Tensor] | None = None

    def update_weights(self, update_info: dict) -> None:
        raise RuntimeError("start_weight_update must be called before update_weights.")

    def sleep(self, level: int = 1) -> bool:
        hf = self.model_runner.model.hf
        self._backup = {k: v.detach().clone() for k, v in hf.state_dict().items()} if level == 1 else None
        self.sleeping = {"weights", "kv_cache"}
        return True

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = list(tags) if tags else ["weights", "kv_cache"]
        if "weights" in tags:
            hf = self.model_runner.model.hf
            with torch.no_grad():
                for k, v in hf.state_dict().items():
                    # Level 1 restores the CPU backup; level 2 maps fresh, uninitialised memory.
                    v.copy_(self._backup[k]) if self._backup is not None else v.fill_(float("nan"))
        self.sleeping.difference_update(tags)


def _with_extension(qualname: str) -> type[Worker]:
    module, _, name = qualname.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    for attr in dir(ext):
        if attr.startswith("__"):
            continue
        assert not hasattr(Worker, attr), (
            f"Worker class {Worker} already has an attribute {attr}, which conflicts with the worker extension class {ext}."
        )
    return type("Worker", (Worker, ext), {})


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        self.kwargs = dict(kwargs, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        self.enable_sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self.enable_prefix_caching = bool(kwargs.get("enable_prefix_caching", True))
        self.multiprocess = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            assert not self.multiprocess, "To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            self.rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        else:
            self.rank, local_rank = 0, 0
        self.device = f"cuda:{local_rank}"
        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
        config = AutoConfig.from_pretrained(model)
        if kwargs.get("load_format") == "dummy":
            hf = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for p in hf.parameters():
                    p.uniform_(-1e-3, 1e-3)  # vLLM's dummy weights
        else:
            hf = AutoModelForCausalLM.from_pretrained(model)
        hf = hf.to(torch_dtype).eval()
        worker_cls = _with_extension(kwargs["worker_extension_cls"]) if kwargs.get("worker_extension_cls") else Worker
        self.worker = worker_cls(hf)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.eos_token_id = config.eos_token_id
        self.generator = torch.Generator().manual_seed(seed)
        # Executor bookkeeping (vllm/v1/executor/abstract.py).
        self.is_sleeping = False
        self.sleeping_tags: set[str] = set()
        self.prefix_cache: dict[tuple[int, ...], int] = {}
        self.stale_prefix_hits = 0
        self.generate_weight_sums: list[float] = []  # the weights each generate call sampled with
        self.calls: list[tuple[str, Any]] = []

    # ---- control ----------------------------------------------------------------------------
    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        self.calls.append(("collective_rpc", method if isinstance(method, str) else "<callable>"))
        if self.multiprocess:
            pickle.dumps((method, args, kwargs))  # the engine core is another process: arguments are serialised
        func = getattr(self.worker, method) if isinstance(method, str) else partial(method, self.worker)
        return [func(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        self.prefix_cache.clear()
        return True

    def sleep(self, level: int = 1) -> None:
        if not self.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled; set enable_sleep_mode=True")
        self.reset_prefix_cache()
        self.calls.append(("sleep", level))
        if self.is_sleeping:
            logger.warning("Executor is already sleeping.")
            return
        self.worker.sleep(level=level)
        self.sleeping_tags = {"weights", "kv_cache"}
        self.is_sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        if not self.is_sleeping:
            logger.warning("Executor is not sleeping.")
            return
        if tags:
            for tag in tags:
                if tag not in self.sleeping_tags:
                    logger.warning("Tag %s is not in sleeping tags %s", tag, self.sleeping_tags)
                    return
        self.worker.wake_up(tags)
        if tags:
            self.sleeping_tags.difference_update(tags)
        else:
            self.sleeping_tags.clear()
        if not self.sleeping_tags:
            self.is_sleeping = False

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        self.calls.append(("generate", None))
        if self.worker.sleeping:
            raise RuntimeError(ILLEGAL_ACCESS + f" (generate while {sorted(self.worker.sleeping)} sleep)")
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        params = (
            list(sampling_params)
            if isinstance(sampling_params, Sequence)
            else [sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and sampling_params ({len(params)}) must be the same.")
        hf = self.worker.model_runner.model.hf
        self.generate_weight_sums.append(float(sum(p.double().sum() for p in hf.parameters())))
        outs = []
        for k, (prompt, sp) in enumerate(zip(prompts, params)):
            ids = list(prompt["prompt_token_ids"])
            if self.enable_prefix_caching:
                cached = self.prefix_cache.setdefault(tuple(ids), self.worker.weights_version)
                self.stale_prefix_hits += cached != self.worker.weights_version  # vLLM reuses the old KV silently
            outs.append(RequestOutput(str(k), None, ids, [self._sample(ids, sp, j) for j in range(sp.n)]))
        return outs

    @torch.no_grad()
    def _sample(self, prompt: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        hf = self.worker.model_runner.model.hf
        eos = set(sp.stop_token_ids) | (set() if sp.ignore_eos else {self.eos_token_id})
        toks: list[int] = []
        lps: list[dict[int, Logprob]] = []
        reason = "length"
        for _ in range(sp.max_tokens):
            logits = hf(torch.tensor([prompt + toks])).logits[0, -1].float()
            greedy = sp.temperature < _SAMPLING_EPS
            if not greedy:
                logits = logits / sp.temperature
                if sp.top_k > 0:
                    logits[logits < logits.topk(sp.top_k).values[-1]] = float("-inf")
                if sp.top_p < 1.0:
                    probs, order = logits.softmax(-1).sort(descending=True)
                    drop = probs.cumsum(-1) - probs > sp.top_p  # keep the smallest prefix reaching top_p
                    logits[order[drop]] = float("-inf")
            logp = torch.log_softmax(logits, -1)  # "processed_logprobs": after temperature / top-k / top-p
            tok = int(logp.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1, generator=self.generator))
            toks.append(tok)
            lps.append({tok: Logprob(float(logp[tok]), rank=None, decoded_token=None)})
            if tok in eos:
                reason = "stop"
                break
            if sp.stop and any(s in self.tokenizer.decode(toks, skip_special_tokens=True) for s in sp.stop):
                reason = "stop"
                break
        text = self.tokenizer.decode(toks, skip_special_tokens=sp.skip_special_tokens)
        return CompletionOutput(index, text, toks, None, lps if sp.logprobs is not None else None, reason)
