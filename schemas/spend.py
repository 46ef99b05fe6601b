"""`genai.spend` (internal): stage 1's partial spend per scope, and its event-time ticks.

A spend message carries, for one scope, one entry per (usage partition, usage offset, event-time
bucket, charge bucket) of a pricing batch. The event-time bucket is when the call's cost became known
(its end; velocity counts it there, so a long call cannot fall behind the window that watches it), the
charge bucket when it started (its FOCUS charge period; day and month totals count it there).
Stage 2 remembers per scope the highest usage offset it has added from each usage partition and
skips entries at or below it, so a batch priced twice (crash, rebalance) is added once, however the
second pass cut its batches.

A tick (`tick_ns`, sent to every partition) moves stage 2's event-time clock when a scope has
no traffic: cool-downs and probes end on it.

A reset (`reset`, written by `spendstream breaker reset` and keyed by the scope key, so it lands
on the partition that owns the scope, in order with its spend) tells stage 2 an operator closed
the scope's breakers: it closes its own view of them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Final, Literal, NamedTuple

import msgspec
import orjson

from schemas.codec import Count, DecimalText, Int64, decode_as
from schemas.errors import SchemaError
from schemas.policy import Scope

SPEND_SCHEMA_VERSION: Final = 1
ScopeKey = Annotated[str, msgspec.Meta(min_length=1)]


class SpendEntry(NamedTuple):
    partition: int  # of genai.usage
    offset: int  # of the genai.usage message the calls came in
    bucket_s: int  # start of the event-time bucket (unix seconds): when the calls ended
    cost: Decimal  # billing currency, exact
    requests: int
    tokens: int
    unallocated: Decimal  # the part of `cost` without a required attribution
    charged_s: int | None = None  # start of the bucket the calls started in; None: `bucket_s`

    @property
    def period_s(self) -> int:
        """The time whose day and month the spend is charged to."""
        return self.bucket_s if self.charged_s is None else self.charged_s


class SpendMessage(NamedTuple):
    scope: str
    entries: list[SpendEntry]


class Tick(NamedTuple):
    tick_ns: int


class Reset(NamedTuple):
    """An operator's `breaker reset` of one scope."""

    scope: str  # scope key
    reason: str
    at_s: int  # wall clock of the reset (unix seconds)


def encode_spend(scope: str, entries: Sequence[SpendEntry]) -> bytes:
    # the charge buckets ride beside the entries, not in them: a worker of the previous release (rolling
    # upgrade) reads 7-element entries and ignores the field, charging by `bucket_s`
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION, "scope": scope,
                         "entries": [[e.partition, e.offset, e.bucket_s, str(e.cost), e.requests, e.tokens,
                                      str(e.unallocated)] for e in entries],
                         "charged_s": [e.charged_s for e in entries]})


def encode_tick(tick_ns: int) -> bytes:
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION, "tick_ns": tick_ns})


def encode_reset(reset: Reset) -> bytes:
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION,
                         "reset": {"scope": reset.scope, "reason": reset.reason, "at_s": reset.at_s}})


class _ResetValue(msgspec.Struct, frozen=True):
    scope: ScopeKey
    reason: str
    at_s: Int64

    def __post_init__(self) -> None:
        Scope.parse(self.scope)  # a ValueError names what is wrong with it


class _SpendValue(msgspec.Struct, frozen=True):
    """The three shapes of a `genai.spend` value in one: which fields are set says which it is."""

    schema_version: Literal[1]
    scope: ScopeKey | None = None
    entries: list[tuple[Count, Count, Int64, DecimalText, Count, Count, DecimalText]] | None = None
    charged_s: list[Int64 | None] | None = None  # per entry; absent from a previous release's messages
    tick_ns: Count | None = None
    reset: _ResetValue | None = None

    def __post_init__(self) -> None:
        if self.scope is not None:
            Scope.parse(self.scope)


_DECODER: Final = msgspec.json.Decoder(_SpendValue)


def decode_spend(value: bytes) -> SpendMessage | Tick | Reset:
    """Raises SchemaError naming what is wrong."""
    data = decode_as(_DECODER, value, "spend")
    # scope keys canonical, as the spend of a scope is keyed
    if data.reset is not None:
        return Reset(Scope.parse(data.reset.scope).key, data.reset.reason, data.reset.at_s)
    if data.tick_ns is not None:
        return Tick(data.tick_ns)
    if data.scope is None or data.entries is None:
        raise SchemaError("spend: not a spend message (scope and entries), a tick (tick_ns) or a reset")
    charged: Sequence[int | None] = [None] * len(data.entries) if data.charged_s is None else data.charged_s
    if len(charged) != len(data.entries):
        raise SchemaError(f"spend: {len(charged)} charged_s for {len(data.entries)} entries")
    return SpendMessage(Scope.parse(data.scope).key, [SpendEntry(p, o, b, Decimal(c), r, t, Decimal(u), at)
                                     for (p, o, b, c, r, t, u), at in zip(data.entries, charged, strict=True)])
