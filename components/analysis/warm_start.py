"""Supervised warm starts of the embedded char-level model: one spec, any task mix, any answer format.

RL sharpens what supervised training half-learned, so every regime's model is a warm start stopped
at a chosen point: train on some slices of a task mix (``train_tags``), and stop as soon as the
sampled (T=1) pass rate on a named slice (``target_tag``) reaches ``target``. The supervised target
of each prompt is :func:`components.data.tasks.target_text`: the worked reference for worked-steps tasks
(``Prompt.answer_marker`` set), a space and the bare answer otherwise, then EOS.

:func:`warm_start` trains and saves a model; :func:`measure_pass_rates` reports per-slice pass rates
of any policy on a DataModule's held-out set (the same estimate the RL run's eval makes at step 0:
``samples`` draws per item at T=1); :func:`measure_hinted_pass_rates` the same per SAGE hint level.
``scripts/warm_start.py`` is the command line.

A build saves its state (weights, optimizer, data stream, step) into ``<out>/warm_start.ckpt`` at
every evaluation, so an interrupted build of the same spec resumes where it stopped (bit for bit:
the same weights as an uninterrupted build), and writes ``<out>/warm_start.json`` beside the weights:
the spec, its hash, the seed, the steps, the data and the stopping evaluation.

**Hinted examples** (``hint_share`` > 0): that share of the supervised examples carry a hint in
SAGE's form (:mod:`components.samplers.sage`): the prompt becomes ``{problem}\nHere is a hint to
help you:\n{hint}`` with the hint a partial solution (:class:`~components.samplers.hints.PrefixHint`
of level 1..``hint_levels``, uniformly: the first l/(L+1) of the worked reference, or of the answer
on a plain mix; never all of it). The target is the whole answer (``hint_target: whole``) or, for a
worked answer whose verifier reads only what follows the answer marker, the rest of the solution
after the hint (``hint_target: rest``: the model continues the partial solution it was given, so a
longer hint leaves less to derive). A model built so has read hints before RL, so SAGE's premise (a
hinted group gets a success) can hold.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from components.data.datamodule import PromptDataModule, ReasoningGymTask
from components.data.tasks import target_text
from components.engines.base import SamplingParams
from components.engines.hf import HFEngine
from components.errors import ConfigError
from components.policy import build_char_tokenizer, encode_prompt, tiny_config
from components.samplers.hints import PrefixHint
from components.samplers.sage import DEFAULT_TEMPLATE
from components.types import Prompt

# Architectures a warm start can build (all Llama with the char tokenizer). ``tiny`` is the shipped
# model's (about 0.9M parameters); ``small`` is a few million parameters (about 2.9M), still minutes
# per RL run on 2 cores.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=192, intermediate_size=576, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6),
}


@dataclass
class WarmStartSpec:
    """What a warm start trains on and when it stops.

    Args:
        tasks: the task mix (every slice is evaluated; only ``train_tags`` slices are trained on).
        train_tags: slices trained on (None: all).
        target_tag, target: stop at the first evaluation where the sampled pass rate on
            ``target_tag`` is >= ``target``.
        model_size: a key of :data:`MODEL_SIZES`.
        max_positions: the model's context (prompt + answer + EOS must fit).
        max_new_tokens: generation length for evaluation (None: the longest target + 8).
        max_steps, batch_size, lr, eval_every, eval_items, eval_samples, seed: the SFT run.
        hint_share: share of training examples given a SAGE-form hint (0: none).
        hint_levels: the hint levels drawn (SAGE's L = 3).
        hint_target: ``whole`` (the full answer after a hint) or ``rest`` (the solution after the
            hint, on worked answers with an answer marker; the whole answer elsewhere).
    """

    tasks: list[ReasoningGymTask]
    train_tags: list[str] | None = None
    target_tag: str = "d2"
    target: float = 0.22
    model_size: str = "tiny"
    max_positions: int = 64
    max_new_tokens: int | None = None
    max_steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 100
    eval_items: int = 400
    eval_samples: int = 4
    seed: int = 1234
    train_pool: int = 20000
    extra: dict = field(default_factory=dict)  # free-form notes that should change the cache key
    hint_share: float = 0.0
    hint_levels: int = 3
    hint_target: str = "whole"

    def validate(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise ConfigError("warm_start.model_size", f"{self.model_size!r} is not one of {sorted(MODEL_SIZES)}")
        tags = {t.tag for t in self.tasks}
        if self.target_tag not in tags:
            raise ConfigError("warm_start.target_tag", f"{self.target_tag!r} is not a slice of the mix; valid: {sorted(tags)}")
        if self.train_tags is not None and not set(self.train_tags) <= tags:
            raise ConfigError(
                "warm_start.train_tags", f"{sorted(set(self.train_tags) - tags)} are not slices; valid: {sorted(tags)}"
            )
        if not 0.0 < self.target <= 1.0:
            raise ConfigError("warm_start.target", f"must be in (0, 1], got {self.target}")
        if not 0.0 <= self.hint_share <= 1.0:
            raise ConfigError("warm_start.hint_share", f"must be in [0, 1], got {self.hint_share}")
        if self.hint_levels < 1:
            raise ConfigError("warm_start.hint_levels", f"must be >= 1, got {self.hint_levels}")
        if self.hint_target not in ("whole", "rest"):
            raise ConfigError("warm_start.hint_target", f"must be one of ['whole', 'rest'], got {self.hint_target!r}")

    def key(self) -> str:
        """A hash of everything that determines the trained model (the cache key of a regime).

        Fields added after the first regimes were built hash only when set away from their default,
        so the shipped and cached builds keep their keys."""
        d = asdict(self)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                del d[k]
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


_LATER_FIELDS = {"hint_share": 0.0, "hint_levels": 3, "hint_target": "whole"}


def new_model(size: str, max_positions: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A freshly initialised char-level Llama of ``size`` (the caller seeds torch first)."""
    tok = build_char_tokenizer()
    cfg = tiny_config(len(tok), tok, max_position_embeddings=max_positions, **MODEL_SIZES[size])
    return LlamaForCausalLM(cfg), tok


@torch.no_grad()
def measure_pass_rates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    dm: PromptDataModule,
    max_new_tokens: int,
    samples: int = 4,
    answer_lengths: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Sampled (T=1) pass rate per slice on ``dm.heldout`` (``samples`` draws per item), plus ``all``.

    When ``answer_lengths`` is given it is filled with the token length of every completion per slice.
    """
    engine = HFEngine()
    engine.bind(model, tok)
    ctxs = [encode_prompt(tok, p.text) for p in dm.heldout]
    outs = engine.generate(ctxs, [samples] * len(ctxs), SamplingParams(1.0, 1.0, max_new_tokens))
    by_tag: dict[str, list[float]] = {}
    for p, rs in zip(dm.heldout, outs):
        verify = dm.verifier(p)
        by_tag.setdefault(p.tag, []).extend(float(verify(r.text.strip(), p) >= 1.0) for r in rs)
        if answer_lengths is not None:
            answer_lengths.setdefault(p.tag, []).extend(len(r.token_ids) for r in rs)
    rates = {t: sum(x) / len(x) for t, x in sorted(by_tag.items())}
    rates["all"] = sum(sum(x) for x in by_tag.values()) / max(sum(len(x) for x in by_tag.values()), 1)
    return rates


def _target_ids(tok: PreTrainedTokenizerBase, p: Any) -> list[int]:
    return tok(target_text(p), add_special_tokens=False).input_ids + [tok.eos_token_id]


def _target_after(tok: PreTrainedTokenizerBase, p: Prompt, hint: str, mode: str) -> list[int]:
    """The target after a hint: the whole answer, or (``rest``, on a worked reference with an answer
    marker, of which the hint is a prefix) the solution's remainder after the hint, then EOS. A hint
    that cuts into the marker keeps the whole answer: the verifier reads the completion only, so the
    completion must hold the whole marker."""
    ref = (p.reference or "").strip()
    rest = ref[len(hint) :] if ref.startswith(hint) else ""
    if mode == "whole" or not p.answer_marker or p.answer_marker not in rest:
        return _target_ids(tok, p)
    return tok(rest, add_special_tokens=False).input_ids + [tok.eos_token_id]


def hinted_text(prompt: Prompt, hint: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text carrying ``hint`` exactly as SAGE's sampler builds it
    (:meth:`components.samplers.sage.HintTransform.hinted_text`: the bare question inside the task's
    prompt becomes the template filled with it and the hint)."""
    q = prompt.question
    if q and q in prompt.text:
        return prompt.text.replace(q, template.format(problem=q, hint=hint), 1)
    return template.format(problem=prompt.text, hint=hint)


def prompt_hints(prompt: Prompt, levels: int) -> dict[int, str] | None:
    """SAGE's hints of levels ``1..levels`` for ``prompt`` as recipes/sage.yaml writes them
    (:class:`PrefixHint` from the reference solution, else the answer); None when it has none."""
    return PrefixHint(use_answer=True).hints([prompt], levels, None)[0]


@torch.no_grad()
def measure_hinted_pass_rates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    dm: PromptDataModule,
    max_new_tokens: int,
    samples: int = 4,
    levels: int = 3,
    template: str = DEFAULT_TEMPLATE,
) -> dict[str, dict[str, float]]:
    """Sampled (T=1) pass rate on ``dm.heldout`` per SAGE hint level (0 = no hint, then 1..``levels``),
    per slice and ``all``: whether the model can read a hint (SAGE's premise: a hinted group gets a
    success; the rate should rise with the level). Items without a hint at a level are left out of it."""
    engine = HFEngine()
    engine.bind(model, tok)
    out: dict[str, dict[str, float]] = {}
    hints = [prompt_hints(p, levels) for p in dm.heldout]
    for level in range(levels + 1):
        items = [(p, p.text if level == 0 else hinted_text(p, h[level], template))
                 for p, h in zip(dm.heldout, hints) if level == 0 or (h and level in h)]  # fmt: skip
        outs = engine.generate(
            [encode_prompt(tok, t) for _, t in items], [samples] * len(items), SamplingParams(1.0, 1.0, max_new_tokens)
        )
        by_tag: dict[str, list[float]] = {}
        for (p, _), rs in zip(items, outs):
            verify = dm.verifier(p)
            by_tag.setdefault(p.tag, []).extend(float(verify(r.text.strip(), p) >= 1.0) for r in rs)
        rates = {t: sum(x) / len(x) for t, x in sorted(by_tag.items())}
        rates["all"] = sum(sum(x) for x in by_tag.values()) / max(sum(len(x) for x in by_tag.values()), 1)
        out[f"level_{level}"] = rates
    return out


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous state


