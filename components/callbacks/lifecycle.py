"""Run lifecycle: clean stops on SIGTERM / SIGINT, fault limits, and the checkpoint's identity.

:class:`RunGuard` is added to every ``curate-rl fit`` run (config group ``guard:``). It

- **stops cleanly** on SIGTERM or SIGINT: the current step may finish within half of
  ``grace_period_s``; a longer step is abandoned (rollout generation and scoring are interrupted),
  and the prompt stream, sampler, callbacks, module state and every RNG are rolled back to the
  step's start, so that resuming redoes it exactly. Once a step's first optimizer update has begun
  it always finishes (updates are short, and weights cannot be rolled back cheaply). Then a
  checkpoint is written to the run's checkpoint folder and :class:`StopRequested` propagates: the
  CLI marks the MLflow run KILLED and exits with 128 + the signal number (143 / 130).
- **isolates evaluation from training randomness**: held-out evaluation samples from torch's
  global RNG; the guard saves it before and restores it after, so a resumed run (which does not
  repeat an evaluation) draws the same rollouts as an uninterrupted one.
- **limits reward faults**: the module scores a rollout whose reward raised or was NaN as failed
  and counts it (``reward/errors``, ``reward/nan``); once the cumulative share of such rollouts
  passes ``max_reward_error_share`` / ``max_reward_nan_share`` the run stops with a
  :class:`~components.errors.RunAborted` naming the last error.
- **skips degenerate steps**: when every group's rewards are equal (and no sampler supplied a
  baseline), no rollout has an advantage; the step leaves the policy untouched
  (``train/degenerate_step`` = 1) instead of moving it by the KL or entropy term alone.
- **warns when nothing trains**: after ``max_idle_steps`` consecutive steps with no rollout of
  non-zero advantage, a warning goes to the log, the progress bar (``guard/idle_warning``) and the
  MLflow run (tag ``warning``); with ``idle_error`` the run stops instead.
- **stamps checkpoints** with the run's identity (model, sampler, reward, advantage, loss) and
  refuses to resume one written by a different set-up unless ``force_resume`` is set.
"""

from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from components.callbacks.base import SignalCallback
from components.errors import ConfigError, RunAborted, StopRequested
from components.rng import rng_state, set_rng_state
from components.types import Group

if TYPE_CHECKING:
    from components.handle import StepHandle


class StepAbandoned(StopRequested):
    """Raised inside a step that could not finish within the grace period."""


def run_identity(module: Any) -> dict[str, str]:
    """What a checkpoint must agree on to be resumed: the model and the recipe's components."""
    loss = getattr(module, "loss_cfg", None)
    adv = getattr(module, "adv_cfg", None)
    return {
        "model.model": str(getattr(module, "model_name", "")),
        "model.sampler": type(getattr(module, "sampler", None)).__qualname__,
        "model.reward": type(getattr(module, "reward", None)).__qualname__,
        "model.advantage.name": str(getattr(adv, "name", "")),
        "model.loss.name": str(getattr(loss, "name", "")),
        "model.loss.agg": str(getattr(loss, "agg", "")),
    }


def identity_difference(saved: dict[str, str] | None, current: dict[str, str]) -> str | None:
    """A one-line description of the first difference, or None when they agree (or nothing was saved)."""
    if not saved:
        return None
    for key, now in current.items():
        then = saved.get(key)
        if then is not None and then != now:
            return f"the checkpoint was written with {key}={then}, this run has {key}={now}"
    return None


