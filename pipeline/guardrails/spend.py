"""Stage 1's partial spend per scope (`genai.spend`), from one pricing batch. Pure.

Each priced call adds its billed cost (the exact sum of its FOCUS rows' BilledCost) to every
scope it belongs to (`Policy.scopes_of`), in the entry of its usage message, event-time bucket
(its end: a 10-minute call's spend is seen by velocity when it ends, not 10 minutes in the past) and
charge bucket (its start, as its FOCUS rows are charged). One message per scope per batch keeps stage
2's work proportional to scopes, not calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import NamedTuple

from pipeline.guardrails.state import BUCKET_S
from schemas.codec import Record
from schemas.policy import Policy, Scope
from schemas.spend import SpendEntry, encode_spend
from schemas.usage import UsageEvent

_NS = 1_000_000_000
#: attribution -> scopes, per policy; cleared when it reaches this size (a flood of new keys would otherwise
#: hold ~1.5 KB per attribution: bench/cardinality.py)
SCOPE_CACHE_LIMIT = 10_000


class PricedCall(NamedTuple):
    event: UsageEvent
    partition: int  # of genai.usage
    offset: int
    billed: Decimal


class ScopeIndex:
    """The scopes of an attribution under one policy, remembered: most calls repeat an attribution."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[tuple[str, str], ...], list[Scope]] = {}

    def scopes_of(self, attribution: Mapping[str, str]) -> list[Scope]:
        key = tuple(attribution.items())
        scopes = self._cache.get(key)
        if scopes is None:
            if len(self._cache) >= SCOPE_CACHE_LIMIT:
                self._cache.clear()
            scopes = self._cache[key] = self.policy.scopes_of(attribution)
        return scopes


class _Partial:
    __slots__ = ("cost", "requests", "tokens", "unallocated")

    def __init__(self) -> None:
        self.cost = self.unallocated = Decimal(0)
        self.requests = self.tokens = 0


def _bucket_of(time_ns: int) -> int:
    seconds = time_ns // _NS
    return seconds - seconds % BUCKET_S


def spend_records(calls: Iterable[PricedCall], index: ScopeIndex, latest_ns: int) -> list[Record]:
    """One `genai.spend` record per scope touched, keyed by the scope key. `latest_ns` (now + the accepted
    clock skew) caps an end time: a client's far-future end must not park its spend beyond every window."""
    per_scope: dict[str, dict[tuple[int, int, int, int], _Partial]] = {}
    for call in calls:
        event = call.event
        start_ns = event.start_time_unix_nano
        ended = _bucket_of(min(max(event.end_time_unix_nano, start_ns), max(latest_ns, start_ns)))
        tokens = event.tokens.input_total + event.tokens.output
        at = (call.partition, call.offset, ended, _bucket_of(start_ns))
        for scope in index.scopes_of(event.attribution):
            entries = per_scope.setdefault(scope.key, {})
            partial = entries.get(at)
            if partial is None:
                partial = entries[at] = _Partial()
            partial.cost += call.billed
            partial.requests += event.requests
            partial.tokens += tokens
            if not event.allocated:
                partial.unallocated += call.billed
    return [(scope.encode(), encode_spend(scope, [SpendEntry(p, o, b, e.cost, e.requests, e.tokens, e.unallocated, c)
                                                  for (p, o, b, c), e in entries.items()]))
            for scope, entries in per_scope.items()]
