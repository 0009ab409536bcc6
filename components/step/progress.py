"""The terminal's progress bar: training steps of ``max_steps``, also after a resume.

Lightning's :class:`RichProgressBar` counts the epoch's batches against the steps *remaining*, so a
resumed run read "155/16"; its description is ``Epoch 0/-2`` when ``max_epochs`` is unset (this
repository counts steps, not epochs), and it shows the logger's ``v_num``. :class:`StepBar` shows
``step k/max_steps`` and the metrics logged with ``prog_bar=True`` under short names (``reward``,
``open``, ``pass@1``), 3 decimals, so that they fit one line at 120 columns.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

# the bar's short names (MLflow keeps the full ones), so the metrics fit one line at 120 columns
SHORT = {"reward/mean": "reward", "gate/open_frac": "open", "eval/pass_at_1": "pass@1", "guard/idle_warning": "idle"}


class StepBar(RichProgressBar):
    """A :class:`RichProgressBar` over training steps (``trainer.global_step``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("theme", RichProgressBarTheme(metrics_format=".3f"))
        super().__init__(**kwargs)

    @property
    def total_train_batches(self) -> int | float:
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)  # a resume starts where it stopped

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {SHORT.get(k, k): v for k, v in items.items()}
