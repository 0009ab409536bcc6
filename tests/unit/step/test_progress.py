"""The step bar counts training steps of max_steps, also after a resume (components/step/progress.py)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from components.step.progress import StepBar


def _bar(max_steps: int, global_step: int) -> StepBar:
    bar = StepBar()
    bar._trainer = SimpleNamespace(max_steps=max_steps, global_step=global_step, max_epochs=None, current_epoch=0)
    return bar


def test_total_is_max_steps_and_the_count_is_the_global_step(monkeypatch):
    bar = _bar(max_steps=16, global_step=11)  # resumed at step 10; step 11 just ended
    assert bar.total_train_batches == 16  # Lightning's bar: the steps remaining, 6
    seen = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, batch_idx: seen.append(batch_idx))
    bar.on_train_batch_end(bar._trainer, None, None, None, batch_idx=0)  # the epoch loop's index restarts
    assert seen == [10]  # the parent shows batch_idx + 1 = 11 of 16
    assert "Epoch" not in bar._get_train_description(0) and bar._get_train_description(0).strip() == "step"


def test_metrics_drop_v_num_and_use_short_names(monkeypatch):
    bar = _bar(max_steps=4, global_step=1)
    full = {"v_num": "ab12", "reward/mean": 0.5, "gate/open_frac": 0.25, "eval/pass_at_1": 0.75, "loss/policy": 0.1}
    monkeypatch.setattr(ProgressBar, "get_metrics", lambda self, t, m: dict(full))
    assert bar.get_metrics(bar._trainer, None) == {"reward": 0.5, "open": 0.25, "pass@1": 0.75, "loss/policy": 0.1}
