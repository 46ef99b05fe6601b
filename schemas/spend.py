"""`genai.spend` (internal): stage 1's partial spend per scope, and its event-time ticks.

A spend message carries, for one scope, one entry per (usage partition, usage offset, event-time
bucket) of a pricing batch. Stage 2 remembers per scope the highest usage offset it has added
from each usage partition and skips entries at or below it, so a batch priced twice (crash,
rebalance) is added once, however the second pass cut its batches.

A tick (`tick_ns`, sent to every partition) moves stage 2's event-time clock when a scope has
no traffic: cool-downs and probes end on it.

A reset (`reset`, written by `spendstream breaker reset` and keyed by the scope key, so it lands
on the partition that owns the scope, in order with its spend) tells stage 2 an operator closed
the scope's breakers: it closes its own view of them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Final, NamedTuple

import orjson

from schemas.codec import load_versioned
from schemas.errors import SchemaError
from schemas.policy import Scope

SPEND_SCHEMA_VERSION: Final = 1


class SpendEntry(NamedTuple):
    partition: int  # of genai.usage
    offset: int  # of the genai.usage message the calls came in
    bucket_s: int  # start of the event-time bucket (unix seconds)
    cost: Decimal  # billing currency, exact
    requests: int
    tokens: int
    unallocated: Decimal  # the part of `cost` without a required attribution


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
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION, "scope": scope,
                         "entries": [[e.partition, e.offset, e.bucket_s, str(e.cost), e.requests, e.tokens,
                                      str(e.unallocated)] for e in entries]})


def encode_tick(tick_ns: int) -> bytes:
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION, "tick_ns": tick_ns})


def encode_reset(reset: Reset) -> bytes:
    return orjson.dumps({"schema_version": SPEND_SCHEMA_VERSION,
                         "reset": {"scope": reset.scope, "reason": reset.reason, "at_s": reset.at_s}})


def _decode_reset(data: object) -> Reset:
    if not isinstance(data, dict):
        raise SchemaError("spend: a reset is an object with scope, reason and at_s")
    scope, reason, at_s = data.get("scope"), data.get("reason"), data.get("at_s")
    if not isinstance(scope, str) or not isinstance(reason, str) or isinstance(at_s, bool) \
            or not isinstance(at_s, int):
        raise SchemaError(f"spend: a reset needs scope and reason (text) and at_s (integer), got {data!r}")
    try:
        key = Scope.parse(scope).key  # canonical, as the spend of the scope is keyed
    except ValueError as exc:
        raise SchemaError(f"spend: reset of a bad scope: {exc}") from exc
    return Reset(key, reason, at_s)


def decode_spend(value: bytes) -> SpendMessage | Tick | Reset:
    """Raises SchemaError naming what is wrong."""
    data = load_versioned(value, "spend", SPEND_SCHEMA_VERSION)
    if "reset" in data:
        return _decode_reset(data["reset"])
    try:
        if "tick_ns" in data:
            return Tick(int(data["tick_ns"]))
        entries = [SpendEntry(int(p), int(o), int(b), Decimal(c), int(r), int(t), Decimal(u))
                   for p, o, b, c, r, t, u in data["entries"]]
        return SpendMessage(str(data["scope"]), entries)
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        raise SchemaError(f"spend: not a spend message, tick or reset ({exc!r})") from exc
