"""Stop training at a compute budget: generated tokens or drawn rollouts, not only steps.

Methods draw different numbers of samples per step, so comparisons at equal cost need a cap on
what was *drawn*. The cap is checked after every step against the module's cumulative budget
counters (which are checkpointed, so a resumed run continues toward the same cap).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from components.errors import ConfigError


class BudgetCap(L.Callback):
    """Stop when cumulative generated tokens or drawn rollouts reach a cap (None: no cap).

    The step that crosses the cap completes (a step is indivisible), so a run overshoots by at
    most one step's draw; ``budget/cum_*`` metrics record the exact amount.
    """

    def __init__(self, max_tokens: int | None = None, max_rollouts: int | None = None) -> None:
        for name, v in (("max_tokens", max_tokens), ("max_rollouts", max_rollouts)):
            if v is not None and v <= 0:
                raise ConfigError(f"BudgetCap.{name}", f"must be a positive number or null, got {v}")
        self.max_tokens = max_tokens
        self.max_rollouts = max_rollouts

    def reached(self, cumulative: dict[str, float]) -> bool:
        return (self.max_tokens is not None and cumulative.get("tokens", 0) >= self.max_tokens) or (
            self.max_rollouts is not None and cumulative.get("rollouts", 0) >= self.max_rollouts
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.reached(pl_module.cumulative):
            trainer.should_stop = True
