"""`genai.guardrails.state` (internal): stage 2's changelog, one value per scope and one per partition.

A scope's value is its ScopeState (`pipeline/guardrails/state.py` converts): spend buckets, period
totals, the usage offsets already added, the alerts sent, the rate breaker, the budget breakers open
and the periods an operator reset. Decoding checks every field (a period is `YYYY-MM` or
`YYYY-MM-DD`, money is bounded decimal text, an alert id has its `kind|scope|period` parts), so a
corrupt value is refused whole instead of breaking a decision later. Values written before
per-budget breakers (`budget_open_until_s`, no `rate_action`, no `budget_reset`) still read.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from schemas.breaker import BreakerAction, BreakerState
from schemas.codec import Count, DecimalText, Int64, decode_as
from schemas.policy import Period, Scope

#: a calendar period a total is kept for: a UTC month or day
PeriodKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}(-[0-9]{2})?\Z")]
#: `kind|scope|period[|threshold]`: pruning reads the period
AlertId = Annotated[str, msgspec.Meta(pattern=r"^[^|]+\|[^|]*\|[^|]+")]


class ScopeStateValue(msgspec.Struct, frozen=True, omit_defaults=True):
    scope: str
    offsets: list[tuple[Count, Count]]  # [usage partition, highest usage offset added]
    buckets: list[tuple[Int64, DecimalText, Count, Count]]  # [start s, cost, requests, tokens]
    first_s: Int64 | None
    periods: dict[PeriodKey, DecimalText]
    unallocated: dict[PeriodKey, DecimalText]
    alerted: list[AlertId]
    rate: tuple[BreakerState, Int64, dict[str, str]]  # state, since (event time s), trigger
    rate_action: BreakerAction | Literal[""] = ""
    budget_open: dict[Period, Int64] | None = None  # budget period kind -> open until (event time s)
    budget_reset: list[PeriodKey] = msgspec.field(default_factory=list)
    budget_open_until_s: Int64 | None = None  # before per-budget breakers: the monthly budget's

    def __post_init__(self) -> None:
        Scope.parse(self.scope)


class PartitionValue(msgspec.Struct, frozen=True):
    """The value of a partition's own record (key `@partition`): since when stage 2 has watched it."""

    watching_since_s: Int64 | None


_ENCODER: Final = msgspec.json.Encoder()
_SCOPE_DECODER: Final = msgspec.json.Decoder(ScopeStateValue)
_PARTITION_DECODER: Final = msgspec.json.Decoder(PartitionValue)


def encode_state_value(value: ScopeStateValue | PartitionValue) -> bytes:
    return _ENCODER.encode(value)


def decode_scope_state(value: bytes) -> ScopeStateValue:
    """Raises SchemaError naming what is wrong."""
    return decode_as(_SCOPE_DECODER, value, "guardrail state")


def decode_partition_state(value: bytes) -> PartitionValue:
    """Raises SchemaError naming what is wrong."""
    return decode_as(_PARTITION_DECODER, value, "guardrail partition state")
