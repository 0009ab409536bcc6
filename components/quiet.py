"""The one place where known third-party messages are silenced, each by its exact text.

Every entry names the message, where it comes from and why it says nothing a user of this
repository can act on. Nothing else is filtered: a new warning still shows. ``curate-rl`` calls
:func:`silence_known_messages` once at start (the test suite keeps its own filters).
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category, source: why it is silenced)
KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "lightning/pytorch/utilities/_pytree.py builds torch's LeafSpec, deprecated in torch 2.10; Lightning's own code",
    ),
    (
        r"`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "transformers 5 reads its own deprecated alias while generating; nothing here calls it",
    ),
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        UserWarning,
        "lightning ModelCheckpoint: a step checkpoint holds the state after the step's updates, which is what "
        "resume needs (RunCheckpoint saves at the step's end by design)",
    ),
    (
        r"The dirpath has changed from .* won't be reloaded",
        UserWarning,
        "lightning ModelCheckpoint.load_state_dict: a resume into a new MLflow run (another store) writes to that "
        "run's own folder by design; the old folder's best/last paths are not used (RunCheckpoint keeps its own)",
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        UserWarning,
        "lightning ModelCheckpoint: a resume writes into its own run's checkpoint folder on purpose",
    ),
]

# (logger name, message prefix, source: why it is dropped)
KNOWN_LOG_LINES: list[tuple[str, str, str]] = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:", "lightning advertises its cloud logger at every start"),
    ("lightning.fabric.utilities.rank_zero", "💡 Tip:", "the same, through lightning.fabric"),
    (
        "lightning.pytorch.utilities.rank_zero",
        "GPU available: ",
        "lightning/pytorch/trainer/setup.py _log_device_info: the accelerator is the config's trainer.accelerator, "
        "checked before the run (a GPU set but missing is a one-line error; one present but unused still warns)",
    ),
    ("lightning.pytorch.utilities.rank_zero", "TPU available: ", "the same function, for TPUs, which this project does not use"),
    (
        "lightning.pytorch.accelerators.cuda",
        "LOCAL_RANK: ",
        "lightning/pytorch/accelerators/cuda.py: the CUDA_VISIBLE_DEVICES of each rank at start",
    ),
    (
        "lightning.pytorch.utilities.rank_zero",
        "`Trainer.fit` stopped: `max_steps=",
        "lightning/pytorch/loops/fit_loop.py: the normal end of a run; our own summary (curate-rl: finished at step N) says it",
    ),
    (
        "lightning.pytorch.utilities.rank_zero",
        "Restoring states from the checkpoint path at ",
        "lightning/pytorch/trainer/connectors/checkpoint_connector.py: a resume; our own line "
        "(curate-rl: resuming ... from <checkpoint>) names the run, the step and the file",
    ),
    ("lightning.pytorch.utilities.rank_zero", "Restored all states from the checkpoint at ", "the same resume, once loaded"),
    (
        "lightning.pytorch.utilities.rank_zero",
        "Time limit reached. Elapsed time is ",
        "lightning/pytorch/callbacks/timer.py (trainer.max_time): our summary's first line says the run stopped on time",
    ),
    (
        "lightning.fabric.utilities.seed",
        "Seed set to ",
        "lightning/fabric/utilities/seed.py seed_everything: the seed is the config's seed_everything, logged with the run",
    ),
]


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def silence_known_messages() -> None:
    """Install the filters above (idempotent: warnings de-duplicates, one log filter per logger)."""
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix, _ in KNOWN_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
