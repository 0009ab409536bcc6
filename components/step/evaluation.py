"""Held-out evaluation: pass@1 overall and by slice, and pass@k, on the bare prompt.

Evaluation never goes through a sampler or a context transform, so a hint never reaches it. A reward
that raises or gives NaN scores the rollout as failed here too.

Seeded draws: with an engine that takes keys (the HF engine), sample ``j`` of an item draws from
its own random stream, keyed by ``(eval.seed, item uid, j)`` (an item listed twice in one
evaluation gets a second set of streams for its second occurrence). The estimate then depends on
nothing else, to float rounding (a draw near a token boundary can flip when another batch shape
rounds the logits differently): not on how the held-out set is split into calls, not on the run's
training RNG (evaluation draws nothing from it), and two arms evaluated at the same ``eval.seed``
see the same draws for the same policy (paired comparisons). Engines without keys (vLLM, and the HF
engine under FSDP, which samples through transformers' ``generate``) draw from torch's global
generator, whose state is saved before every evaluation and restored after it (the module at the
start and the end of training, RunGuard around Lightning's validation), so training's draws do not
depend on whether or how often the run evaluates.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric

from components.engines.base import RolloutEngine, SamplingParams
from components.rewards.verifier import Reward, score_guarded
from components.types import Prompt


@dataclass
class EvalConfig:
    """Held-out evaluation on the bare prompt."""

    samples: int = 4  # samples per item: pass@1 is their mean, pass@k uses the unbiased estimator
    temperature: float = 1.0
    at_start: bool = True  # evaluate before the first step (logged at step 0)
    seed: int = 0  # keys every (item, sample)'s random stream; the same in every arm and at every evaluation


def item_keys(seed: int, uids: list[str], seen: Counter[str] | None = None) -> torch.Tensor:
    """One int64 key per item from ``(seed, uid, occurrence)``: a stable hash (not Python's
    salted ``hash``), so the same item gets the same key in every process. ``seen`` counts the
    occurrences of earlier calls (updated in place)."""
    seen = Counter() if seen is None else seen
    keys = []
    for uid in uids:
        digest = hashlib.blake2b(f"{seed}/{uid}/{seen[uid]}".encode(), digest_size=8).digest()
        seen[uid] += 1
        keys.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(keys, dtype=torch.long)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c passes (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


class Evaluator(torch.nn.Module):
    """Accumulates pass rates over the held-out prompts of one evaluation, then reports and resets.

    A submodule of the policy module, so its metrics live on the training device and sync over
    data-parallel ranks as torchmetrics does (their states are not saved in checkpoints)."""

    def __init__(self, cfg: EvalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._pass = MeanMetric()
        self._passk = MeanMetric()
        self._tags: dict[str, MeanMetric] = {}
        self._seen: Counter[str] = Counter()  # occurrences of each uid in this evaluation so far

    @torch.no_grad()
    def run(
        self,
        prompts: list[Prompt],
        contexts: list[list[int]],
        engine: RolloutEngine,
        reward: Reward,
        sampling: SamplingParams,
    ) -> None:
        """Sample ``eval.samples`` completions of each bare prompt and score them."""
        params = SamplingParams(self.cfg.temperature, 1.0, sampling.max_new_tokens, list(sampling.stop))
        k = self.cfg.samples
        if not prompts:
            return
        if engine.keyed:
            keys = item_keys(self.cfg.seed, [p.uid for p in prompts], self._seen)
            outs = engine.generate(contexts, [k] * len(prompts), params, keys=keys)
        else:
            outs = engine.generate(contexts, [k] * len(prompts), params)
        passes = []
        for p, rs in zip(prompts, outs):
            score_guarded(reward, p, rs)  # bare prompt, never a hint; a faulty reward scores a fail
            passes.append(sum(r.passed for r in rs))
        # One metric update per call (and per slice), not per item.
        c = torch.tensor(passes, dtype=torch.float)
        self._pass.update(c / k)
        self._passk.update(torch.tensor([pass_at_k(k, int(x), k) for x in passes]))
        tags = [p.tag for p in prompts]
        for tag in dict.fromkeys(tags):
            if tag not in self._tags:
                self._tags[tag] = MeanMetric().to(self._pass.device)
            self._tags[tag].update(c[torch.tensor([t == tag for t in tags])] / k)

    def results(self) -> dict[str, float]:
        """``eval/pass_at_1``, ``eval/pass_at_<k>`` and ``eval/pass_at_1/<slice>``; resets the sums."""
        res = {
            "eval/pass_at_1": float(self._pass.compute()),
            f"eval/pass_at_{self.cfg.samples}": float(self._passk.compute()),
        }
        for tag, metric in sorted(self._tags.items()):
            res[f"eval/pass_at_1/{tag}"] = float(metric.compute())
        for metric in [self._pass, self._passk, *self._tags.values()]:
            metric.reset()
        self._seen.clear()
        return res
