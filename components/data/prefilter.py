"""Pass-rate pre-filter: keep training prompts the initial policy solves between a min and a max of k.

Papers filter their prompt pools with the starting model before RL (Reinforce-Ada keeps prompts with
>= 1 correct of 16, and its "hard" set 1-2 of 16). This module does that for any dataset, as a data
option::

    data:
      prefilter: {k: 16, min_solved: 1, max_solved: 15}

When the DataModule is set up (before training, and before a checkpoint's weights are restored on
resume, so it is always the *initial* policy), every training prompt gets ``k`` samples from the
policy the run loads, scored by its task's verifier (a pass is a score >= 1), and prompts solved
fewer than ``min_solved`` or more than ``max_solved`` times are dropped. The held-out set is not
filtered: evaluation keeps measuring the full distribution. Kept prompts keep their sampling weight,
so the filtered pool is the original distribution conditioned on passing the filter.

The per-prompt solve counts are cached on disk (``cache_dir``), keyed by the model's weights, the
pool's prompt uids and contexts, and the sampling settings; the rule (``min_solved``/``max_solved``)
is applied after the cache, so changing it costs nothing. Sampling runs under its own seed inside
``torch.random.fork_rng``, so a cache hit and a miss leave the run's random stream identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from components.errors import ConfigError
from components.types import Prompt, Rollout

if TYPE_CHECKING:
    from components.handle import StepHandle


@dataclass
class PrefilterConfig:
    """Keep a training prompt when ``min_solved <= solved <= max_solved`` of ``k`` samples.

    Args:
        k: samples per prompt.
        min_solved, max_solved: the kept range of solve counts (inclusive); max_solved None is
            ``k - 1`` (drop prompts solved every time).
        temperature: sampling temperature (the RL run samples at 1.0 by default).
        max_new_tokens: generation length; None takes the run's ``model.sampling.max_new_tokens``
            (required when the DataModule is used without a trainer).
        seed: seeds the sampling.
        cache_dir: where solve counts are cached (None: no cache).
        model: a model to filter with instead of the run's policy (e.g. a stronger filter model);
            None uses the run's initial policy.
    """

    k: int = 16
    min_solved: int = 1
    max_solved: int | None = None
    temperature: float = 1.0
    max_new_tokens: int | None = None
    seed: int = 0
    cache_dir: str | None = ".cache/curate-rl/prefilter"
    model: str | None = None

    @property
    def upper(self) -> int:
        return self.k - 1 if self.max_solved is None else self.max_solved

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError("data.prefilter.k", f"must be >= 1, got {self.k}")
        if not 0 <= self.min_solved <= self.upper <= self.k:
            raise ConfigError(
                "data.prefilter.min_solved",
                f"need 0 <= min_solved <= max_solved <= k, got {self.min_solved}, {self.upper}, k={self.k}",
            )


def _weights_key(model: torch.nn.Module) -> str:
    """A hash of the model's weights: a retrained or different model misses the cache."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(model_key: str, prompts: list[Prompt], contexts: list[list[int]], cfg: PrefilterConfig, max_new: int) -> str:
    """Key of a solve-count table: model weights, data (uids and contexts) and sampling settings."""
    data = hashlib.sha1(json.dumps([[p.uid, c] for p, c in zip(prompts, contexts)]).encode()).hexdigest()[:16]
    sampling = f"k{cfg.k}-t{cfg.temperature}-n{max_new}-s{cfg.seed}"
    return f"{model_key}-{data}-{sampling}"


def solve_counts(
    prompts: list[Prompt],
    contexts: list[list[int]],
    generate: Callable[[list[list[int]], list[int], Any], list[list[Rollout]]],
    verifier: Any,
    cfg: PrefilterConfig,
    max_new: int,
    chunk: int = 64,
) -> dict[str, int]:
    """``k`` samples per prompt from ``generate(contexts, n_each, params)`` (an engine's); the number
    that pass, by uid (with a progress bar)."""
    from tqdm.auto import tqdm

    from components.engines.base import SamplingParams

    params = SamplingParams(cfg.temperature, 1.0, max_new)
    counts: dict[str, int] = {}
    with torch.random.fork_rng(), tqdm(total=len(prompts), desc=f"prefilter (k={cfg.k})", unit="prompt") as bar:
        torch.manual_seed(cfg.seed)
        for s in range(0, len(prompts), chunk):
            ps, cs = prompts[s : s + chunk], contexts[s : s + chunk]
            outs = generate(cs, [cfg.k] * len(ps), params)
            for p, rs in zip(ps, outs):
                verify = verifier(p)
                counts[p.uid] = sum(float(verify(r.text.strip(), p)) >= 1.0 for r in rs)
            bar.update(len(ps))
    return counts


