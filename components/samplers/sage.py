"""SAGE self-hinting (Liao et al. 2026, "Self-Hinting Language Models Enhance Reinforcement
Learning", arXiv 2602.03143; code ``BaohaoLiao/SAGE`` ``recipe/hint/hint_trainer.py``), reference §4,
as a context transform over any sampler.

A group whose rollouts all fail carries no GRPO signal (the gate is closed: u(p) = 1 - (1-p)^G -
p^G ~ G p for small p). SAGE re-draws such a prompt with a hint ``h`` written from privileged
information, escalating the hint level until some rollout succeeds, and trains on-policy in the
augmented context ``(x, h)``; at test time there is no hint. Method ``sage`` of the authors' code,
here :class:`SAGEHints` wrapped around any inner sampler (:class:`SAGESampler`):

1. a prompt's first draw of the step is its probe (G rollouts under fixed G; round 1 of Ada-Seq; a
   DAPO round's group; an allocation's pilot or its n_i), drawn with no hint;
2. a probe with no reward > 0 is *unresolved* (all-correct groups are not hinted);
3. hints of levels 1..L for the unresolved prompts of that draw (one hint-writing call gives every
   level: one hint per prompt, shared by all its rollouts, as the paper's Remark 3.4 advises);
4. for level 1..L: the still-unresolved prompts with a hint at that level are re-drawn, as many
   rollouts as the probe, and the re-draw REPLACES the probe inside the same ``sample`` call; a
   reward > 0 resolves the prompt; after level L the hinted draw is kept even if still all-zero;
5. every later draw of the prompt in the step (Ada-Seq rounds, allocation after a pilot) uses the
   context it ended at, so the inner sampler's pool statistics (p~, counts) restart for the hinted
   context and the group has one context (:mod:`components.samplers.base`); the loss conditions on
   it (``Group.context_ids``); evaluation uses the bare prompt.

The hinted prompt fills the template's ``{problem}`` with the bare question (``Prompt.question``)
and puts the result where the question sits in the task's prompt, so the task's own instructions
(answer format) stay; without ``Prompt.question`` (or when the text does not contain it) the whole
prompt text fills ``{problem}``. A hinted context longer than the model's context minus
``max_new_tokens`` has its hint truncated (``overflow: truncate``, counted in ``hint/truncated``)
or is skipped (``overflow: skip``, or when even an empty hint does not fit; counted in
``hint/skipped_overflow``): the prompt stays at its current level, never a crash.

The hint source is swappable (:mod:`components.samplers.hints`): ``SelfHint`` (the paper's: the current
policy writes the hints) or ``PrefixHint`` (a deterministic partial-solution source). Every rollout
and every hint token drawn counts in the budget; SAGE's cost is up to (1 + L) probes per unresolved
prompt plus the hint replies (the paper: 2.3x GRPO's time). SAGE-LIGHT (one pass per step at a
per-prompt level kept across visits) is :mod:`components.samplers.sage_light`.

Metrics (the authors' names, summed over the step): ``hint/prompts_needing_hint``,
``hint/generate_requested``, ``hint/generate_success``, ``hint/generate_failed``,
``hint/generate_attempts``, ``hint/generate_leaked``, ``hint/used_level_{l}``,
``hint/acc_no_hint_mean``, ``hint/acc_level_{l}_mean``, ``hint/prompts_with_hint``; ours:
``hint/parse_fallback_text``, ``hint/truncated``, ``hint/skipped_overflow``. Each group's level is
in ``group.meta["hint_level"]`` (absent: no hint). Every metric is logged at every step, 0 when
nothing happened (an accuracy mean over no draws is 0: read it with ``hint/used_level_{l}``).
"""

from __future__ import annotations

from collections import Counter

from jsonargparse import lazy_instance

from components.errors import ConfigError
from components.handle import StepHandle
from components.samplers.base import ContextTransform, FixedGroupSampler, Sampler, TransformedSampler
from components.samplers.hints import HintSource, SelfHint
from components.types import Group, Prompt, Rollout

DEFAULT_TEMPLATE = "{problem}\nHere is a hint to help you:\n{hint}"
OVERFLOW = ("truncate", "skip")


