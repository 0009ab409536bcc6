"""SAGE self-hinting (Liao et al. 2026, "Self-Hinting Language Models Enhance Reinforcement
Learning", arXiv 2602.03143; code ``BaohaoLiao/SAGE`` ``recipe/hint/hint_trainer.py``), reference §4.

A group whose G rollouts all fail carries no GRPO signal (the gate is closed: u(p) = 1 - (1-p)^G -
p^G ~ G p for small p). SAGE re-rolls such a prompt with a hint ``h`` written from privileged
information, escalating the hint level until some rollout succeeds, and trains on-policy in the
augmented context ``(x, h)``; at test time there is no hint. What the authors' code does, and
this sampler too (method ``sage``):

1. roll out G per prompt with no hint (this group doubles as the probe);
2. prompts whose group has no reward > 0 are *unresolved* (all-correct groups are not hinted);
3. hints of levels 1..L for the unresolved prompts (one call gives every level: one hint per
   prompt, shared by its G rollouts, as Remark 3.4 advises);
4. for level 1..L: re-roll the still-unresolved prompts that have a hint at that level, G each,
   with ``"{problem}\\nHere is a hint to help you:\\n{hint}"`` and REPLACE the group (its rollouts,
   rewards and context) with the hinted one; a reward > 0 resolves the prompt; after level L the
   hinted group is kept even if still all-zero;
5. GRPO advantages per group; the loss conditions on the hinted context (``Group.context_ids``).

The hint source is swappable (:mod:`components.hints`): ``SelfHint`` (the paper's: the current
policy writes the hints) or ``PrefixHint`` (a deterministic partial-solution source for models that
cannot write hints). Every rollout and every hint token drawn counts in the budget; SAGE's cost is
up to (1 + L) G rollouts per unresolved prompt plus the hint replies (the paper: 2.3x GRPO's time).

Metrics (the authors' names): ``hint/prompts_needing_hint``, ``hint/generate_requested``,
``hint/generate_success``, ``hint/generate_failed``, ``hint/used_level_{l}``,
``hint/acc_no_hint_mean``, ``hint/acc_level_{l}_mean``, ``hint/prompts_with_hint``.

Choices: the template is a setting (the default is the authors' RL user prompt; ``{problem} {hint}``
suits the embedded char model, whose prompts end in ``=``); SAGE-LIGHT (a per-prompt level kept
across epochs) is not implemented.
"""

from __future__ import annotations

from jsonargparse import lazy_instance

from components.errors import ConfigError
from components.hints import HintSource, SelfHint
from components.samplers.base import Sampler, SamplingContext, make_group
from components.types import Group, Prompt

DEFAULT_TEMPLATE = "{problem}\nHere is a hint to help you:\n{hint}"


class SAGESampler(Sampler):
    """Probe with G plain rollouts; escalate hints on prompts with no success (see module docstring).

    Args:
        group_size: G, rollouts per group, plain and hinted alike (authors: 8).
        max_level: L, the strongest hint level (authors: 3).
        hints: where hints come from (``components.hints.SelfHint`` or ``PrefixHint``).
        template: the hinted prompt; must contain ``{problem}`` and ``{hint}``.
    """

    def __init__(
        self,
        group_size: int = 8,
        max_level: int = 3,
        hints: HintSource = lazy_instance(SelfHint),
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        if group_size < 2:
            raise ConfigError("model.sampler.group_size", f"must be >= 2 (a group needs a spread), got {group_size}")
        if max_level < 1:
            raise ConfigError("model.sampler.max_level", f"must be >= 1, got {max_level}")
        if "{problem}" not in template or "{hint}" not in template:
            raise ConfigError("model.sampler.template", f"must contain {{problem}} and {{hint}}, got {template!r}")
        self.group_size, self.max_level, self.hint_source, self.template = group_size, max_level, hints, template

    @staticmethod
    def _resolved(group: Group) -> bool:
        return any(r.reward > 0 for r in group.rollouts)  # authors: any reward > 0 resolves

    def collect(self, prompts: list[Prompt], ctx: SamplingContext) -> list[Group]:
        g = self.group_size
        outs = ctx.sample(prompts, [g] * len(prompts))
        groups = [make_group(p, ctx.context_of(p), rs) for p, rs in zip(prompts, outs)]
        ctx.log("hint/acc_no_hint_mean", sum(x.n_pos for x in groups) / max(sum(x.n_drawn for x in groups), 1))

        unresolved = [i for i, grp in enumerate(groups) if not self._resolved(grp)]
        ctx.log("hint/prompts_needing_hint", len(unresolved))
        hints = self.hint_source.hints([prompts[i] for i in unresolved], self.max_level, ctx) if unresolved else []
        hint_of = dict(zip(unresolved, hints))
        got = sum(h is not None for h in hints)
        ctx.log("hint/generate_requested", len(unresolved))
        ctx.log("hint/generate_success", got)
        ctx.log("hint/generate_failed", len(unresolved) - got)

        hinted: set[int] = set()
        for level in range(1, self.max_level + 1):
            todo = [i for i in unresolved if hint_of.get(i) and level in hint_of[i]]
            if todo:
                contexts = [ctx.encode(self.template.format(problem=prompts[i].text, hint=hint_of[i][level])) for i in todo]
                outs = ctx.sample([prompts[i] for i in todo], [g] * len(todo), contexts)
                for i, c, rs in zip(todo, contexts, outs):
                    groups[i] = make_group(prompts[i], c, rs)
                    groups[i].meta["hint_level"] = level
                    hinted.add(i)
                drawn = sum(groups[i].n_drawn for i in todo)
                ctx.log(f"hint/acc_level_{level}_mean", sum(groups[i].n_pos for i in todo) / max(drawn, 1))
            ctx.log(f"hint/used_level_{level}", len(todo))
            unresolved = [i for i in unresolved if not self._resolved(groups[i])]
        ctx.log("hint/prompts_with_hint", len(hinted))
        return groups
