"""vLLM as the rollout engine (GPU only; ``pip install -e ".[vllm]"``).

Written against vLLM 0.32.0 (the ``[vllm]`` extra's pin: torch 2.13.0, transformers >= 5.16.1, < 5.20)
by reading vLLM's source (``LLM.generate / collective_rpc / sleep / wake_up / reset_prefix_cache``,
``ExecutorWithExternalLauncher``, ``WorkerWrapperBase`` and the executor's sleep-tag bookkeeping) and
TRL's colocate mode. It has NOT run on a GPU: vLLM cannot be installed on this project's machines. The
tests drive it against a stand-in (``tests/vllm_standin``) that reproduces the calls made here and
fails the way vLLM fails when they are made in the wrong order.

Choices, and why:

- **One in-process engine per rank, on that rank's device.** ``distributed_executor_backend=
  "external_launcher"`` (TRL's colocate mode) with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (that
  executor asserts it): the engine and its single worker live in the training process, the worker
  takes its device from ``LOCAL_RANK`` (set to the index of the rank's own device while the engine is
  built), and every rank samples its own prompts with its own seed (``seed + rank``).
- **Weight sync through a worker extension reached by ``LLM.collective_rpc``.** vLLM mixes
  :class:`WeightSyncExtension` into its worker (``worker_extension_cls``), and
  ``collective_rpc("curate_rl_load_weights", args=(iterator,))`` runs it there. ``collective_rpc`` is
  public API, whereas ``llm.llm_engine.model_executor.driver_worker.model_runner`` is internal (and
  absent under the default multiprocess engine). In process, the argument is passed by reference, so
  the iterator is consumed lazily: full tensors are gathered from FSDP2 shards one parameter at a
  time (``DTensor.full_tensor()``, a collective every rank runs in the same order) and each is copied
  into vLLM's parameter before the next is gathered: never a second full copy of the model. The method
  is not named ``update_weights``: recent vLLM workers already have one (the native weight-transfer
  API), and vLLM refuses an extension whose names collide with the worker's.
- **Weights are never read from disk.** The engine is built from the policy's config and tokenizer,
  saved to a temporary folder, with ``load_format="dummy"``; the first sync (at :meth:`start`) writes
  every parameter, and the extension checks that every vLLM parameter was loaded. This works for any
  policy source (embedded, GGUF, local folder, hub id) without a second load.
- **Sampling is explicit.** ``generation_config="vllm"`` (the model's generation_config.json never
  supplies defaults), every penalty neutral, ``stop_token_ids`` = every EOS id the model declares,
  ``logprobs_mode="processed_logprobs"`` so the returned log-probs are those of the distribution the
  token was drawn from (after temperature and top-p), as in the HF engine.
- **Sleep mode** (``enable_sleep_mode``; needed to share one GPU with training): ``sleep(level=1)``
  after the step's last generate (:meth:`sleep`, called by the module before the update), then
  ``wake_up(["weights"])`` before a sync and ``wake_up(["kv_cache"])`` before a generate. The engine
  keeps its own record of what sleeps and wakes only those tags: vLLM's ``wake_up`` ignores the
  whole call if one of the tags given is already awake. Level 1 (weights backed up to CPU) rather
  than level 2: level 2 discards buffers that ``load_weights`` does not restore (TRL works around it
  by reloading from disk, vllm#29341). Generating while anything sleeps, or loading into slept
  weights, is a CUDA illegal memory access in vLLM: the engine wakes first, always.
- **Prefix cache** reset after every sync (cached KV of the old weights would otherwise be reused).
- **Greedy with n > 1** (vLLM raises "n must be 1 when using greedy sampling"): generated once and
  copied n times (greedy decoding is deterministic).
- Only ``tensor_parallel_size = 1`` (one worker per engine): the model must fit on one device.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.engines.base import RolloutEngine, SamplingParams, eos_token_ids
from components.errors import ConfigError
from components.types import Rollout

VLLM_VERSION_WRITTEN_AGAINST = "0.32.0"
_LOAD_METHOD = "curate_rl_load_weights"


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); ``self`` is the worker."""

    def curate_rl_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load ``(name, full tensor)`` pairs, consumed one at a time, into the worker's model.
        Raises if a parameter of vLLM's model received nothing (it would keep dummy weights)."""
        model = self.model_runner.model
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in weights:
                count += 1
                yield name, tensor

        loaded = model.load_weights(weights=counted())
        if isinstance(loaded, set):
            missing = sorted({name for name, _ in model.named_parameters()} - loaded)
            if missing:
                raise RuntimeError(f"vLLM weight sync: {len(missing)} parameters were not loaded, e.g. {missing[:5]}")
        return count


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of every parameter, lazily. FSDP2 shards (DTensors) are gathered here,
    one parameter at a time, when the consumer asks for it; a tied parameter is sent once."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():  # dedups tied parameters
        name = name.replace("_checkpoint_wrapped_module.", "")  # activation-checkpointing wrappers
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _launcher_env(device: torch.device, rank: int, world_size: int) -> Iterator[None]:
    """The torchrun-style variables vLLM's external launcher reads while the engine is built;
    restored afterwards (Lightning reads LOCAL_RANK too)."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(device.index or 0), "WORLD_SIZE": str(world_size)}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        env.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT", str(_free_port())))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine(RolloutEngine):
    """Generate with an in-process ``vllm.LLM`` on each rank's own device, beside training.

    Args:
        gpu_memory_utilization: share of the device's memory vLLM may take (the rest is training's).
        dtype: vLLM's weight dtype.
        max_model_len: context length vLLM reserves KV cache for (None: the model's).
        enable_sleep_mode: free vLLM's memory (level 1: weights to CPU, KV cache dropped) between the
            step's last generate and the next sync, for training on the same device.
        seed: sampling seed; rank r uses ``seed + r``.
        enable_prefix_caching: vLLM's automatic prefix caching (reset after every sync).
        max_num_seqs: vLLM's maximum concurrent sequences (None: vLLM's default).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        max_num_seqs: int | None = None,
    ) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError('model.engine: VLLMEngine needs vLLM (GPU only): pip install -e ".[vllm]"') from e
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError("model.engine.init_args.gpu_memory_utilization", f"must be in (0, 1], got {gpu_memory_utilization}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enable_sleep_mode = enable_sleep_mode
        self.seed = seed
        self.enable_prefix_caching = enable_prefix_caching
        self.max_num_seqs = max_num_seqs
        self.llm = None
        self._asleep: set[str] = set()
        self._folder: tempfile.TemporaryDirectory | None = None

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().bind(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, *, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Build the engine on ``device`` (once), then load ``model``'s current weights: at the start
        of training, and again after a resume (the restored weights, not those it was built with)."""
        if self.llm is None:
            self._build(torch.device(device), rank, world_size)
        self.sync_weights(model)

    def _build(self, device: torch.device, rank: int, world_size: int) -> None:
        from vllm import LLM

        # The policy's config and tokenizer only; the weights come from the first sync.
        self._folder = tempfile.TemporaryDirectory(prefix="curate-rl-vllm-")
        self.model.config.save_pretrained(self._folder.name)
        self.tokenizer.save_pretrained(self._folder.name)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: asserted by the external launcher
        kwargs = {}
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        with _launcher_env(device, rank, world_size):
            self.llm = LLM(
                model=self._folder.name,
                tokenizer=self._folder.name,
                load_format="dummy",
                dtype=self.dtype,
                seed=self.seed + rank,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                enable_sleep_mode=self.enable_sleep_mode,
                enable_prefix_caching=self.enable_prefix_caching,
                distributed_executor_backend="external_launcher",
                worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                **kwargs,
            )
        self._asleep = set()

    def _require_built(self, what: str) -> None:
        if self.llm is None:
            raise RuntimeError(f"VLLMEngine.{what}() before start(): the policy module starts the engine in on_train_start")

    def _wake(self, *tags: str) -> None:
        """Wake exactly the given tags that sleep (vLLM ignores a wake_up naming an awake tag)."""
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def sleep(self) -> None:
        """After the step's last generate: weights to CPU, KV cache dropped (sleep mode only)."""
        if self.enable_sleep_mode and self.llm is not None and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's weights into vLLM (full tensors, one parameter at a time), then reset
        the prefix cache."""
        self._require_built("sync_weights")
        self._wake("weights")  # loading into slept weights writes to unmapped memory
        self.llm.collective_rpc(_LOAD_METHOD, args=(full_weights(model),))
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight sync (requests still running)")

    # ---- generation -------------------------------------------------------------------------
    def _vllm_params(self, params: SamplingParams, n: int):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            min_tokens=0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(self.eos_ids),
            include_stop_str_in_output=True,
            ignore_eos=False,
            logprobs=0,  # the sampled token's log-prob only
            seed=None,
        )

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        from vllm.inputs import TokensPrompt

        self._require_built("generate")
        self._wake("weights", "kv_cache")
        greedy = params.temperature == 0
        todo = [i for i, n in enumerate(n_each) if n > 0]
        # Greedy decoding is deterministic: one sequence per context, copied n times below.
        sps = [self._vllm_params(params, 1 if greedy else n_each[i]) for i in todo]
        prompts = [TokensPrompt(prompt_token_ids=list(contexts[i])) for i in todo]
        outs = self.llm.generate(prompts, sampling_params=sps, use_tqdm=False) if todo else []
        result: list[list[Rollout]] = [[] for _ in contexts]
        eos = set(self.eos_ids)
        for i, out in zip(todo, outs):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(toks)] if c.logprobs is not None else []
                if len(lps) != len(toks):
                    raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(toks)} tokens")
                ended_eos = bool(toks) and toks[-1] in eos
                # finish_reason "stop": an EOS id or a stop string; "length": cut at max_tokens.
                finished = c.finish_reason == "stop"
                text = self.tokenizer.decode(toks[:-1] if ended_eos else toks, skip_special_tokens=True)
                result[i].append(Rollout(toks, lps, text, finished))
            if greedy and n_each[i] > 1:
                result[i] += [copy.deepcopy(result[i][0]) for _ in range(n_each[i] - 1)]
        return result
