"""The guardrail policy in force, reloaded from the config file on SIGHUP or when the file changes.

A reload that fails validation is logged with every problem and the previous policy keeps
running; state (spend, breaker states, alerts already sent) lives in the stages, not here, so
a reload loses none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.observability import metrics
from schemas.config import load_config
from schemas.errors import ConfigError
from schemas.policy import Policy

log = logging.getLogger(__name__)


class PolicyFile:
    def __init__(self, path: Path | None, policy: Policy, overrides: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.policy = policy
        #: the SPENDSTREAM_* settings the process started with (schemas/config_env.py): a reload keeps them
        self._overrides = overrides
        self._stamp = self._file_stamp()
        self._requested = False

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat() if self.path else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size) if stat else None

    def request_reload(self) -> None:
        """SIGHUP: reload at the next check, even if the file looks unchanged."""
        self._requested = True

    def check(self) -> bool:
        """Reload if asked to or if the file changed; True when a new policy is in force."""
        stamp = self._file_stamp()
        if self.path is None or not (self._requested or stamp != self._stamp):
            return False
        self._requested, self._stamp = False, stamp
        try:
            policy = load_config(self.path, self._overrides).policy
        except ConfigError as exc:
            metrics.POLICY_RELOADS.labels("rejected").inc()
            log.error("policy reload from %s rejected, the previous policy stays in force:\n  %s",
                      exc.source, "\n  ".join(exc.problems))
            return False
        metrics.POLICY_RELOADS.labels("applied").inc()
        changed = policy != self.policy
        self.policy = policy
        log.info("policy reloaded from %s (%s)", self.path, "changed" if changed else "unchanged")
        return changed
