"""vLLM as the rollout engine (GPU only; ``pip install -e ".[vllm]"``).

Colocated in the training process: vLLM holds its own copy of the weights, and after every optimizer
step :meth:`VLLMEngine.sync_weights` pushes the policy's weights into it with the model's
``load_weights`` and resets the prefix cache (the pattern TRL and vLLM's RL examples use).
Contexts are passed as token ids, never strings, so the loss sees exactly the sampled context.

Status: written against vLLM 0.32's public API (``LLM``, ``SamplingParams``, ``TokensPrompt``,
``logprobs_mode``) but NOT run: vLLM cannot be installed on this project's CPU machines, and the GPU
machines have no package access. Choices: ``logprobs_mode="processed_logprobs"`` so the returned
log-probs are those of the sampling distribution (after temperature / top-p), like the HF engine;
the loss itself recomputes old log-probs with the policy, so a vLLM/trainer numeric mismatch only
affects the logged sampling log-probs.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.engine import RolloutEngine, SamplingParams
from components.types import Rollout


class VLLMEngine(RolloutEngine):
    """Generate with an in-process ``vllm.LLM`` on the same GPU as training.

    Args:
        gpu_memory_utilization: share of GPU memory vLLM may take (the rest is training's).
        dtype: vLLM's weight dtype.
        max_model_len: context length vLLM reserves KV cache for (None: the model's).
        enable_sleep_mode: free vLLM's memory between generations (weights are re-pushed each step).
        seed: vLLM's sampling seed.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        seed: int = 0,
    ) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError('model.engine: VLLMEngine needs vLLM (GPU only): pip install -e ".[vllm]"') from e
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enable_sleep_mode = enable_sleep_mode
        self.seed = seed
        self.llm = None

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        from vllm import LLM

        super().bind(model, tokenizer)
        self.llm = LLM(
            model=model.config._name_or_path,
            tokenizer=getattr(tokenizer, "name_or_path", None) or model.config._name_or_path,
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            enable_sleep_mode=self.enable_sleep_mode,
            seed=self.seed,
            logprobs_mode="processed_logprobs",
        )

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        todo = [i for i, n in enumerate(n_each) if n > 0]
        sps = [
            VSamplingParams(
                n=n_each[i],
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
            )
            for i in todo
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=contexts[i]) for i in todo], sampling_params=sps, use_tqdm=False)
        result: list[list[Rollout]] = [[] for _ in contexts]
        eos = self.tokenizer.eos_token_id
        for i, out in zip(todo, outs):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
                # finish_reason "stop" = EOS or a stop string; "length" = cut at max_tokens.
                result[i].append(
                    Rollout(toks, lps[: len(toks)], c.text, c.finish_reason == "stop" or (bool(toks) and toks[-1] == eos))
                )
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)
        return result

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trained weights into vLLM (full tensors; gathers FSDP2 shards first)."""
        from torch.distributed.tensor import DTensor

        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])  # waking before pushing: pushing into freed memory corrupts it
        weights = ((k, v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items())
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()
