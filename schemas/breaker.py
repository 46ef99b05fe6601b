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
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

from schemas.codec import decode_as
from schemas.policy import Scope

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


#: an RFC 3339 time as `schemas.codec.rfc3339` writes it (checked to be a real time when decoded)
Timestamp = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z\Z")]
ENV_CLASSES: Final = frozenset({"prod", "non_prod"})


class BreakerCommand(msgspec.Struct, frozen=True, kw_only=True):
    """Decoding checks every field against `breaker_command.schema.json`, that the scope parses and that the
    times are real times (a gateway compares them with its clock); unknown fields are ignored."""

    command_id: Annotated[str, msgspec.Meta(min_length=1)]
    breaker_id: Annotated[str, msgspec.Meta(pattern=r"^(rate|budget|manual)\|.+\Z")]
    source: BreakerSource
    scope: Annotated[str, msgspec.Meta(min_length=1)]
    scope_attributes: Mapping[str, str]
    state: BreakerState
    action: BreakerAction
    #: per environment class ("prod" / "non_prod"), overriding `action`; `prod_envs` says which envs are prod
    env_actions: Mapping[str, BreakerAction] = msgspec.field(default_factory=dict)
    prod_envs: tuple[str, ...] = ("prod", "production")
    #: for `downgrade`: requested model -> the model to use instead
    downgrade: Mapping[str, str] = msgspec.field(default_factory=dict)
    #: half-open: the share of requests gateways let through as probes
    probe_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    reason: Annotated[str, msgspec.Meta(min_length=1)]
    trigger: Mapping[str, str] = msgspec.field(default_factory=dict)  # the figures that tripped it (decimal text)
    issued_at: Timestamp  # RFC 3339
    event_time: Timestamp | None = None  # RFC 3339: the event time of the decision (automatic breakers)
    expires_at: Timestamp | None = None  # RFC 3339; after it gateways ignore the command (fail open)
    schema_version: Literal[1]  # required, as the schema says: a value without it is not a command

    def __post_init__(self) -> None:
        Scope.parse(self.scope)
        if not ENV_CLASSES.issuperset(self.env_actions):
            raise ValueError(f"env_actions: only {sorted(ENV_CLASSES)}, got {sorted(self.env_actions)}")
        for moment in (self.issued_at, self.event_time, self.expires_at):
            if moment is not None:
                datetime.fromisoformat(moment)  # a ValueError names the bad time

    def encode(self) -> bytes:
        return _ENCODER.encode(self)


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(BreakerCommand)


def decode_command(value: bytes) -> BreakerCommand:
    """Raises SchemaError naming what is wrong."""
    return decode_as(_DECODER, value, "breaker command")
