"""Stop training at a compute budget: generated tokens, drawn rollouts or training wall seconds, not only steps.

Methods draw different numbers of samples per step, so comparisons at equal cost need a cap on
what was *drawn*. The cap is checked after every step against the module's cumulative budget
counters (which are checkpointed, so a resumed run continues toward the same cap).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from components.errors import ConfigError


class BudgetCap(L.Callback):
    """Stop when cumulative generated tokens, drawn rollouts or training wall seconds reach a cap
    (None: no cap).

    The step that crosses the cap completes (a step is indivisible), so a run overshoots by at
    most one step's draw; ``budget/cum_*`` metrics record the exact amount. Training seconds are
    the wall time of the training steps themselves (batch start to batch end: generation, scoring,
    update), evaluation excluded; they are kept in the checkpoint so a resumed run continues
    toward the same cap.
    """

    def __init__(self, max_tokens: int | None = None, max_rollouts: int | None = None, max_train_s: float | None = None) -> None:
        for name, v in (("max_tokens", max_tokens), ("max_rollouts", max_rollouts), ("max_train_s", max_train_s)):
            if v is not None and v <= 0:
                raise ConfigError(f"BudgetCap.{name}", f"must be a positive number or null, got {v}")
        self.max_tokens = max_tokens
        self.max_rollouts = max_rollouts
        self.max_train_s = max_train_s
        self.train_s = 0.0
        self._t0: float | None = None

    def reached(self, cumulative: dict[str, float]) -> bool:
        return (
            (self.max_tokens is not None and cumulative.get("tokens", 0) >= self.max_tokens)
            or (self.max_rollouts is not None and cumulative.get("rollouts", 0) >= self.max_rollouts)
            or (self.max_train_s is not None and self.train_s >= self.max_train_s)
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "train_s" in pl_module.cumulative:  # the module's own count (time/cum_train_s): the table's axis
            self.train_s = float(pl_module.cumulative["train_s"])
        elif self._t0 is not None:
            self.train_s += time.perf_counter() - self._t0
        self._t0 = None
        if self.reached(pl_module.cumulative):
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.train_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_s = float(state_dict.get("train_s", 0.0))
