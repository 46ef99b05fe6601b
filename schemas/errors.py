"""The root of spendstream's exception tree and the contract errors.

    SpendstreamError
    ├── ConfigError          a config file is wrong; lists every problem as `key (line N): problem`
    ├── SchemaError          a topic message does not match its schema
    ├── PermanentError       bad input: no retry helps; dead-letter and count it
    └── TransientError       the broker or a peer is down; retry with backoff
"""

from __future__ import annotations


class SpendstreamError(Exception):
    """Root of every error spendstream raises on purpose."""


class ConfigError(SpendstreamError):
    """The configuration is invalid. `problems` holds one `key: problem` line each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class SchemaError(SpendstreamError):
    """A message does not match the schema of its topic."""


class PermanentError(SpendstreamError):
    """Bad input that no retry can fix."""


class TransientError(SpendstreamError):
    """A dependency is unavailable; the same call may succeed later."""
