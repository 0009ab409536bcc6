"""Each paper's claim, on the axis the paper measured it, against the control the paper measured it
against, and the rule that turns a comparison into a verdict (README "Claims").

A claim is one of four kinds:

* ``cost``: the method reaches the control's final pass@1 (``target="peak"``: the top of the
  control's mean curve, as PODS states its claim) at ``factor`` × the control's cost or less, on
  ``axis`` (``steps`` = generation batches, ``tokens`` = drawn tokens, ``train_s`` = training wall
  seconds without evaluation). E.g. DAPO's "50% fewer training steps" is ``factor=0.5`` on ``steps``.
* ``gain``: the method's final pass@1 beats the control's by at least ``delta`` at the same budget
  (``at``: the budget axis the paper states it at, ``steps`` for every claim here; an ablation
  stopped on another axis, e.g. equal drawn tokens, does not judge it).
* ``parity``: the method is no worse than the control (e.g. Reinforce-Ada-Est, whose paper reports
  no clear gain).
* ``note``: the paper states a number but no claim to judge here (vanilla RAFT, which the GVM paper
  names only as its speed baseline); the table quotes it and gives the numbers, with no verdict.

A claim's ``control`` is the recipe the paper compares against when that is not the recipe's
matched control (its header's ``# control:``): DRO's filter is judged against ``dro_nofilter``, R3
against ``dro_aggr``, GVM-RAFT++'s speed-up against vanilla ``raft`` (the abstract's claim) as well
as ``raftpp`` (the paper's tables). ``scripts/ablate.py`` computes those comparisons too
(``comparisons.csv`` beside the report's table) when both ran in one sweep.

A claim's ``premise`` names what must happen for its mechanism to act at all, read from metrics the
method logs (:class:`Premise`): SAGE needs a hinted group to get a success (``hint/acc_level_*``);
where a run never meets it the row reads **not testable**, not "not reproduced".

The verdict rule (ours, stated so a reader can re-apply it), with small-sample statistics
(:mod:`components.analysis.stats`): every interval is over seeds, at 95% unless said otherwise.

* **not testable** first, for any kind: the premise failed in every run of the method.
* ``gain``: the difference in final pass@1 (method - control) gets Welch's t interval with its
  degrees of freedom. **reproduced** when the interval excludes 0 and the estimate reaches the
  paper's ``delta``; **direction only** when the estimate is positive but the interval includes 0
  or the estimate falls short of ``delta``; **not reproduced** when the estimate is <= 0.
* ``parity``: an equivalence test (two one-sided tests) at the stated margin
  (:data:`PARITY_MARGIN`, 3 points): **reproduced** when the 90% interval lies inside
  ``±margin``; **not reproduced** when the 95% interval lies entirely below ``-margin``;
  **inconclusive** otherwise (a noisy method can no longer pass by being noisy).
* ``cost``: the ratio of the method's cost to the control's, to reach the control's final (or
  peak) mean pass@1 on ``axis``, gets a bootstrap interval over seeds (each resample recomputes the
  target and both mean curves; a resampled method that never gets there costs infinity).
  **reproduced** when the interval lies below 1 and the estimate reaches the claimed ``factor``;
  **direction only** when the estimate is below 1 but not both; **not reproduced** otherwise
  (including never reaching it); **not testable** when the control's own gain (its final over its
  step-0 pass@1, Welch) is not resolved: the target then sits within noise of where every run
  starts, and "the cost to reach it" measures the noise. A report without the interval (written
  before it was added) can give at most **direction only**.

Every judged row also gets a power estimate (:func:`power_note`: the effect its seeds resolve at
the measured noise, and the seeds per arm the paper's effect needs) and, unless reproduced, one line
saying what would change its verdict (:func:`what_would_change`).

Methods of ours (no paper claim: the f-objective weight, the composed recipe) get ``None`` and the
table reports their numbers without a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.analysis.stats import (
    Interval,
    detectable_difference,
    equivalence,
    ratio_power,
    seeds_for_equivalence,
    seeds_to_detect,
    welch,
)

PARITY_MARGIN = 0.03  # parity claims: equivalent within ±3 points of final pass@1 (TOST at alpha 0.05)
AXES = ("tokens", "steps", "train_s")
TARGETS = ("final", "peak")


@dataclass(frozen=True)
class Premise:
    """What must happen for a claim's mechanism to act, read from logged metrics: it holds when any
    of ``metrics`` is > 0 at some step of some run (``below_one``: < 1 at some step, read as a mean
    over steps below 1 for a share that never exceeds 1). Each entry is ``(metric, weight)``: with a
    weight metric (the prompts drawn at that level) only steps where it is > 0 count."""

    text: str
    metrics: tuple[tuple[str, str | None], ...]
    below_one: bool = False

    def holds(self, summary: dict[str, tuple[float, float]]) -> bool | None:
        """True / False from the (max, mean) summaries of a row's runs; None when none was logged."""
        i = 1 if self.below_one else 0
        vals = [summary[m][i] for m, _ in self.metrics if m in summary and not math.isnan(summary[m][i])]
        if not vals:
            return None
        return any(v < 1 for v in vals) if self.below_one else any(v > 0 for v in vals)


