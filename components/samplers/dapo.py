"""DAPO dynamic sampling: keep generating prompt batches until enough groups carry a signal."""

from __future__ import annotations

import logging

from components.algos.selection import spread
from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.base import Sampler, make_group
from components.types import Group, Prompt

log = logging.getLogger(__name__)


class DynamicSampling(Sampler):
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476; verl ``recipe/dapo``).

    Each round samples ``group_size`` rollouts for every prompt of a generation batch and drops the
    groups whose rewards have zero spread (all equal: no GRPO signal). Round 1 uses the step's own
    prompts; each further round draws ``gen_batch_size`` fresh prompts from the data stream. It stops
    once ``batch_size`` groups are kept or after ``max_rounds`` rounds, and returns the first
    ``batch_size`` kept groups in generation order (verl too trains on the first ones; the surplus
    was drawn and is counted in the budget).

    Args:
        group_size: rollouts per prompt, G (DAPO: 16). Must be >= 2: a single rollout has no spread.
            (verl keeps size-1 groups, whose GRPO advantage is the raw reward; here the
            estimators give them 0, so they could only waste the batch.)
        batch_size: groups to keep (DAPO: the train batch, 512). Default: the number of prompts in
            the step's batch. Set ``data.batch_size`` larger to over-generate in round 1 as verl's
            ``gen_batch_size = 3 x train`` does.
        gen_batch_size: prompts drawn per further round (default: the step's batch size).
        max_rounds: generation rounds per step, round 1 included (verl ``max_num_gen_batches``: 10).
        metric: what must differ within a group: ``reward`` (default: spread of the rewards, so
            non-binary rewards work) or ``passed`` (verl's ``metric=acc``, the paper's
            0 < #correct < G). With DAPO's overlong shaping, ``reward`` also keeps all-wrong groups
            that differ only by length penalty; ``passed`` does not.

    When ``max_rounds`` run out with fewer than ``batch_size`` kept groups, the step trains on the
    groups it has (verl raises instead) and logs ``dapo/exhausted = 1``; with none kept the step
    makes no update. Metrics: ``dapo/rounds``, ``dapo/kept_groups``, ``dapo/dropped_groups`` (zero
    spread), ``dapo/surplus_groups`` (mixed but beyond ``batch_size``), ``dapo/exhausted``.
    """

    def __init__(
        self,
        group_size: int = 16,
        batch_size: int | None = None,
        gen_batch_size: int | None = None,
        max_rounds: int = 10,
        metric: str = "reward",
    ) -> None:
        for name, val, low in (
            ("group_size", group_size, 2),
            ("batch_size", batch_size, 1),
            ("gen_batch_size", gen_batch_size, 1),
            ("max_rounds", max_rounds, 1),
        ):
            if val is not None and val < low:
                raise ConfigError(f"model.sampler.{name}", f"must be >= {low}, got {val}")
        if metric not in ("reward", "passed"):
            raise ConfigError("model.sampler.metric", f"must be 'reward' or 'passed', got {metric!r}")
        self.group_size, self.batch_size, self.gen_batch_size = group_size, batch_size, gen_batch_size
        self.max_rounds, self.metric = max_rounds, metric
        self._warned = False

    def collect(self, prompts: list[Prompt], handle: StepHandle) -> list[Group]:
        target = self.batch_size or len(prompts)
        kept: list[Group] = []
        dropped = rounds = 0
        batch = prompts
        while rounds < self.max_rounds and len(kept) < target:
            if rounds:
                batch = handle.draw_prompts(self.gen_batch_size or len(prompts))
            rounds += 1
            for p, rs in zip(batch, handle.sample(batch, [self.group_size] * len(batch)), strict=True):
                values = [r.reward if self.metric == "reward" else float(r.passed) for r in rs]
                if spread(values) > 0:
                    kept.append(make_group(p, handle.context_of(p), rs))
                else:
                    dropped += 1
        exhausted = len(kept) < target
        if exhausted and not self._warned:
            log.warning(
                "DynamicSampling: %d of %d groups kept after max_rounds=%d; training on what was kept "
                "(logged as dapo/exhausted, warned once)",
                len(kept),
                target,
                self.max_rounds,
            )
            self._warned = True
        handle.log("dapo/rounds", rounds)
        handle.log("dapo/kept_groups", min(len(kept), target))
        handle.log("dapo/dropped_groups", dropped)
        handle.log("dapo/surplus_groups", max(len(kept) - target, 0))
        handle.log("dapo/exhausted", float(exhausted))
        return kept[:target]
