"""What stage 2's dashboards show, read off its scope states at one event time. Pure.

The readings are taken every few seconds in the stage's own loop (never from the scrape
thread, which must not walk dicts the loop is changing) and handed to the metrics as one
immutable snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from pipeline.guardrails.decide import Context, Velocity, velocity
from pipeline.guardrails.state import BUCKET_S, ScopeState, day_of, month_of
from schemas.breaker import breaker_id, budget_breaker_id

#: gauge values of a breaker's state, so a panel can draw it as a line and colour it
BREAKER_STATE_VALUE: Final = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class BudgetReading:
    scope: str
    period: str  # monthly | daily
    spent: Decimal  # in the current period
    amount: Decimal

    @property
    def used_ratio(self) -> Decimal:
        return self.spent / self.amount


@dataclass(frozen=True, slots=True)
class BreakerReading:
    breaker: str
    scope: str
    source: str  # rate | budget
    state: str
    action: str


@dataclass(frozen=True, slots=True)
class Readings:
    budgets: tuple[BudgetReading, ...] = ()
    #: (scope, velocity) for watched scopes with spend inside the rate window
    velocity: tuple[tuple[str, Velocity], ...] = ()
    #: breakers that are not closed, or closed by a transition still inside the velocity window
    breakers: tuple[BreakerReading, ...] = ()
    #: today's share of the global scope's spend that lacks a required dimension (on the worker holding it)
    unallocated_share: Decimal | None = None


def read_scopes(states: Iterable[ScopeState], ctx: Context) -> Readings:
    policy = ctx.policy
    recent_from = ctx.now_s - policy.velocity.rate_window_s - BUCKET_S
    shown_since = ctx.now_s - policy.velocity.window_s
    budgets: list[BudgetReading] = []
    rates: list[tuple[str, Velocity]] = []
    breakers: list[BreakerReading] = []
    share: Decimal | None = None
    for state in states:
        key = state.scope.key
        for budget in policy.budgets_of(key):
            period = month_of(ctx.now_s) if budget.period == "monthly" else day_of(ctx.now_s)
            budgets.append(BudgetReading(key, budget.period, state.periods.get(period, Decimal(0)), budget.amount))
        # buckets arrive in event-time order, so the last one inserted is (nearly always) the latest
        last_bucket = next(reversed(state.buckets), None)
        if last_bucket is not None and last_bucket >= recent_from and policy.watched(state.scope):
            rates.append((key, velocity(state, ctx)))
        rate = state.rate
        if rate.state != "closed" or (rate.since_s and rate.since_s >= shown_since):
            breakers.append(BreakerReading(breaker_id("rate", key), key, "rate", rate.state,
                                           rate.action or policy.breaker.action))
        for kind in sorted(state.budget_open):  # one breaker per exhausted budget
            actions = {a for b in policy.budgets_of(key) if b.period == kind for a in b.on_exhausted.values()}
            breakers.append(BreakerReading(budget_breaker_id(key, kind), key, "budget", "open",
                                           "/".join(sorted(actions)) or "none"))
        if not state.scope.items:
            total = state.periods.get(day_of(ctx.now_s), Decimal(0))
            if total:
                share = state.unallocated.get(day_of(ctx.now_s), Decimal(0)) / total
    return Readings(tuple(budgets), tuple(rates), tuple(breakers), share)


def merge_readings(parts: Iterable[Readings]) -> Readings:
    """One worker's readings from those of its partitions (each read at its own event time)."""
    parts = list(parts)
    shares = [p.unallocated_share for p in parts if p.unallocated_share is not None]
    return Readings(tuple(b for p in parts for b in p.budgets), tuple(v for p in parts for v in p.velocity),
                    tuple(b for p in parts for b in p.breakers), shares[0] if shares else None)
