"""SAGE-LIGHT (Liao et al. 2026, arXiv 2602.03143, eq. 12; code ``BaohaoLiao/SAGE`` method
``sage-light``), reference §4a-4b: a per-prompt hint level kept across visits, and one rollout pass
per step at that level, with no probe group (the paper: 1.2x GRPO's training time, SAGE 2.3x).

On a prompt's first draw of a step its level is set from what its previous visit saw (its level
then and its accuracy, the share of rollouts with reward > 0), by one of two named rules:

- ``paper`` (eq. 12): raise ``l = min(l + 1, L)`` when the accuracy was below ``alpha`` (0.35);
  never lower;
- ``code`` (the authors' ``hint_trainer.py``): raise when the accuracy was <= ``min_threshold``
  (``scripts/run_sage.sh``: 0.1), lower ``l = max(l - 1, 0)`` when it was > ``max_threshold`` (0.35).

A first visit has no hint. A prompt at level > 0 gets freshly written hints every visit (online
self-hint: the current policy writes them); when writing fails, the last hints that were written
for it are used instead (``hint/fallback_used``), else it is drawn with no hint. As in the authors'
code the level stored for the next visit is the level actually used (a prompt whose hint failed
falls back to level 0 and climbs again). Every draw of the prompt in the step (all Ada-Seq rounds,
DAPO's group, an allocation's pilot and rest) uses that one context, so a group has one context
and the loss sees it; evaluation sees the bare prompt.

Per-prompt state (level, last accuracy, last written hints), keyed by prompt uid, is in
``state_dict`` and the Lightning checkpoint. Metrics (the authors' names): ``hint/used_no_hint``,
``hint/used_level_{l}``, ``hint/acc_no_hint_mean``, ``hint/acc_level_{l}_mean``,
``hint/prompts_with_hint``, ``hint/fallback_used``, ``hint/accuracy_min_threshold``,
``hint/accuracy_max_threshold`` (``paper``: both are alpha), ``hint/generate_*``; ours:
``hint/level_mean`` over the prompts drawn, ``hint/truncated``, ``hint/skipped_overflow``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from jsonargparse import lazy_instance

from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.base import Sampler, TransformedSampler
from components.samplers.hints import HintSource, SelfHint
from components.samplers.sage import DEFAULT_TEMPLATE, HintTransform, _inner
from components.types import Group, Prompt, Rollout

RULES = ("paper", "code")


class SAGELightHints(HintTransform):
    """The persistent-level schedule of SAGE-LIGHT (see the module docstring).

    Args (beyond :class:`~components.samplers.sage.HintTransform`'s):
        rule: ``paper`` (raise-only below ``alpha``) or ``code`` (two thresholds).
        alpha: the ``paper`` rule's threshold (paper: 0.35).
        min_threshold: the ``code`` rule raises at accuracy <= this (``run_sage.sh``: 0.1).
        max_threshold: the ``code`` rule lowers at accuracy > this (0.35).
    """

    def __init__(
        self,
        hints: HintSource,
        max_level: int = 3,
        template: str = DEFAULT_TEMPLATE,
        overflow: str = "truncate",
        max_context_tokens: int | None = None,
        rule: str = "code",
        alpha: float = 0.35,
        min_threshold: float = 0.1,
        max_threshold: float = 0.35,
    ) -> None:
        if rule not in RULES:
            raise ConfigError("model.sampler.rule", f"must be one of {RULES}, got {rule!r}")
        if not 0 < alpha <= 1:
            raise ConfigError("model.sampler.alpha", f"must be in (0, 1], got {alpha}")
        if not 0 <= min_threshold <= max_threshold <= 1:
            raise ConfigError(
                "model.sampler.min_threshold",
                f"need 0 <= min_threshold <= max_threshold <= 1, got {min_threshold} and {max_threshold}",
            )
        super().__init__(hints, max_level, template, overflow, max_context_tokens)
        self.rule, self.alpha, self.min_threshold, self.max_threshold = rule, alpha, min_threshold, max_threshold
        self.levels: dict[str, int] = {}  # uid -> level used on the last visit
        self.accs: dict[str, float] = {}  # uid -> accuracy on the last visit
        self.last_hints: dict[str, dict[int, str]] = {}  # uid -> last hints written for it

    def logged_every_step(self) -> list[str]:
        used = ["hint/used_no_hint", *(f"hint/used_level_{lv}" for lv in range(1, self.max_level + 1))]
        return [*super().logged_every_step(), "hint/fallback_used", *used]

    def begin_step(self, handle: StepHandle | None) -> None:
        super().begin_step(handle)
        self.visited: set[str] = set()
        self.drawn: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # uid -> [rollouts, reward > 0]

    def next_level(self, uid: str) -> int:
        """This visit's level from the previous visit's level and accuracy (the rule)."""
        if uid not in self.accs:
            return 0  # first visit: no hint
        level, acc = self.levels.get(uid, 0), self.accs[uid]
        if self.rule == "paper":
            return min(level + 1, self.max_level) if acc < self.alpha else level
        if acc <= self.min_threshold:
            return min(level + 1, self.max_level)
        if acc > self.max_threshold:
            return max(level - 1, 0)
        return level

    def prepare(self, prompts: list[Prompt], handle: StepHandle) -> None:
        new = list({p.uid: p for p in prompts if p.uid not in self.visited}.values())
        if not new:
            return
        self.visited.update(p.uid for p in new)
        want = {p.uid: self.next_level(p.uid) for p in new}
        hinted = [p for p in new if want[p.uid] > 0]
        self.write(hinted, handle)
        for p in hinted:
            hints = self.written.get(p.uid)
            if hints:
                self.last_hints[p.uid] = hints
            elif p.uid in self.last_hints:
                hints = self.last_hints[p.uid]
                self.m["hint/fallback_used"] += 1
            self.apply(p, want[p.uid], hints, handle)  # on failure the prompt stays at level 0

    def after_draw(
        self, prompts: list[Prompt], n_each: list[int], outs: list[list[Rollout]], handle: StepHandle
    ) -> list[list[Rollout]]:
        for p, rs in zip(prompts, outs, strict=True):
            d = self.drawn[p.uid]
            d[0] += len(rs)
            d[1] += sum(r.reward > 0 for r in rs)
        return outs

    def end_step(self, groups: list[Group], handle: StepHandle) -> None:
        by_level: dict[int, list[float]] = defaultdict(list)
        for uid, (n, pos) in self.drawn.items():
            if not n:
                continue
            level = self.level.get(uid, 0)
            self.levels[uid], self.accs[uid] = level, pos / n
            by_level[level].append(pos / n)
        for level in range(self.max_level + 1):
            name = "no_hint" if level == 0 else f"level_{level}"
            accs = by_level.get(level, [])
            self.m[f"hint/used_{name}"] += len(accs)
            # authors: the mean over prompts of each prompt's accuracy; 0 when no prompt was at that level
            handle.log(f"hint/acc_{name}_mean", sum(accs) / len(accs) if accs else 0.0)
        drawn = sum(len(a) for a in by_level.values())
        handle.log("hint/level_mean", sum(lv * len(a) for lv, a in by_level.items()) / max(drawn, 1))
        lo, hi = (self.alpha, self.alpha) if self.rule == "paper" else (self.min_threshold, self.max_threshold)
        handle.log("hint/accuracy_min_threshold", lo)
        handle.log("hint/accuracy_max_threshold", hi)
        super().end_step(groups, handle)

    def state_dict(self) -> dict[str, Any]:
        return {
            "levels": dict(self.levels),
            "accs": dict(self.accs),
            "last_hints": {u: dict(h) for u, h in self.last_hints.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.levels = dict(state.get("levels", {}))
        self.accs = dict(state.get("accs", {}))
        self.last_hints = {u: {int(k): v for k, v in h.items()} for u, h in state.get("last_hints", {}).items()}


class SAGELight(TransformedSampler):
    """SAGE-LIGHT over any sampler: see the module docstring.

    Args:
        inner: the sampler whose draws are hinted (default: fixed ``group_size``).
        group_size: G of the default inner sampler (authors: 8); ignored when ``inner`` is given.
        rule: ``paper`` (eq. 12: raise-only when accuracy < ``alpha``) or ``code`` (the authors'
            code: raise at <= ``min_threshold``, lower above ``max_threshold``).
        alpha, min_threshold, max_threshold: the rules' thresholds (0.35; 0.1 and 0.35).
        max_level, hints, template, overflow, max_context_tokens: as :class:`~components.samplers.sage.SAGESampler`.
    """

    def __init__(
        self,
        inner: Sampler | None = None,
        group_size: int | None = None,
        rule: str = "code",
        alpha: float = 0.35,
        min_threshold: float = 0.1,
        max_threshold: float = 0.35,
        max_level: int = 3,
        hints: HintSource = lazy_instance(SelfHint),
        template: str = DEFAULT_TEMPLATE,
        overflow: str = "truncate",
        max_context_tokens: int | None = None,
    ) -> None:
        transform = SAGELightHints(
            hints, max_level, template, overflow, max_context_tokens, rule, alpha, min_threshold, max_threshold
        )
        super().__init__(_inner(inner, group_size), transform)