def warm_start(spec: WarmStartSpec, out: str | Path, log: Callable[[str], None] = print, resume: bool = True) -> dict[str, Any]:
    """Train a fresh model on ``spec`` and save it (weights, config, tokenizer) into ``out``.

    The run's state is saved to ``<out>/warm_start.ckpt`` at every evaluation; with ``resume`` a
    state of the same spec found there is continued from (a state of another spec is ignored), and
    it is removed once the model is saved. ``<out>/warm_start.json`` records how the model was built.
    Returns a report: steps, seconds, the stopping evaluation's per-slice pass rates, and whether
    the target was reached (a run that hits ``max_steps`` first is saved and reported as such).
    """
    spec.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "warm_start.ckpt"
    torch.manual_seed(spec.seed)
    model, tok = new_model(spec.model_size, spec.max_positions)
    train_tasks = [t for t in spec.tasks if spec.train_tags is None or t.tag in spec.train_tags]
    # Seeds apart from the RL pools (data.seed 0 -> reasoning-gym seeds 0..): supervised items are
    # not the RL training prompts (though small item spaces overlap anyway).
    dm = PromptDataModule(tasks=train_tasks, train_size=spec.train_pool, heldout_size=spec.eval_items, seed=spec.seed)
    dm.setup()
    # The stopping evaluation covers every slice, trained or not.
    eval_dm = PromptDataModule(
        tasks=spec.tasks, train_size=20 * len(spec.tasks), heldout_size=spec.eval_items, seed=spec.seed + 1
    )
    eval_dm.setup()
    hint_rng = torch.Generator().manual_seed(spec.seed + 2)  # which examples get a hint, and which level
    hints = {p.uid: prompt_hints(p, spec.hint_levels) for p in dm.train_pool.prompts} if spec.hint_share else {}

    def example(p: Prompt) -> tuple[list[int], list[int]]:
        """(context, target) token ids: the bare prompt and answer, or, for a share, a hinted one."""
        h = hints.get(p.uid)
        if not h or float(torch.rand((), generator=hint_rng)) >= spec.hint_share:
            return encode_prompt(tok, p.text), _target_ids(tok, p)
        level = int(torch.randint(1, spec.hint_levels + 1, (), generator=hint_rng))
        if level not in h:
            return encode_prompt(tok, p.text), _target_ids(tok, p)
        return encode_prompt(tok, hinted_text(p, h[level])), _target_after(tok, p, h[level], spec.hint_target)

    longest = max(len(_target_ids(tok, p)) for p in [*dm.train_pool.prompts, *eval_dm.heldout])
    max_new = spec.max_new_tokens or longest + 8
    widest_prompt = max(len(encode_prompt(tok, p.text)) for p in eval_dm.heldout)
    if hints:  # the longest hinted training prompt must fit beside its answer too
        widest_prompt = max(
            widest_prompt,
            *(len(encode_prompt(tok, hinted_text(p, h[max(h)]))) for p in dm.train_pool.prompts if (h := hints[p.uid])),
        )
    widest = widest_prompt + max_new
    if widest > spec.max_positions:
        raise ConfigError(
            "warm_start.max_positions", f"{spec.max_positions} is too short: prompts plus {max_new} new tokens need {widest}"
        )
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs, masks = [], []
        for p in dm.draw(spec.batch_size):
            ctx, ans = example(p)
            seqs.append(ctx + ans)
            masks.append([0] * len(ctx) + [1] * len(ans))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        att, lab = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)], att[i, : len(s)], lab[i, : len(s)] = torch.tensor(s), 1, torch.tensor(m)
        return ids, att, lab

    key = spec.key()
    start, elapsed, resumed_from, reached = 1, 0.0, 0, False
    rates: dict[str, float] = {}
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("spec_key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            dm.generator.set_state(state["data_rng"])
            hint_rng.set_state(state["hint_rng"])
            start, elapsed, rates = state["step"] + 1, state["seconds"], state["rates"]
            resumed_from, reached = state["step"], state.get("reached", False)
            if reached:  # killed between reaching the target and saving: nothing left to train
                start = spec.max_steps + 1
            log(f"resuming the build from step {resumed_from} ({ckpt})")
        else:
            log(f"ignoring {ckpt}: it belongs to another spec ({state.get('spec_key')}, this one is {key})")
    t0 = time.time() - elapsed
    step = start - 1 if start <= spec.max_steps else resumed_from
    for step in range(start, spec.max_steps + 1):
        ids, att, lab = batch()
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        tgt, m = ids[:, 1:], lab[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        loss = (nll * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % spec.eval_every == 0:
            with torch.random.fork_rng():  # evaluation sampling must not shift the training run
                rates = measure_pass_rates(model, tok, eval_dm, max_new, spec.eval_samples)
            reached = rates[spec.target_tag] >= spec.target
            _save_state(ckpt, {
                "spec_key": key, "step": step, "seconds": time.time() - t0, "rates": rates, "reached": reached,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "data_rng": dm.generator.get_state(), "hint_rng": hint_rng.get_state(),
            })  # fmt: skip
            log(f"step {step} loss {loss.item():.3f} pass@1(T=1) {_fmt(rates)} {time.time() - t0:.0f}s")
            if reached:
                break
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = {
        "steps": step,
        "seconds": round(time.time() - t0, 1),
        "reached_target": reached,
        "stop_eval": rates,
        "max_new_tokens": max_new,
        "params": sum(p.numel() for p in model.parameters()),
    }
    record = {
        **report,
        "spec_key": key,
        "spec": asdict(spec),
        "seed": spec.seed,
        "resumed_from_step": resumed_from,
        "data": {
            "train_tags": spec.train_tags,
            "train_pool": spec.train_pool,
            "data_seed": spec.seed,
            "eval_items": spec.eval_items,
            "eval_seed": spec.seed + 1,
            "hint_share": spec.hint_share,
        },
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "warm_start.json").write_text(json.dumps(record, indent=2, default=str))
    ckpt.unlink(missing_ok=True)
    log(f"saved to {out} after {step} steps ({report['seconds']}s); target reached: {reached}")
    return report


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _fmt(rates: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in rates.items())