class HintTransform(ContextTransform):
    """What every hint schedule shares: the hint source, the hinted prompt, overflow handling and
    per-step bookkeeping. A subclass decides which prompt gets which level, and when.

    Args:
        hints: where hints come from.
        max_level: L, the strongest level (authors: 3).
        template: the hinted question; must contain ``{problem}`` and ``{hint}``.
        overflow: ``truncate`` (cut the hint to fit) or ``skip`` (no hint) when a hinted prompt
            would not fit the context.
        max_context_tokens: prompt + response tokens the model takes (default: the engine's limit).
    """

    def __init__(
        self,
        hints: HintSource,
        max_level: int = 3,
        template: str = DEFAULT_TEMPLATE,
        overflow: str = "truncate",
        max_context_tokens: int | None = None,
    ) -> None:
        if max_level < 1:
            raise ConfigError("model.sampler.max_level", f"must be >= 1, got {max_level}")
        if "{problem}" not in template or "{hint}" not in template:
            raise ConfigError("model.sampler.template", f"must contain {{problem}} and {{hint}}, got {template!r}")
        if overflow not in OVERFLOW:
            raise ConfigError("model.sampler.overflow", f"must be one of {OVERFLOW}, got {overflow!r}")
        self.source, self.max_level, self.template, self.overflow = hints, max_level, template, overflow
        self.max_context_tokens = max_context_tokens
        self.prompt_limit: int | None = None  # context tokens a hinted prompt may use
        self.begin_step(None)

    def setup(self, handle: StepHandle) -> None:
        limit = self.max_context_tokens or handle.context_limit
        self.source.setup(limit)
        self.prompt_limit = None if limit is None else limit - handle.sampling.max_new_tokens

    def logged_every_step(self) -> list[str]:
        """Metric names logged at every step, 0 when nothing happened (Lightning re-logs the last
        value of a key that a step leaves out, which would repeat a stale count)."""
        names = ["requested", "success", "failed", "attempts", "leaked"]
        return [f"hint/generate_{n}" for n in names] + [
            "hint/parse_fallback_text",
            "hint/truncated",
            "hint/skipped_overflow",
        ]

    def begin_step(self, handle: StepHandle | None) -> None:
        self.m: Counter[str] = Counter(dict.fromkeys(self.logged_every_step(), 0))  # metrics summed over the step
        self.ids: dict[str, list[int]] = {}  # uid -> this step's context (absent: the bare prompt)
        self.level: dict[str, int] = {}  # uid -> this step's level (absent: 0)
        self.written: dict[str, dict[int, str] | None] = {}  # uid -> hints written this step

    def context(self, prompt: Prompt, handle: StepHandle) -> list[int]:
        return self.ids.get(prompt.uid) or handle.context_of(prompt)

    # ---- shared steps --------------------------------------------------------------------------
    def hinted_text(self, prompt: Prompt, hint: str) -> str:
        """The prompt text with the hint: ``{problem}`` is the bare question, kept inside the task's prompt."""
        q = prompt.question
        if q and q in prompt.text:
            return prompt.text.replace(q, self.template.format(problem=q, hint=hint), 1)
        return self.template.format(problem=prompt.text, hint=hint)

    def hinted_ids(self, prompt: Prompt, hint: str, handle: StepHandle) -> list[int] | None:
        """Token ids of the hinted prompt, the hint truncated to fit the context (None: it cannot fit)."""
        ids = handle.context_of(self.hinted_text(prompt, hint))
        if self.prompt_limit is None or len(ids) <= self.prompt_limit:
            return ids
        if self.overflow == "truncate":
            room = self.prompt_limit - len(handle.context_of(self.hinted_text(prompt, "")))
            keep = len(hint) * max(room, 0) // max(len(ids) - self.prompt_limit + max(room, 0), 1)
            while keep > 0:  # shrink until it fits: characters per token vary along the hint
                ids = handle.context_of(self.hinted_text(prompt, hint[:keep].rstrip()))
                if len(ids) <= self.prompt_limit:
                    self.m["hint/truncated"] += 1
                    return ids
                keep = keep * 9 // 10
        self.m["hint/skipped_overflow"] += 1
        return None

    def write(self, prompts: list[Prompt], handle: StepHandle) -> None:
        """Ask the source once for the prompts (by uid) that have no hints yet this step."""
        todo = list({p.uid: p for p in prompts if p.uid not in self.written}.values())
        if not todo:
            return
        got = self.source.hints(todo, self.max_level, handle)
        for p, h in zip(todo, got, strict=True):
            self.written[p.uid] = h or None
        ok = sum(h is not None and len(h) > 0 for h in got)
        self.m["hint/generate_requested"] += len(todo)
        self.m["hint/generate_success"] += ok
        self.m["hint/generate_failed"] += len(todo) - ok

    def apply(self, prompt: Prompt, level: int, hints: dict[int, str] | None, handle: StepHandle) -> bool:
        """Set the prompt's context to its level-``level`` hint; False (nothing changed) if there is
        none at that level or it cannot fit."""
        if not hints or level not in hints:
            return False
        ids = self.hinted_ids(prompt, hints[level], handle)
        if ids is None:
            return False
        self.ids[prompt.uid], self.level[prompt.uid] = ids, level
        return True

    def end_step(self, groups: list[Group], handle: StepHandle) -> None:
        for g in groups:
            if self.level.get(g.prompt.uid):
                g.meta["hint_level"] = self.level[g.prompt.uid]
        self.m.update(self.source.stats)
        self.source.stats.clear()
        self.m["hint/prompts_with_hint"] = sum(lv > 0 for lv in self.level.values())
        for key in sorted(self.m):
            if key.endswith("_n"):  # accuracy numerators / denominators -> means
                pos = self.m[key[:-2] + "_pos"]
                handle.log(key[:-2] + "_mean", pos / self.m[key] if self.m[key] else 0.0)
            elif not key.endswith("_pos"):
                handle.log(key, self.m[key])

    def count_accuracy(self, name: str, outs: list[list[Rollout]]) -> None:
        """Add draws to ``hint/acc_<name>_mean`` (accuracy = share of rollouts with reward > 0, as the authors)."""
        self.m[f"hint/acc_{name}_n"] += sum(len(rs) for rs in outs)
        self.m[f"hint/acc_{name}_pos"] += sum(r.reward > 0 for rs in outs for r in rs)


