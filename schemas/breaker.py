"""BreakerCommand: the latest state of one circuit breaker, on the compacted `genai.breaker.commands`.

The Kafka key is `breaker_id` = `<source>|<scope>`: a breaker opened by a rate (velocity,
ceiling, limits), by a budget or by hand is its own record, so closing one never overwrites
another. A budget breaker also names its budget's period kind, `budget|<scope>|<period>`
(`budget|team=search|monthly`), so a daily and a monthly budget of one scope are two breakers.
Gateways apply every open breaker whose scope matches a request; the strictest wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Final, Literal

import orjson

from schemas.codec import load_versioned
from schemas.errors import SchemaError

BREAKER_SCHEMA_VERSION: Final = 1
BreakerSource = Literal["rate", "budget", "manual"]
BreakerState = Literal["open", "half_open", "closed"]
#: "none" lets traffic through (e.g. prod traffic under a budget that only blocks non-prod)
BreakerAction = Literal["block", "downgrade", "approved_only", "none"]


def breaker_id(source: str, scope: str) -> str:
    return f"{source}|{scope}"


def budget_breaker_id(scope: str, period: str) -> str:
    """The breaker of one budget: `budget|<scope>|<period>`, period being its kind ("monthly", "daily")."""
    return f"{breaker_id('budget', scope)}|{period}"


def command_id(breaker: str, state: str, at_s: float) -> str:
    """The same decision, made again (a replay, a retried CLI call at the same instant), gets the same id."""
    return hashlib.sha256(f"{breaker}|{state}|{at_s}".encode()).hexdigest()[:20]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCommand:
    command_id: str
    breaker_id: str
    source: BreakerSource
    scope: str
    scope_attributes: Mapping[str, str]
    state: BreakerState
    action: BreakerAction
    #: per environment class ("prod" / "non_prod"), overriding `action`; `prod_envs` says which envs are prod
    env_actions: Mapping[str, BreakerAction] = field(default_factory=dict)
    prod_envs: tuple[str, ...] = ("prod", "production")
    #: for `downgrade`: requested model -> the model to use instead
    downgrade: Mapping[str, str] = field(default_factory=dict)
    #: half-open: the share of requests gateways let through as probes
    probe_ratio: float = 0.0
    reason: str
    trigger: Mapping[str, str] = field(default_factory=dict)  # the figures that tripped it (decimal text)
    issued_at: str  # RFC 3339
    event_time: str | None = None  # RFC 3339: the event time of the decision (automatic breakers)
    expires_at: str | None = None  # RFC 3339; after it gateways ignore the command (fail open)
    schema_version: int = BREAKER_SCHEMA_VERSION

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))


def decode_command(value: bytes) -> BreakerCommand:
    """Raises SchemaError naming what is wrong."""
    data = load_versioned(value, "breaker command", BREAKER_SCHEMA_VERSION)
    try:
        data["prod_envs"] = tuple(data.get("prod_envs", ()))
        return BreakerCommand(**data)
    except TypeError as exc:
        raise SchemaError(f"breaker command: {exc}") from exc
