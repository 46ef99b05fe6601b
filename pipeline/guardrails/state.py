"""ScopeState: what stage 2 knows about one scope, and how partial spend is added to it exactly once. Pure.

Spend is kept twice: in event-time buckets (BUCKET_S wide, only as far back as velocity needs)
and in calendar periods (UTC day and month, for budgets). `offsets` holds, per `genai.usage`
partition, the highest usage offset already added: an entry at or below it is a replay.
State, offsets and decisions already taken travel in one changelog value, so a worker that
takes the scope over continues exactly where the last one stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal

from schemas.breaker import BreakerAction, BreakerState
from schemas.codec import rfc3339
from schemas.guardrail_state import ScopeStateValue
from schemas.policy import Period, Scope
from schemas.spend import SpendEntry

BUCKET_S: Final = 5
DAY_S: Final = 86_400


# cached: every scope's period keys are then one shared string per day, not one per scope
@functools.lru_cache(maxsize=4096)
def day_of(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%d")


@functools.lru_cache(maxsize=4096)
def month_of(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m")


@functools.lru_cache(maxsize=1024)
def minute_of(ts_s: int) -> str:
    """The minute a rate alert is once per: '2026-11-22T12:00:00Z'."""
    return rfc3339(ts_s - ts_s % 60)


def period_bounds(period: str) -> tuple[int, int]:
    """'2026-11' or '2026-11-22' -> [start, end) in unix seconds (UTC)."""
    if len(period) == 7:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return int(start.timestamp()), int(start.replace(year=year, month=month).timestamp())
    start = datetime.strptime(period, "%Y-%m-%d").replace(tzinfo=UTC)
    return int(start.timestamp()), int(start.timestamp()) + DAY_S


@dataclass(slots=True)
class Bucket:
    cost: Decimal = Decimal(0)
    requests: int = 0
    tokens: int = 0


#: the rate breaker's trigger after an operator's reset (it then stays closed for `breaker.cool_down`)
RESET_TRIGGER: Final = "reset"


@dataclass(slots=True)
class RateBreaker:
    """The breaker a rate opens (velocity spike, ceiling, limits): closed -> open -> half_open -> closed."""

    state: BreakerState = "closed"
    since_s: int = 0  # event time of the last transition
    trigger: dict[str, str] = field(default_factory=dict)  # {"kind": "reset"} after an operator's reset
    #: the action it opened with (a key's `limits.action` may differ from `breaker.action`); "": breaker.action
    action: BreakerAction | Literal[""] = ""


@dataclass(slots=True)
class ScopeState:
    scope: Scope
    offsets: dict[int, int] = field(default_factory=dict)
    buckets: dict[int, Bucket] = field(default_factory=dict)
    first_s: int | None = None
    #: period ("2026-11", "2026-11-22") -> spend, and -> the part of it that was unallocated
    periods: dict[str, Decimal] = field(default_factory=dict)
    unallocated: dict[str, Decimal] = field(default_factory=dict)
    alerted: set[str] = field(default_factory=set)
    rate: RateBreaker = field(default_factory=RateBreaker)
    #: hard budgets exhausted, by period kind ("monthly", "daily"): each breaker (`budget|scope|kind`) stays
    #: open until this event time (the period's end)
    budget_open: dict[Period, int] = field(default_factory=dict)
    #: periods ("2026-11", "2026-11-22") in which an operator reset the scope: no budget breaker opens in them
    budget_reset: set[str] = field(default_factory=set)

    def add(self, entries: Sequence[SpendEntry], retain_from_s: int) -> int:
        """Add the entries not added before; returns how many were new. Buckets older than
        `retain_from_s` are no use to velocity any more: such late spend only counts for periods."""
        added = 0
        for entry in entries:
            if entry.offset <= self.offsets.get(entry.partition, -1):
                continue
            added += 1
            if self.first_s is None or entry.bucket_s < self.first_s:
                self.first_s = entry.bucket_s
            if entry.bucket_s >= retain_from_s:
                bucket = self.buckets.get(entry.bucket_s)
                if bucket is None:
                    bucket = self.buckets[entry.bucket_s] = Bucket()
                bucket.cost += entry.cost
                bucket.requests += entry.requests
                bucket.tokens += entry.tokens
            for period in (day_of(entry.period_s), month_of(entry.period_s)):
                self.periods[period] = self.periods.get(period, Decimal(0)) + entry.cost
                if entry.unallocated:
                    self.unallocated[period] = self.unallocated.get(period, Decimal(0)) + entry.unallocated
        # offsets after the loop: one message may hold several buckets of the same usage message
        for entry in entries:
            if entry.offset > self.offsets.get(entry.partition, -1):
                self.offsets[entry.partition] = entry.offset
        return added

    def reset(self, now_s: int) -> None:
        """An operator's `breaker reset` at event time `now_s`: the rate breaker is closed (and stays closed for
        `breaker.cool_down`, see decide.py), every budget breaker is closed and stays closed for the rest of
        its period. Commands are the kill switch's business: this only brings the state in line."""
        self.rate = RateBreaker("closed", now_s, {"kind": RESET_TRIGGER})
        self.budget_open.clear()
        self.budget_reset.update((day_of(now_s), month_of(now_s)))

    def sum_since(self, from_s: int, until_s: int) -> Bucket:
        """Spend, requests and tokens of the buckets starting in [from_s, until_s)."""
        total = Bucket()
        for start, bucket in self.buckets.items():
            if from_s <= start < until_s:
                total.cost += bucket.cost
                total.requests += bucket.requests
                total.tokens += bucket.tokens
        return total

    def prune(self, retain_from_s: int, now_s: int) -> None:
        """Forget buckets before `retain_from_s`, and periods (with their alerts) older than the last one."""
        for start in [s for s in self.buckets if s < retain_from_s]:
            del self.buckets[start]
        keep = {day_of(now_s), day_of(now_s - DAY_S), month_of(now_s), month_of(period_bounds(month_of(now_s))[0] - 1)}
        for periods in (self.periods, self.unallocated):
            for period in [p for p in periods if p not in keep]:
                del periods[period]
        self.budget_reset &= keep
        # alert-only limit alerts are once per minute (their period): kept while it lasts
        keep.add(minute_of(now_s))
        self.alerted = {a for a in self.alerted if a.split("|")[2] in keep}

    def to_value(self) -> ScopeStateValue:
        """The scope's changelog value."""
        return ScopeStateValue(
            scope=self.scope.key, offsets=list(self.offsets.items()),
            buckets=[(s, str(b.cost), b.requests, b.tokens) for s, b in self.buckets.items()],
            first_s=self.first_s, periods={p: str(v) for p, v in self.periods.items()},
            unallocated={p: str(v) for p, v in self.unallocated.items()}, alerted=sorted(self.alerted),
            rate=(self.rate.state, self.rate.since_s, self.rate.trigger), rate_action=self.rate.action,
            budget_open=self.budget_open, budget_reset=sorted(self.budget_reset))

    @classmethod
    def from_value(cls, value: ScopeStateValue) -> ScopeState:
        """Reads what `to_value` writes, and the values of earlier versions: one `budget_open_until_s` for all
        budgets of the scope (read as the monthly one's), no `rate_action`, no `budget_reset`."""
        state, since, trigger = value.rate
        if value.budget_open is not None:
            budget_open: dict[Period, int] = dict(value.budget_open)
        else:
            until = value.budget_open_until_s
            budget_open = {"monthly": until} if until is not None else {}
        return cls(
            scope=Scope.parse(value.scope), offsets=dict(value.offsets),
            buckets={s: Bucket(Decimal(c), r, t) for s, c, r, t in value.buckets},
            first_s=value.first_s, periods={p: Decimal(v) for p, v in value.periods.items()},
            unallocated={p: Decimal(v) for p, v in value.unallocated.items()}, alerted=set(value.alerted),
            rate=RateBreaker(state, since, dict(trigger), value.rate_action),
            budget_open=budget_open, budget_reset=set(value.budget_reset),
        )
