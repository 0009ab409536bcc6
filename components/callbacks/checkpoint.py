"""Checkpoints that cannot go stale or half-written.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder,
  flushes it to disk and renames it over the target: a full disk or a kill mid-write leaves the
  previous checkpoint intact (the partial temporary file is removed).
- :class:`RunCheckpoint` (the CLI's ``checkpoint:`` group) writes into one folder per run,
  ``<dirpath>/<run name>-<run id[:8]>/`` named by the MLflow run, so two runs in one working
  directory never mix their files (Lightning's ``-v1`` suffixes behind a stale ``last.ckpt``), and
  keeps only the last ``keep_last_k`` step checkpoints besides ``last.ckpt``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from components.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>``, fsync, then ``os.replace`` onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores have their own semantics
        import torch

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def run_folder_name(logger: Any) -> str | None:
    """``<run name>-<run id[:8]>`` of an MLflow logger (None for other loggers)."""
    run_id = getattr(logger, "run_id", None)
    if not run_id or not hasattr(logger, "experiment"):
        return None
    name = logger.experiment.get_run(run_id).info.run_name or "run"
    return f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', name)}-{run_id[:8]}"


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` with a folder per run and keep-last-k.

    Args:
        keep_last_k: with no ``monitor``, keep the newest ``k`` step checkpoints (``last.ckpt``
            comes on top); None keeps every one.
        per_run_folder: write into ``<dirpath>/<run name>-<run id[:8]>/`` (MLflow logger only).
        **kwargs: every :class:`ModelCheckpoint` argument.
    """

    def __init__(self, *args: Any, keep_last_k: int | None = 3, per_run_folder: bool = True, **kwargs: Any) -> None:
        if keep_last_k is not None and keep_last_k < 1:
            raise ConfigError("checkpoint.keep_last_k", f"must be >= 1 or null (keep all), got {keep_last_k}")
        if keep_last_k is not None and kwargs.get("monitor") is None and kwargs.get("save_top_k", 1) in (-1, 1):
            # "Keep the k newest" is top-k on the step counter, which Lightning always offers.
            kwargs.update(monitor="step", mode="max", save_top_k=keep_last_k)
        super().__init__(*args, **kwargs)
        self.keep_last_k = keep_last_k
        self.per_run_folder = per_run_folder
        self._base_dirpath = self.dirpath

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.per_run_folder and self._base_dirpath is not None and trainer.is_global_zero:
            name = run_folder_name(trainer.logger)
            if name is not None:
                self.dirpath = os.path.join(self._base_dirpath, name)
                trainer.logger.experiment.set_tag(trainer.logger.run_id, "checkpoint_dir", str(Path(self.dirpath).resolve()))
        if trainer.world_size > 1:
            self.dirpath = trainer.strategy.broadcast(self.dirpath)
        super().setup(trainer, pl_module, stage)
