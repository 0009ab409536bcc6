"""Held-out evaluation: pass@1 overall and by slice, and pass@k, on the bare prompt.

Evaluation never goes through a sampler or a context transform, so a hint never reaches it. A reward
that raises or gives NaN scores the rollout as failed here too.
"""

from __future__ import annotations

import math
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
        outs = engine.generate(contexts, [k] * len(prompts), params)
        for p, rs in zip(prompts, outs):
            score_guarded(reward, p, rs)  # bare prompt, never a hint; a faulty reward scores a fail
            c = sum(r.passed for r in rs)
            self._pass.update(torch.tensor(c / k), weight=1)
            self._passk.update(torch.tensor(pass_at_k(k, c, k)), weight=1)
            if p.tag not in self._tags:
                self._tags[p.tag] = MeanMetric().to(self._pass.device)
            self._tags[p.tag].update(torch.tensor(c / k))

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
        return res