class RunGuard(SignalCallback):
    """Clean stops, fault limits and checkpoint identity (see the module docstring).

    Args:
        grace_period_s: seconds between the stop signal and the exit (clusters allow about 30 s
            between SIGTERM and SIGKILL). Half is given to the current step, the rest to the
            checkpoint.
        max_reward_error_share: stop once more than this share of all scored rollouts had a
            reward function that raised.
        max_reward_nan_share: the same for NaN / infinite rewards.
        skip_degenerate_steps: leave the policy untouched on a step whose every group is degenerate.
        max_idle_steps: consecutive steps without a rollout of non-zero advantage before a
            warning (0 disables).
        idle_error: stop the run (instead of warning) after ``max_idle_steps`` idle steps.
        force_resume: resume a checkpoint written by a different model or recipe.
    """

    def __init__(
        self,
        grace_period_s: float = 30.0,
        max_reward_error_share: float = 0.05,
        max_reward_nan_share: float = 0.05,
        skip_degenerate_steps: bool = True,
        max_idle_steps: int = 50,
        idle_error: bool = False,
        force_resume: bool = False,
    ) -> None:
        if not grace_period_s > 0:
            raise ConfigError("guard.grace_period_s", f"must be > 0 seconds, got {grace_period_s}")
        for name, v in (("max_reward_error_share", max_reward_error_share), ("max_reward_nan_share", max_reward_nan_share)):
            if not 0 <= v <= 1:
                raise ConfigError(f"guard.{name}", f"must be a share in [0, 1], got {v}")
        if max_idle_steps < 0:
            raise ConfigError("guard.max_idle_steps", f"must be >= 0 (0 disables), got {max_idle_steps}")
        self.grace_period_s = grace_period_s
        self.max_reward_error_share = max_reward_error_share
        self.max_reward_nan_share = max_reward_nan_share
        self.skip_degenerate_steps = skip_degenerate_steps
        self.max_idle_steps = max_idle_steps
        self.idle_error = idle_error
        self.force_resume = force_resume
        self.idle_steps = 0
        self.nonzero_seen = 0.0
        self.stop_signal: int | None = None
        self.checkpoint_path: Path | None = None  # where the stop checkpoint was written
        self._phase = "idle"  # idle | setup | step | update | between | validation
        self._snapshot: dict[str, Any] | None = None
        self._val_rng: dict[str, Any] | None = None
        self._saved_on_stop = False
        self._old_handlers: dict[int, Any] = {}
        self._warned_idle = False
        self._world_size = 1  # data-parallel ranks, read at setup

    # ---- signals --------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._old_handlers:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals to the caller
                return
        self._old_handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)

    def _uninstall(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        repeated = self.stop_signal is not None
        if not repeated:
            self.stop_signal = signum
            name = signal.Signals(signum).name
            print(f"curate-rl: {name} received; stopping within {self.grace_period_s:g} s", file=sys.stderr, flush=True)
        if self._phase in ("setup", "validation") or (repeated and self._phase == "step"):
            raise StepAbandoned(signum)
        if self._phase == "step" and not repeated:
            signal.setitimer(signal.ITIMER_REAL, self.grace_period_s / 2)
        # update / between: the step's end (or the next hook) takes over

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._phase == "step" and self.stop_signal is not None:
            raise StepAbandoned(self.stop_signal)

    # ---- state snapshots for rollback -------------------------------------------------------------
    def _take_snapshot(self, trainer: L.Trainer, pl_module: Any, data_state: dict | None) -> None:
        module_state: dict[str, Any] = {}
        pl_module.on_save_checkpoint(module_state)
        self._snapshot = {
            "module": copy.deepcopy(module_state),
            "data": copy.deepcopy(data_state),
            "callbacks": [(cb, copy.deepcopy(cb.state_dict())) for cb in trainer.callbacks if cb is not self and cb.state_dict()],
        }

    def _roll_back(self, trainer: L.Trainer, pl_module: Any) -> None:
        snap = self._snapshot
        if snap is None:
            return
        pl_module.on_load_checkpoint(snap["module"])
        dm = trainer.datamodule
        if dm is not None and snap["data"] is not None:
            dm.load_state_dict(snap["data"])
        for cb, state in snap["callbacks"]:
            cb.load_state_dict(state)

    # ---- lifecycle hooks ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._world_size = trainer.world_size

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._install()
        self._phase = "setup"
        dm = trainer.datamodule
        self._take_snapshot(trainer, pl_module, dm.state_dict() if dm is not None else None)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        dm = trainer.datamodule
        # The batch was drawn just before this hook; roll back to the stream's state before it.
        data_state = getattr(dm, "batch_start_state", None) if dm is not None else None
        self._take_snapshot(trainer, pl_module, data_state)
        self._phase = "step"
        if self.stop_signal is not None:
            raise StepAbandoned(self.stop_signal)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self._phase == "step":
            self._phase = "update"  # weights are about to change: this step finishes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._phase = "between"
        self._check_faults(trainer, pl_module)
        if self.stop_signal is not None:
            self._save_stop_checkpoint(trainer)
            raise StopRequested(self.stop_signal)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self._phase == "idle":
            return
        self._val_rng = rng_state()
        self._phase = "validation"
        if self.stop_signal is not None:
            raise StepAbandoned(self.stop_signal)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._val_rng is not None:
            set_rng_state(self._val_rng)
            self._val_rng = None
            self._phase = "between"

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if isinstance(exception, StopRequested):
            if self._val_rng is not None:  # stopped during evaluation: training RNG as before it
                set_rng_state(self._val_rng)
                self._val_rng = None
            elif isinstance(exception, StepAbandoned) and self._phase in ("setup", "step"):
                self._roll_back(trainer, pl_module)
            if not self._saved_on_stop:
                self._save_stop_checkpoint(trainer)
            logger = trainer.logger
            exception.run_id = getattr(logger, "run_id", None)
            exception.tracking_uri = getattr(logger, "_tracking_uri", None)
            exception.checkpoint = self.checkpoint_path
        self._uninstall()
        self._phase = "idle"

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._uninstall()
        self._phase = "idle"

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._uninstall()

    def _save_stop_checkpoint(self, trainer: L.Trainer) -> None:
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        self._saved_on_stop = True
        print(f"curate-rl: checkpoint written to {path}", file=sys.stderr, flush=True)

    # ---- faults -------------------------------------------------------------------------------
    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        degenerate = bool(groups) and all(g.baseline is None and not g.is_mixed for g in groups)
        handle.log("train/degenerate_step", float(degenerate))
        # Single device only: under FSDP a rank that skipped its update would leave the others
        # waiting in their forward's all-gather (the skip would have to be agreed by all ranks).
        if degenerate and self.skip_degenerate_steps and self._world_size <= 1:
            return []
        return groups

    def _check_faults(self, trainer: L.Trainer, pl_module: Any) -> None:
        cum = getattr(pl_module, "cumulative", {})
        scored = cum.get("reward_scored", 0.0)
        last = getattr(pl_module, "reward_fault_last", "")
        for key, limit, what in (
            ("reward_errors", self.max_reward_error_share, "raised in the reward function"),
            ("reward_nan", self.max_reward_nan_share, "got a NaN or infinite reward"),
        ):
            n = cum.get(key, 0.0)
            if scored and n / scored > limit:
                raise RunAborted(
                    f"reward: {int(n)} of {int(scored)} rollouts ({n / scored:.0%}) {what}, above "
                    f"guard.{'max_reward_error_share' if key == 'reward_errors' else 'max_reward_nan_share'}="
                    f"{limit:g}; last: {last}"
                )
        if not self.max_idle_steps:
            return
        # The module's cumulative count of rollouts that reached the loss with a non-zero advantage.
        nonzero = float(cum.get("rollouts_nonzero_adv", 0.0))
        self.idle_steps = self.idle_steps + 1 if nonzero == self.nonzero_seen else 0
        self.nonzero_seen = nonzero
        pl_module.log("guard/idle_steps", float(self.idle_steps), on_step=True, batch_size=1)
        if self.idle_steps >= self.max_idle_steps:
            # A key of its own (Lightning needs the same log arguments every time for one key),
            # logged only while the run is idle past the limit: it shows up on the progress bar.
            pl_module.log("guard/idle_warning", float(self.idle_steps), prog_bar=True, on_step=True, batch_size=1)
            msg = (
                f"nothing has trained for {self.idle_steps} steps (no rollout with a non-zero advantage): every group is "
                "all-pass or all-fail; check the data's difficulty, the reward and the sampling temperature"
            )
            if self.idle_error:
                raise RunAborted(msg)
            if not self._warned_idle:
                self._warned_idle = True
                rank_zero_warn(msg)
                logger = trainer.logger
                if logger is not None and hasattr(logger, "run_id"):
                    logger.experiment.set_tag(logger.run_id, "warning", msg)

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"idle_steps": self.idle_steps, "nonzero_seen": self.nonzero_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.idle_steps = int(state.get("idle_steps", 0))
        self.nonzero_seen = float(state.get("nonzero_seen", 0.0))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["curate_rl_identity"] = run_identity(pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        diff = identity_difference(checkpoint.get("curate_rl_identity"), run_identity(pl_module))
        if diff and not self.force_resume:
            raise ConfigError("ckpt_path", f"{diff}; resume it with the same set-up, or set guard.force_resume=true")


# ---- RNG state ----------------------------------------------------------------------------------