@dataclass
class PrefilterReport:
    """What the pre-filter did: kept and dropped counts (overall and per slice), cache hit, seconds."""

    kept: int
    dropped_low: int  # solved fewer than min_solved times
    dropped_high: int  # solved more than max_solved times
    by_tag: dict[str, dict[str, int]]
    cache_hit: bool
    seconds: float
    cache_file: str | None

    def metrics(self) -> dict[str, float]:
        return {
            "prefilter/kept": float(self.kept),
            "prefilter/dropped_low": float(self.dropped_low),
            "prefilter/dropped_high": float(self.dropped_high),
            "prefilter/seconds": self.seconds,
        }

    def summary(self) -> str:
        total = self.kept + self.dropped_low + self.dropped_high
        tags = ", ".join(f"{t} {c['kept']}/{c['total']}" for t, c in sorted(self.by_tag.items()))
        return (
            f"prefilter: kept {self.kept}/{total} prompts; dropped {self.dropped_low} solved too rarely, "
            f"{self.dropped_high} solved too often; kept by slice: {tags}; "
            f"{'cache hit' if self.cache_hit else 'computed'} in {self.seconds:.1f}s"
        )


def apply_prefilter(
    cfg: PrefilterConfig,
    prompts: list[Prompt],
    weights: list[float],
    verifier: Any,
    handle: StepHandle | None = None,
) -> tuple[list[Prompt], list[float], PrefilterReport]:
    """Filter a training pool with the run's initial policy, through its ``handle`` (weights,
    engine, contexts and sampling length), or with ``cfg.model`` when set or when there is no handle.

    Prints a one-line summary; the caller logs ``report.metrics()``.
    """
    cfg.validate()
    t0 = time.time()
    if cfg.model is not None or handle is None:
        if cfg.model is None:
            raise ConfigError("data.prefilter.model", "no policy to filter with: set data.prefilter.model or run under a trainer")
        from components.engines.hf import HFEngine
        from components.policy import encode_prompt, load_policy

        model, tok = load_policy(cfg.model)
        engine = HFEngine()
        engine.bind(model, tok)
        generate = engine.generate
        contexts = [encode_prompt(tok, p.text) for p in prompts]
        max_new = cfg.max_new_tokens
    else:
        model, generate = handle.policy, handle.generate
        contexts = [handle.context_of(p) for p in prompts]
        max_new = cfg.max_new_tokens or handle.sampling.max_new_tokens
    if max_new is None:
        raise ConfigError("data.prefilter.max_new_tokens", "must be set when filtering without a trainer")
    key = cache_key(_weights_key(model), prompts, contexts, cfg, max_new)
    path = Path(cfg.cache_dir) / f"{key}.json" if cfg.cache_dir else None
    hit = path is not None and path.exists()
    if hit:
        counts = json.loads(path.read_text())
    else:
        # Duplicates in the pool (small item spaces) are sampled once.
        uniq = {p.uid: (p, c) for p, c in zip(prompts, contexts)}
        ps, cs = [v[0] for v in uniq.values()], [v[1] for v in uniq.values()]
        counts = solve_counts(ps, cs, generate, verifier, cfg, max_new)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: concurrent runs share the cache
            tmp.write_text(json.dumps(counts))
            tmp.replace(path)  # atomic: a killed run never leaves a half-written cache
    kept, kept_w = [], []
    low = high = 0
    by_tag: dict[str, Counter] = {}
    for p, w in zip(prompts, weights):
        c = counts[p.uid]
        t = by_tag.setdefault(p.tag, Counter())
        t["total"] += 1
        if c < cfg.min_solved:
            low += 1
        elif c > cfg.upper:
            high += 1
        else:
            kept.append(p)
            kept_w.append(w)
            t["kept"] += 1
    report = PrefilterReport(
        kept=len(kept),
        dropped_low=low,
        dropped_high=high,
        by_tag={k: {"total": v["total"], "kept": v["kept"]} for k, v in by_tag.items()},
        cache_hit=hit,
        seconds=round(time.time() - t0, 2),
        cache_file=str(path) if path else None,
    )
    rank_zero_info(report.summary())
    if not kept:
        raise ConfigError(
            "data.prefilter", f"no prompt was solved between {cfg.min_solved} and {cfg.upper} of {cfg.k}: the pool is empty"
        )
    return kept, kept_w, report
