"""Alert: one message on `genai.alerts` (public). `alert_id` is idempotent: kind + scope + period + threshold.

A consumer that sees the same `alert_id` twice (at-least-once delivery, a worker restart) has
seen the same alert once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import orjson

from schemas.codec import load_versioned
from schemas.errors import SchemaError

ALERT_SCHEMA_VERSION: Final = 1
AlertKind = Literal["budget_threshold", "budget_projected", "velocity_spike", "velocity_ceiling", "limit_exceeded",
                    "unpriced_model", "unallocated_share"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    alert_id: str
    kind: AlertKind
    severity: Severity
    scope: str  # canonical scope key, e.g. "team=search" or "global"
    scope_attributes: Mapping[str, str]
    #: the budget period ("2026-11", "2026-11-22") or minute the alert belongs to, if any
    period: str | None
    observed: str  # decimal text, exact
    threshold: str
    unit: str  # "EUR", "EUR/min", "requests/min", "tokens/min", "share"
    message: str  # one sentence for people
    event_time: str  # RFC 3339, the event time at which it was detected
    issued_at: str  # RFC 3339, wall clock
    details: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = ALERT_SCHEMA_VERSION

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))


def decode_alert(value: bytes) -> Alert:
    """Raises SchemaError naming what is wrong."""
    data = load_versioned(value, "alert", ALERT_SCHEMA_VERSION)
    try:
        return Alert(**data)
    except TypeError as exc:
        raise SchemaError(f"alert: {exc}") from exc