HINTED_SUCCESS = Premise(
    "hinted groups get a success (hint/acc_level_1..3_mean > 0)",
    tuple((f"hint/acc_level_{lv}_mean", f"hint/used_level_{lv}") for lv in (1, 2, 3)),
)
FILTER_DROPS = Premise(
    "the query filter drops queries (dro/filter_stage1_dropped or _stage2_dropped > 0)",
    (("dro/filter_stage1_dropped", None), ("dro/filter_stage2_dropped", None)),
)
# DynaMO's priorities steer the allocation only for prompts past exploration (>= 4 samples in the
# history its priorities read; with refresh: epoch, the last epoch's snapshot).
ALLOCATION_VARIES = Premise("priorities steer the allocation: some prompts are past exploration "
                            "(dynamo/exploring_frac < 1)", (("dynamo/exploring_frac", None),), below_one=True)  # fmt: skip
GVM_ALLOCATION_VARIES = Premise("prompts get different rollout counts (gvm/n_std > 0)", (("gvm/n_std", None),))
POOLS_MIXED = Premise("some n-pools hold both rewards, so the subset is a choice (pods/pool_reward_std > 0)",
                      (("pods/pool_reward_std", None),))  # fmt: skip
GROUPS_DROPPED = Premise("some groups are all-equal, so dynamic sampling drops them (dapo/dropped_groups > 0)",
                         (("dapo/dropped_groups", None),))  # fmt: skip


@dataclass(frozen=True)
class Claim:
    method: str  # the paper's method name
    text: str  # the claim as the paper states it
    kind: str  # cost | gain | parity | note
    axis: str = "steps"  # for cost claims: tokens | steps | train_s
    factor: float = 1.0  # cost claims: claimed cost ratio (0.5 = "2x faster")
    delta: float = 0.0  # gain claims: claimed gain in final pass@1
    at: str = "steps"  # gain / parity / note: the budget the claim's finals are compared at
    control: str | None = None  # the recipe the paper compares against (None: the recipe's matched control)
    target: str = "final"  # cost claims: the control's final or its peak
    premise: Premise | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cost", "gain", "parity", "note"):
            raise ValueError(f"Claim.kind: {self.kind!r}; valid: cost, gain, parity, note")
        for name, v in (("axis", self.axis), ("at", self.at)):
            if v not in AXES:
                raise ValueError(f"Claim.{name}: {v!r}; valid: {', '.join(AXES)}")
        if self.target not in TARGETS:
            raise ValueError(f"Claim.target: {self.target!r}; valid: {', '.join(TARGETS)}")

    def judged_at(self, budget_kind: str | None) -> bool:
        """Whether an ablation stopped on ``budget_kind`` (None: unknown) can judge this claim: a cost
        claim reads the cost to the control's final on its own axis under any budget; a claim about
        finals needs the finals taken at the budget it is stated at."""
        return self.kind == "cost" or budget_kind is None or budget_kind == self.at

    def control_of(self, matched: str | None) -> str | None:
        """The recipe this claim is judged against: its own ``control``, else the matched one."""
        return self.control or matched


