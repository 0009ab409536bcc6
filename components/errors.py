"""The exceptions the CLI turns into one line and an exit code.

- :class:`ConfigError`: a bad input (config value, data file, model path, checkpoint); exit 2,
  nothing written.
- :class:`RunAborted`: the run cannot usefully go on (reward faults past their limit, nothing
  trained); the MLflow run is marked FAILED, exit 1.
- :class:`StopRequested`: SIGTERM / SIGINT; a checkpoint was written, the MLflow run is marked
  KILLED, exit 128 + the signal number (143 / 130).
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what would be valid."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class RunAborted(RuntimeError):
    """Training stopped on purpose because it could not learn anything useful; the message says why."""


class StopRequested(BaseException):
    """A stop signal ended the run cleanly. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way (a reward's own error handling) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.checkpoint: Path | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
