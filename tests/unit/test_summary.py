"""The run's last lines (components/preflight.py print_summary) without a fit."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage

from components.preflight import print_summary


def _ended(step: int, max_steps: int, timer: Timer | None) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step, max_steps=max_steps, callbacks=[timer] if timer else [], logger=None, checkpoint_callback=None
    )


def test_the_summary_says_when_trainer_max_time_ended_the_run(capsys, tmp_path):
    model = SimpleNamespace(last_eval={"eval/pass_at_1": 0.5, "eval/pass_at_1/d1": 1.0}, exported_to=str(tmp_path / "p"))
    timer = Timer(duration="00:00:00:20")
    timer._start_time[RunningStage.TRAINING], timer._end_time[RunningStage.TRAINING] = 100.0, 121.0  # 21 s of 20
    print_summary(_ended(19, 500, timer), model)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "curate-rl: finished at step 19 of 500: trainer.max_time reached after 21 s"
    assert out[1] == "  held-out pass@1 0.500 (d1 1.000)" and out[-1] == f"  final policy   {tmp_path / 'p'}"
    print_summary(_ended(500, 500, timer), model)  # all steps done: no reason to give
    assert capsys.readouterr().out.splitlines()[0] == "curate-rl: finished at step 500"
    print_summary(_ended(3, 3, None), model)
    assert capsys.readouterr().out.splitlines()[0] == "curate-rl: finished at step 3"