_SAGE = "SAGE's premise: hinted groups get a success"
# recipe stem -> the claims of its paper (each checked against ../shared/reference/algorithms.md).
CLAIMS: dict[str, tuple[Claim, ...] | None] = {
    "dapo": (
        Claim("DAPO", "50% fewer training steps to the baseline's accuracy", "cost", "steps", 0.5, premise=GROUPS_DROPPED),
    ),  # fmt: skip
    "ada_seq": (
        Claim(
            "Reinforce-Ada-Seq (v1)",
            "higher final accuracy than GRPO at the same steps (+1.1 to +3.6 points, v1 Table 1)",
            "gain",
            delta=0.011,
        ),
        Claim("Reinforce-Ada-Seq (v3)", "up to 2x faster at the same total inference budget", "cost", "tokens", 0.5),
    ),
    "ada_seq_pos": (
        Claim(
            "Reinforce-Ada-Seq, positive exit",
            "+0.8 to +2.7 points over GRPO at the same steps (Table 2, Ada-pos)",
            "gain",
            delta=0.008,
        ),
    ),
    "ada_est": (Claim("Reinforce-Ada-Est", "estimate-then-allocate: no clear gain over GRPO (v1 footnote)", "parity"),),
    "dr_grpo": (Claim("Dr. GRPO", "removing the length and std terms keeps accuracy (shorter wrong answers)", "parity"),),
    "dynamo": (
        Claim("DynaMO", "+3.7 / +4.4 P@1 over GRPO at 1.5B / 7B, same steps", "gain", delta=0.037, premise=ALLOCATION_VARIES),
    ),  # fmt: skip
    "dynamo_authors": (
        Claim(
            "DynaMO, the authors' form",
            "+3.7 / +4.4 P@1 over GRPO at 1.5B / 7B, same steps (micro-batch H_max/H_min, priorities refreshed once per epoch)",
            "gain",
            delta=0.037,
            premise=ALLOCATION_VARIES,
        ),
    ),  # fmt: skip
    "dynamo_alloc": (
        Claim("DynaMO (allocation only)", "part of DynaMO's +3.7 P@1 (ablation)", "gain", delta=0.0, premise=ALLOCATION_VARIES),
    ),  # fmt: skip
    # GVM-GRPO against GRPO, the paper's Table 1 (40.42 vs 38.11 at 1.5B, 49.86 vs 49.07 at 7B).
    "gvm": (
        Claim(
            "GVM-GRPO (our online form)",
            "+2.3 / +0.8 avg over GRPO at 1.5B / 7B (Table 1)",
            "gain",
            delta=0.008,
            control="grpo",
            premise=GVM_ALLOCATION_VARIES,
        ),
    ),  # fmt: skip
    # The 2-4x claim (abstract) is against vanilla RAFT: the paper's control for it. The paper's tables
    # compare GVM-RAFT++ with RAFT++ (our matched control); both are judged.
    "gvm_raft": (
        Claim(
            "GVM-RAFT++",
            "2-4x faster convergence than vanilla RAFT (abstract; RAFT is the paper's control for this claim)",
            "cost",
            "steps",
            0.5,
            control="raft",
            premise=GVM_ALLOCATION_VARIES,
        ),
        Claim(
            "GVM-RAFT++",
            "the same 2-4x, against RAFT++ (the paper's Table 1 baseline, not the claim's)",
            "cost",
            "steps",
            0.5,
            control="raftpp",
            premise=GVM_ALLOCATION_VARIES,
        ),
    ),  # fmt: skip
    "pods": (
        Claim(
            "PODS",
            "reaches GRPO's peak test accuracy >= 1.7x faster (wall-clock)",
            "cost",
            "train_s",
            1 / 1.7,
            target="peak",
            premise=POOLS_MIXED,
        ),
    ),  # fmt: skip
    "sage": (
        Claim("SAGE", "+1.2 to +2.0 points over GRPO (in-distribution average)", "gain", delta=0.012, premise=HINTED_SUCCESS),
    ),  # fmt: skip
    "sage_light": (
        Claim("SAGE-LIGHT", "+0.2 to +1.1 points over GRPO at 1.2x its time", "gain", delta=0.002, premise=HINTED_SUCCESS),
    ),  # fmt: skip
    # The GVM paper reports no accuracy for vanilla RAFT (its 36.4 vs 38.1 at 1.5B is RAFT++'s).
    "raft": (Claim("RAFT (vanilla)", "the baseline of GVM's 2-4x convergence claim; no accuracy reported for it", "note"),),
    "raftpp": (
        Claim(
            "RAFT++",
            "on par with GRPO at 7B (49.06 vs 49.07 avg) and 1.7 points below at 1.5B (36.42 vs 38.11), GVM paper Table 1",
            "parity",
        ),
    ),  # fmt: skip
    # DRO v1 (FinQA, ParaRev): the 2-3x speed-up is on unverifiable tasks, where no correctness
    # reward exists, so it is not judged; these three are.
    "dro": (
        Claim("DRO-R3", "on par with the correctness reward (FinQA pass@1 67.1 vs 68.0)", "parity"),
        Claim(
            "DRO-R3's query filter",
            "cut training time by ~45% at a similar final reward (ParaRev), against DRO without the filter",
            "cost",
            "train_s",
            0.55,
            control="dro_nofilter",
            premise=FILTER_DROPS,
        ),
        Claim(
            "DRO-R3",
            "4.1 points above DRO-Aggr, the unweighted reward (FinQA 67.1 vs 63.0)",
            "gain",
            delta=0.041,
            control="dro_aggr",
        ),
    ),  # fmt: skip
    "dro_nofilter": (
        Claim(
            "DRO-R3, no filter",
            "the filter's ablation: a similar final reward at ~1.8x the training time (judged in dro's filter row)",
            "note",
        ),
    ),  # fmt: skip
    "dro_aggr": (
        Claim("DRO-Aggr", "4.1 points below DRO-R3, 5.0 below the correctness reward (judged in dro's row)", "note"),
    ),  # fmt: skip
    "f_log": None,
    "curate": None,
}


