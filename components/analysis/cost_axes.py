"""What a run is measured and capped on: the metric names every training run logs (pass@1 and the
cumulative costs), the cost axes a comparison reports, and the :class:`Budget` that caps a run on one
of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PASS_AT_1 = "eval/pass_at_1"
CUM_TOKENS = "budget/cum_tokens"
CUM_ROLLOUTS = "budget/cum_rollouts"
CUM_TOKENS_NZ = "budget/cum_tokens_nonzero_adv"
CUM_TRAIN_S = "time/cum_train_s"  # cumulative training wall seconds, evaluation excluded (logged by the module)
CUM_OPT_STEPS = "budget/cum_optimizer_steps"  # optimizer updates (several per generation batch)
# Tokens forwarded through the policy (sampling plus pilot, hint-writing and scoring passes), under
# the names the module may log them; the first one a run has is reported.
CUM_FORWARDED = ("budget/cum_tokens_forwarded", "budget/cum_forwarded_tokens")
OPEN_FRAC = "gate/open_frac"
TIME_METRICS = ("time/generate_s", "time/score_s", "time/update_s")
# The cost axes every comparison reports. ``steps`` are training steps = generation batches (what the
# papers call steps); ``train_s`` is training wall time without evaluation.
AXES = ("tokens", "steps", "train_s")
AXIS_NAMES = {"tokens": "drawn tokens", "rollouts": "drawn rollouts", "steps": "steps", "train_s": "train s"}


@dataclass(frozen=True)
class Budget:
    """The cap every run of an ablation gets, on one cost axis: ``tokens`` (generated), ``rollouts``
    (drawn), ``steps`` (training steps = generation batches) or ``train_s`` (training wall seconds,
    evaluation excluded)."""

    kind: str
    value: int

    KINDS = ("tokens", "rollouts", "steps", "train_s")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"budget kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}")
        if self.value <= 0:
            raise ValueError(f"budget must be positive, got {self.value}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, _, value = text.partition(":")
        return cls(kind, int(float(value)))

    @property
    def metric(self) -> str:
        return {"tokens": CUM_TOKENS, "rollouts": CUM_ROLLOUTS, "steps": "", "train_s": CUM_TRAIN_S}[self.kind]

    def cap_args(self, max_steps: int) -> tuple[dict[str, Any] | None, int]:
        """The ``BudgetCap`` init args (None: no cap callback) and the trainer's step limit for this
        budget: a step budget is the trainer's own ``max_steps``; the others stop through the cap."""
        if self.kind == "steps":
            return None, self.value
        return {f"max_{self.kind}": self.value}, max_steps


def metric_label(metric: str) -> str:
    """A metric's name for a table or an axis: ``pass@1``, ``pass@1 d2``..."""
    return "pass@1" if metric == PASS_AT_1 else metric.removeprefix("eval/").replace("pass_at_1/", "pass@1 ")
