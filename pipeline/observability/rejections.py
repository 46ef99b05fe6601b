"""The consumed messages a stage could not decode, validate or process: a dead letter each, counted, logged.

No single message may stop a stage (DESIGN §5): the stage hands such a message here with the reason
and moves on; it publishes `take()`'s dead letters with the rest of its batch's output, before it
commits, so a rejected message is dead-lettered at least once and never lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

from pipeline.observability.metrics import MESSAGES_REJECTED
from schemas.codec import Record
from schemas.deadletter import rejected_message
from schemas.errors import SchemaError

#: the reason for a message whose processing raised (rather than one that did not decode or validate)
PROCESSING_FAILED = "processing_failed"


class Consumed(Protocol):
    """Where a consumed message came from: a ConsumerRecord is one."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...


class Rejections:
    """The dead letters of one stage's rejected messages, until its next publish."""

    def __init__(self, stage: str, log: logging.Logger) -> None:
        self._stage = stage
        self._log = log
        self._letters: list[Record] = []
        self._reasons: Counter[str] = Counter()
        self._first_detail = ""
        self.total = 0

    def add(self, record: Consumed, reason: str, exc: Exception, *,
            attribution_key: str = "") -> None:
        """Reject one message: `exc` is a SchemaError (it did not decode or validate) or what processing it raised
        (`PROCESSING_FAILED`: logged with its traceback, as an internal error)."""
        detail = str(exc) if isinstance(exc, SchemaError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, SchemaError):
            self._log.error("%s: %s[%d]@%d could not be processed, dead-lettered", self._stage, record.topic,
                            record.partition, record.offset, exc_info=exc)
        letter = rejected_message(reason=reason, stage=self._stage, detail=detail, topic=record.topic,
                                  partition=record.partition, offset=record.offset, key=record.key,
                                  attribution_key=attribution_key)
        self._letters.append((record.key or b"", letter.encode()))
        self._reasons[reason] += 1
        self._first_detail = self._first_detail or f"{record.topic}[{record.partition}]@{record.offset}: {detail}"
        self.total += 1
        MESSAGES_REJECTED.labels(self._stage, reason).inc()

    def take(self) -> list[Record]:
        """The dead letters collected since the last call (one log line for them: counters, not a line each)."""
        letters, self._letters = self._letters, []
        if letters:
            self._log.warning("%s: %d messages dead-lettered (%s); the first: %s", self._stage, len(letters),
                              ", ".join(f"{reason} {n}" for reason, n in sorted(self._reasons.items())),
                              self._first_detail)
            self._reasons.clear()
            self._first_detail = ""
        return letters