# Matched controls (GRPO variants): no claim of their own; the claims table leaves them out.
CONTROLS = frozenset({"grpo", "grpo_dapo", "grpo_n4", "grpo_g4", "grpo_verifier_reasoning"})


def comparisons_needed(matched: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Recipe -> the ``(control, target)`` cost comparisons its claims need besides its matched
    control's final (``matched``: recipe -> matched control), for the ablation report to compute
    (claims about finals read both rows of the table and need none)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for recipe, claims in CLAIMS.items():
        for c in (c for c in claims or () if c.kind == "cost"):
            pair = (c.control_of(matched.get(recipe)), c.target)
            if pair[0] is not None and pair != (matched.get(recipe), "final") and pair not in out.get(recipe, []):
                out.setdefault(recipe, []).append(pair)
    return out


def premise_metrics() -> list[tuple[str, str | None]]:
    """Every ``(metric, weight)`` a claim's premise reads, for the ablation report to load."""
    return list(dict.fromkeys(m for cs in CLAIMS.values() for c in cs or () if c.premise for m in c.premise.metrics))


@dataclass(frozen=True)
class Evidence:
    """What one comparison of a method with its control gives a verdict to read."""

    final: Interval  # method final - control final, 95% (Welch)
    final_90: Interval  # the same at 90% (the equivalence test)
    ratio: dict[str, Interval]  # axis -> cost-ratio estimate with its 95% bootstrap interval
    control_gain: Interval | None = None  # control final - control start, 95% (None: unknown)
    premise: bool | None = None  # the claim's premise held (None: no premise, or not measured)
    sd: tuple[float, float] = (math.nan, math.nan)  # sample std of each arm's finals (method, control)
    n: tuple[int, int] = (0, 0)  # seeds per arm (method, control)

    @classmethod
    def of(
        cls,
        *,
        method: tuple[float, float, int],
        control: tuple[float, float, int],
        ratio: dict[str, Interval] | None = None,
        control_start: tuple[float, float] | None = None,
        premise: bool | None = None,
    ) -> Evidence:
        """From (mean, sample std, n) of each arm's final pass@1, the cost ratios, the control's
        step-0 (mean, std) over the same seeds, and whether the premise held."""
        (mm, ms, mn), (cm, cs, cn) = method, control
        gain = None if control_start is None else welch(cm, cs, cn, control_start[0], control_start[1], cn)
        return cls(welch(mm, ms, mn, cm, cs, cn), welch(mm, ms, mn, cm, cs, cn, level=0.90), dict(ratio or {}), gain,
                   premise, (ms, cs), (mn, cn))  # fmt: skip


def _control_learned(ev: Evidence) -> bool:
    gain = ev.control_gain
    return gain is None or math.isnan(gain.estimate) or gain.low > 0


def verdict(claim: Claim, ev: Evidence, margin: float = PARITY_MARGIN) -> str:
    """``reproduced`` | ``direction only`` | ``not reproduced`` | ``inconclusive`` | ``not testable``
    by the module's rule (``""`` for a note)."""
    if claim.kind == "note":
        return ""
    if claim.premise is not None and ev.premise is False:
        return "not testable"
    if claim.kind == "cost":
        if not _control_learned(ev):
            return "not testable"
        r = ev.ratio.get(claim.axis)
        if r is None or math.isnan(r.estimate) or r.estimate >= 1.0:
            return "not reproduced"
        return "reproduced" if r.high < 1.0 and r.estimate <= claim.factor else "direction only"
    d = ev.final
    if claim.kind == "gain":
        if math.isnan(d.estimate) or d.estimate <= 0:
            return "not reproduced"
        return "reproduced" if d.low > 0 and d.estimate >= claim.delta else "direction only"
    if equivalence(ev.final_90, margin):
        return "reproduced"
    return "not reproduced" if d.high < -margin else "inconclusive"


def _n_text(n: int | None) -> str:
    return f"{n}" if n is not None else "> 500"


def power_note(claim: Claim, ev: Evidence, margin: float = PARITY_MARGIN) -> str:
    """The effect this row's seeds resolve at its measured noise (80% power, alpha 0.05), and the
    seeds per arm the paper's effect (or the equivalence margin) needs; '' for a note."""
    (sm, sc), (nm, nc) = ev.sd, ev.n
    if claim.kind == "note":
        return ""
    if claim.kind == "cost":
        r = ev.ratio.get(claim.axis)
        if r is None:
            return "no ratio"
        resolvable, need = ratio_power(r, min(nm, nc), claim.factor)
        if math.isnan(resolvable):
            return "ratio interval open: no estimate"
        return f"resolves ≤{resolvable:.2f}× at {nm}/{nc}; {claim.factor:.2f}× needs {_n_text(need)} seeds/arm"
    mde = detectable_difference(sm, nm, sc, nc)
    if math.isnan(mde):
        return "no spread over seeds: no estimate"
    if claim.kind == "gain":
        need = seeds_to_detect(claim.delta, sm, sc) if claim.delta > 0 else seeds_to_detect(ev.final.estimate, sm, sc)
        what = f"+{claim.delta:.3f}" if claim.delta > 0 else f"the observed {ev.final.estimate:+.3f}"
        return f"resolves ±{mde:.3f} at {nm}/{nc}; {what} needs {_n_text(need)} seeds/arm"
    need = seeds_for_equivalence(margin, sm, sc)
    return f"resolves ±{mde:.3f} at {nm}/{nc}; equivalence at ±{margin:.2f} needs {_n_text(need)} seeds/arm"


def what_would_change(claim: Claim, ev: Evidence, v: str, margin: float = PARITY_MARGIN) -> str:
    """One line: what result would turn a verdict other than *reproduced* into one ('' otherwise)."""
    if v in ("", "reproduced"):
        return ""
    sm, sc = ev.sd
    d = ev.final
    if v == "not testable":
        if claim.premise is not None and ev.premise is False:
            return f"a regime where the premise holds: {claim.premise.text}"
        return "a control that learns within the budget (its final resolved above its start): a longer run or a learnable slice"
    if claim.kind == "cost":
        r = ev.ratio.get(claim.axis)
        tgt = "peak" if claim.target == "peak" else "final"
        now = "never reached" if r is None or math.isinf(r.estimate) else f"now {r.estimate:.2f}× [{r.low:.2f}, {r.high:.2f}]"
        return f"reaching the control's {tgt} at ≤ {claim.factor:.2f}× its {claim.axis} with the interval below 1 ({now})"
    if claim.kind == "gain":
        if d.estimate <= 0:
            need = seeds_to_detect(claim.delta, sm, sc) if claim.delta > 0 else None
            return f"a positive gain (now {d.estimate:+.3f}); at this noise {_n_text(need)} seeds/arm resolve +{claim.delta:.3f}"
        if d.low <= 0:
            return (
                f"the interval clearing 0: ~{_n_text(seeds_to_detect(d.estimate, sm, sc))} seeds/arm if +{d.estimate:.3f} is real"
            )
        return f"an estimate reaching the paper's +{claim.delta:.3f} (now {d.estimate:+.3f}, resolved)"
    if v == "not reproduced":
        return f"a final within ±{margin:.2f} of the control's (now {d.estimate:+.3f}, resolved below -{margin:.2f})"
    need = seeds_for_equivalence(margin, sm, sc, d.estimate if abs(d.estimate) < margin else 0.0)
    return f"the 90% interval inside ±{margin:.2f} (now [{ev.final_90.low:+.3f}, {ev.final_90.high:+.3f}]): ~{_n_text(need)} seeds/arm"