class SAGEHints(HintTransform):
    """SAGE's collapse-triggered schedule (see the module docstring): no hint on a prompt's first
    draw of the step; a probe with no success is re-drawn at levels 1..L until one succeeds."""

    def logged_every_step(self) -> list[str]:
        levels = range(1, self.max_level + 1)
        accs = ["no_hint", *(f"level_{lv}" for lv in levels)]  # a mean over no draws is logged as 0
        return [
            *super().logged_every_step(),
            "hint/prompts_needing_hint",
            *(f"hint/used_level_{lv}" for lv in levels),
            *(f"hint/acc_{a}_{x}" for a in accs for x in ("n", "pos")),
        ]

    def begin_step(self, handle: StepHandle | None) -> None:
        super().begin_step(handle)
        self.probed: set[str] = set()

    def after_draw(
        self, prompts: list[Prompt], n_each: list[int], outs: list[list[Rollout]], handle: StepHandle
    ) -> list[list[Rollout]]:
        probes: dict[str, list[int]] = {}  # uid -> positions of its first draw (a uid may repeat in a batch)
        for i, p in enumerate(prompts):
            if p.uid not in self.probed and n_each[i] > 0:
                probes.setdefault(p.uid, []).append(i)
        self.probed.update(p.uid for p in prompts)
        if not probes:
            return outs
        self.count_accuracy("no_hint", [outs[i] for pos in probes.values() for i in pos])
        solved = {u: any(r.reward > 0 for i in pos for r in outs[i]) for u, pos in probes.items()}  # authors: any reward > 0
        unresolved = [u for u in probes if not solved[u]]
        self.m["hint/prompts_needing_hint"] += len(unresolved)
        self.write([prompts[probes[u][0]] for u in unresolved], handle)
        for level in range(1, self.max_level + 1):
            todo = [u for u in unresolved if self.apply(prompts[probes[u][0]], level, self.written.get(u), handle)]
            if todo:
                pos = [i for u in todo for i in probes[u]]
                new = handle.sample([prompts[i] for i in pos], [n_each[i] for i in pos], [self.ids[prompts[i].uid] for i in pos])
                for i, rs in zip(pos, new, strict=True):
                    outs[i] = rs
                self.count_accuracy(f"level_{level}", new)
                for u in todo:
                    solved[u] = any(r.reward > 0 for i in probes[u] for r in outs[i])
            self.m[f"hint/used_level_{level}"] += len(todo)
            unresolved = [u for u in unresolved if not solved[u]]
        return outs


class SAGESampler(TransformedSampler):
    """SAGE (method ``sage``) over any sampler: see the module docstring.

    Args:
        inner: the sampler whose draws are hinted (default: fixed ``group_size``, as the paper).
        group_size: G of the default inner sampler (authors: 8); ignored when ``inner`` is given.
        max_level: L, the strongest hint level (authors: 3).
        hints: where hints come from (``components.samplers.hints.SelfHint`` or ``PrefixHint``).
        template: the hinted question; must contain ``{problem}`` and ``{hint}`` (authors' RL user
            prompt by default).
        overflow: ``truncate`` | ``skip``: a hinted prompt that would not fit the context.
        max_context_tokens: prompt + response tokens the model takes (default: the engine's limit).
    """

    def __init__(
        self,
        inner: Sampler | None = None,
        group_size: int | None = None,
        max_level: int = 3,
        hints: HintSource = lazy_instance(SelfHint),
        template: str = DEFAULT_TEMPLATE,
        overflow: str = "truncate",
        max_context_tokens: int | None = None,
    ) -> None:
        super().__init__(_inner(inner, group_size), SAGEHints(hints, max_level, template, overflow, max_context_tokens))


def _inner(inner: Sampler | None, group_size: int | None) -> Sampler:
    """The sampler to hint: ``inner``, or a fixed group of ``group_size`` (default 8). With ``inner``
    given, ``group_size`` is ignored (LightningCLI carries a previous sampler's ``group_size`` over
    when a config swaps the class, so it cannot be refused)."""
    if inner is not None:
        return inner
    g = 8 if group_size is None else group_size
    if g < 2:
        raise ConfigError("model.sampler.group_size", f"must be >= 2 (a group needs a spread), got {g}")
    return FixedGroupSampler(g)
