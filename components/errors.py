"""One exception type for configuration mistakes, so the CLI can print them as one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what would be valid."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")
