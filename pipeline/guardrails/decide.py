"""Stage 2's decisions for one scope at one event time: budget alerts, rate trips, breaker commands. Pure.

Everything here runs on event time (`now_s`, from the spend and ticks stage 1 sends); the wall
clock only stamps `issued_at`. What was decided is recorded in the ScopeState (alert ids,
breaker states), so evaluating again after a replay or a restart decides nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from pipeline.guardrails.state import (
    BUCKET_S,
    RESET_TRIGGER,
    ScopeState,
    day_of,
    minute_of,
    month_of,
    period_bounds,
)
from schemas.alert import Alert, AlertKind, Severity
from schemas.breaker import (
    BREAKER_SCHEMA_VERSION,
    BreakerAction,
    BreakerCommand,
    BreakerSource,
    BreakerState,
    breaker_id,
    budget_breaker_id,
    command_id,
)
from schemas.codec import rfc3339
from schemas.policy import Action, BreakerPolicy, Budget, LimitAction, Policy

#: projected exhaustion is not forecast from the first tenth of a period: too little to go on
PROJECTION_MIN_ELAPSED: Final = Decimal("0.1")
#: the unallocated share is judged once the day's spend is above this many minutes of noise floor
UNALLOCATED_MIN_MINUTES: Final = 10
LIMITS_WINDOW_S: Final = 60
#: the actions a rate breaker can open with; a key's `limits.action` may also be alert_only (not one of them)
_ACTIONS: Final[Mapping[str, Action]] = {"block": "block", "downgrade": "downgrade", "approved_only": "approved_only"}
#: trips of different actions at once: the strictest acts (block > approved_only > downgrade), as at the gateways
_STRICTNESS: Final[Mapping[Action, int]] = {"downgrade": 1, "approved_only": 2, "block": 3}


def show(amount: Decimal) -> str:
    """Money for sentences: two decimals (the exact figure is in `observed`)."""
    return f"{amount.quantize(Decimal('0.01')):,}"


def percent(ratio: Decimal) -> str:
    return f"{(ratio * 100).quantize(Decimal('0.01')).normalize():f}%"


@dataclass(frozen=True, slots=True)
class Trip:
    """A rate that is over its threshold now."""

    kind: AlertKind
    observed: Decimal
    threshold: Decimal
    unit: str
    sentence: str
    #: a limit trip: its key's `limits.action` (None: `breaker.action`); other trips act with `breaker.action`
    action: LimitAction | None = None


def trip_action(trip: Trip, policy: BreakerPolicy) -> Action | None:
    """The action a trip opens the rate breaker with; None for an alert-only limit (it opens nothing)."""
    return _ACTIONS.get(trip.action or policy.action)


@dataclass(slots=True)
class Decisions:
    alerts: list[Alert] = field(default_factory=list)
    commands: list[BreakerCommand] = field(default_factory=list)

    def extend(self, other: Decisions) -> None:
        self.alerts += other.alerts
        self.commands += other.commands


@dataclass(frozen=True, slots=True)
class Context:
    policy: Policy
    currency: str
    now_s: int  # event time
    issued_s: float  # wall clock, only for `issued_at` / `expires_at`


def retain_from(policy: Policy, now_s: int) -> int:
    """Oldest bucket start any decision still reads."""
    v = policy.velocity
    return now_s - now_s % BUCKET_S - max(v.window_s + v.rate_window_s, LIMITS_WINDOW_S) - BUCKET_S


def _alert(ctx: Context, state: ScopeState, alert_id: str, kind: AlertKind, severity: Severity, *,
           period: str | None, observed: Decimal, threshold: Decimal, unit: str, message: str) -> Alert:
    return Alert(alert_id=alert_id, kind=kind, severity=severity, scope=state.scope.key,
                 scope_attributes=state.scope.as_dict(), period=period, observed=str(observed),
                 threshold=str(threshold), unit=unit, message=message, event_time=rfc3339(ctx.now_s),
                 issued_at=rfc3339(ctx.issued_s))


def _command(ctx: Context, state: ScopeState, source: BreakerSource, new_state: BreakerState, *, action: BreakerAction,
             reason: str, trigger: dict[str, str], env_actions: dict[str, BreakerAction] | None = None,
             expires_s: float | None = None, breaker: str | None = None) -> BreakerCommand:
    """A command for the breaker `breaker` (default: the scope's `<source>|<scope>`)."""
    bid = breaker or breaker_id(source, state.scope.key)
    policy = ctx.policy.breaker
    return BreakerCommand(
        command_id=command_id(bid, new_state, ctx.now_s), breaker_id=bid, source=source, scope=state.scope.key,
        scope_attributes=state.scope.as_dict(), state=new_state, action=action, env_actions=env_actions or {},
        prod_envs=policy.prod_envs, downgrade=dict(ctx.policy.downgrade) if action == "downgrade" else {},
        probe_ratio=float(policy.probe_ratio) if new_state == "half_open" else 0.0, reason=reason,
        trigger=trigger, issued_at=rfc3339(ctx.issued_s), event_time=rfc3339(ctx.now_s),
        expires_at=rfc3339(expires_s) if expires_s is not None else None, schema_version=BREAKER_SCHEMA_VERSION)


# --- rates: velocity, ceilings, limits -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Velocity:
    """A scope's spend rate now and what it is judged against (both in the billing currency per minute)."""

    per_min: Decimal
    ceiling: Decimal | None
    #: the trailing baseline, once `min_history` of the scope's spend is known (zero spend while the
    #: partition was watching is known: a new scope's baseline is 0); None before
    baseline: Decimal | None
    spike_ratio: Decimal
    min_spend_per_min: Decimal
    #: calls in the rate window: a spike is a run of calls, not one large call
    requests: int = 0
    min_requests: int = 1

    @property
    def spike_threshold(self) -> Decimal | None:
        """The rate a spike needs: `spike_ratio` x baseline, and never below the noise floor."""
        if self.baseline is None:
            return None
        return max(self.spike_ratio * self.baseline, self.min_spend_per_min)

    @property
    def is_spike(self) -> bool:
        threshold = self.spike_threshold
        return threshold is not None and self.per_min >= threshold and self.requests >= self.min_requests

    @property
    def threshold(self) -> Decimal | None:
        """The lowest rate that trips the breaker, or None when nothing can."""
        found = [t for t in (self.ceiling, self.spike_threshold) if t is not None]
        return min(found) if found else None


def velocity(state: ScopeState, ctx: Context) -> Velocity:
    policy, v = ctx.policy, ctx.policy.velocity
    end = ctx.now_s - ctx.now_s % BUCKET_S + BUCKET_S
    rate_from = end - v.rate_window_s
    recent = state.sum_since(rate_from, end)
    per_min = recent.cost * 60 / v.rate_window_s
    baseline = None
    if state.scope.dims in v.shapes and state.first_s is not None:
        history = min(v.window_s, rate_from - state.first_s)
        if history >= v.min_history_s:
            baseline = state.sum_since(rate_from - history, rate_from).cost * 60 / history
        elif ctx.now_s - state.first_s >= v.min_history_s and not state.sum_since(state.first_s, rate_from).requests:
            # known for min_history with no call before the rate window: a new scope, whose baseline is zero
            baseline = Decimal(0)
    return Velocity(per_min, policy.ceiling(state.scope), baseline, v.spike_ratio, v.min_spend_per_min,
                    recent.requests, v.min_requests)


def rate_trips(state: ScopeState, ctx: Context) -> list[Trip]:
    policy, cur, scope = ctx.policy, ctx.currency, state.scope
    rate = velocity(state, ctx)
    per_min, ceiling, baseline = rate.per_min, rate.ceiling, rate.baseline
    end = ctx.now_s - ctx.now_s % BUCKET_S + BUCKET_S
    trips = []
    if ceiling is not None and per_min > ceiling:
        trips.append(Trip("velocity_ceiling", per_min, ceiling, f"{cur}/min",
                          f"{scope.key} is spending {show(per_min)} {cur}/min, above its ceiling of "
                          f"{show(ceiling)} {cur}/min"))
    if baseline is not None and rate.is_spike:
        trips.append(Trip("velocity_spike", per_min, rate.spike_ratio * baseline, f"{cur}/min",
                          f"{scope.key} is spending {show(per_min)} {cur}/min, "
                          f"{'with no spend before' if not baseline else f'{per_min / baseline:.1f}x'} "
                          f"its trailing baseline of {show(baseline)} {cur}/min"))
    limits = policy.limits.get(scope.key)
    if limits is not None:
        minute = state.sum_since(end - LIMITS_WINDOW_S, end)
        for observed, limit, unit in ((minute.requests, limits.requests_per_minute, "requests/min"),
                                      (minute.tokens, limits.tokens_per_minute, "tokens/min")):
            if limit is not None and observed > limit:
                trips.append(Trip("limit_exceeded", Decimal(observed), Decimal(limit), unit,
                                  f"{scope.key} made {observed:,} {unit.split('/')[0]} in the last minute, "
                                  f"above its limit of {limit:,}", limits.action))
    return trips


def held_after_reset(state: ScopeState, ctx: Context) -> bool:
    """An operator reset the rate breaker less than `breaker.cool_down` ago: it stays closed whatever the rate,
    so the reset is not overridden at once."""
    rate = state.rate
    return (rate.state == "closed" and rate.trigger.get("kind") == RESET_TRIGGER
            and ctx.now_s - rate.since_s < ctx.policy.breaker.cool_down_s)


def decide_rate(state: ScopeState, ctx: Context) -> Decisions:
    """Move the rate breaker: closed -> open on a trip; open -> half_open after the cool-down once the
    rate is back under; half_open -> closed after a probe period without a trip, or back to open.

    A limit whose `limits.action` is alert_only only alerts (once per minute and unit) and moves no breaker.
    After an operator's reset the breaker stays closed for `breaker.cool_down` (`held_after_reset`)."""
    out = Decisions()
    if not ctx.policy.watched(state.scope):
        return out
    trips = rate_trips(state, ctx)
    breaker, policy = state.rate, ctx.policy.breaker
    bid = breaker_id("rate", state.scope.key)
    minute = minute_of(ctx.now_s)
    acting = [t for t in trips if trip_action(t, policy) is not None]
    for trip in trips:
        alert_id = f"{trip.kind}|{state.scope.key}|{minute}|{trip.unit}"
        if trip_action(trip, policy) is None and alert_id not in state.alerted:
            state.alerted.add(alert_id)
            out.alerts.append(_alert(
                ctx, state, alert_id, trip.kind, "warning", period=minute, observed=trip.observed,
                threshold=trip.threshold, unit=trip.unit,
                message=f"{trip.sentence}; alert only (limits.action: alert_only), no breaker opens."))
    elapsed = ctx.now_s - breaker.since_s
    if acting and breaker.state in ("closed", "half_open") and not held_after_reset(state, ctx):
        # a velocity trip acts with breaker.action, a limit trip with its key's limits.action; when both trip at
        # once the strictest of them acts: block > approved_only > downgrade
        action = max((a for t in acting if (a := trip_action(t, policy)) is not None), key=_STRICTNESS.__getitem__)
        for trip in acting:
            suffix = f"|{trip.unit}" if trip.kind == "limit_exceeded" else ""
            out.alerts.append(_alert(
                ctx, state, f"{trip.kind}|{state.scope.key}|{minute}{suffix}", trip.kind,
                "warning" if trip.kind == "limit_exceeded" else "critical", period=minute,
                observed=trip.observed, threshold=trip.threshold, unit=trip.unit,
                message=f"{trip.sentence}; breaker {bid} opens ({action})."))
        first = next(t for t in acting if trip_action(t, policy) == action)
        breaker.state, breaker.since_s, breaker.action = "open", ctx.now_s, action
        breaker.trigger = {"kind": first.kind, "observed": str(first.observed), "threshold": str(first.threshold),
                           "unit": first.unit}
        out.commands.append(_command(ctx, state, "rate", "open", action=action, reason=first.sentence,
                                     trigger=breaker.trigger, expires_s=ctx.issued_s + policy.expire_after_s))
        return out
    action = _ACTIONS.get(breaker.action, policy.action)  # the action it opened with
    if breaker.state == "open" and not acting and elapsed >= policy.cool_down_s:
        breaker.state, breaker.since_s = "half_open", ctx.now_s
        out.commands.append(_command(
            ctx, state, "rate", "half_open", action=action, trigger=breaker.trigger,
            reason=f"cool-down of {policy.cool_down_s}s over and the rate is back under its threshold: probing "
                   f"with {percent(policy.probe_ratio)} of traffic", expires_s=ctx.issued_s + policy.expire_after_s))
    elif breaker.state == "half_open" and not acting and elapsed >= policy.probe_s:
        breaker.state, breaker.since_s = "closed", ctx.now_s
        out.commands.append(_command(ctx, state, "rate", "closed", action=action, trigger=breaker.trigger,
                                     reason=f"{policy.probe_s}s of probing without a trip: closed"))
    return out


# --- budgets ---------------------------------------------------------------------------------------------

def _budget_actions(budget: Budget) -> dict[str, BreakerAction]:
    return {env: budget.on_exhausted.get(env, "none") for env in ("prod", "non_prod")}


def decide_budgets(state: ScopeState, ctx: Context) -> Decisions:
    """Each threshold of each budget alerts once per period; a hard budget's 100 % opens its own breaker
    (`budget|scope|period kind`) until the period ends, unless an operator reset the scope in that period."""
    out = Decisions()
    cur, scope = ctx.currency, state.scope.key
    budgets = ctx.policy.budgets_of(scope)
    for budget in budgets:
        length = 7 if budget.period == "monthly" else 10
        bid = budget_breaker_id(scope, budget.period)
        for period in sorted(p for p in state.periods if len(p) == length):
            spent = state.periods[period]
            end = period_bounds(period)[1]
            for threshold in budget.thresholds:
                limit = budget.amount * threshold.ratio
                alert_id = f"budget_threshold|{scope}|{period}|{percent(threshold.ratio)}"
                if spent < limit or alert_id in state.alerted:
                    continue
                state.alerted.add(alert_id)
                hard = threshold.hard and end > ctx.now_s
                severity: Severity = "critical" if threshold.ratio >= 1 else "warning" if threshold.ratio >= Decimal(
                    "0.8") else "info"
                action_text = ""
                if hard and period in state.budget_reset:
                    action_text = f"; breaker {bid} stays closed: an operator reset {scope} in {period}"
                elif hard:
                    actions = _budget_actions(budget)
                    action_text = (f"; breaker {bid} opens until {rfc3339(end)} "
                                   f"(prod: {actions['prod']}, non-prod: {actions['non_prod']})")
                    state.budget_open[budget.period] = max(state.budget_open.get(budget.period, 0), end)
                    out.commands.append(_command(
                        ctx, state, "budget", "open", action=actions["non_prod"], env_actions=actions, breaker=bid,
                        reason=f"{budget.period} budget of {show(budget.amount)} {cur} for {scope} ({budget.source}) "
                               f"is exhausted in {period}",
                        trigger={"kind": "budget_threshold", "observed": str(spent), "threshold": str(limit),
                                 "unit": cur, "period": period}, expires_s=end))
                out.alerts.append(_alert(
                    ctx, state, alert_id, "budget_threshold", severity, period=period, observed=spent,
                    threshold=limit, unit=cur,
                    message=f"{scope} has spent {show(spent)} {cur} in {period}, {percent(threshold.ratio)} of its "
                            f"{budget.period} budget of {show(budget.amount)} {cur}{action_text}."))
        out.extend(_projection(state, ctx, budget))
    for kind, until in sorted(state.budget_open.items()):
        if ctx.now_s < until:
            continue
        del state.budget_open[kind]
        source = next((f" ({b.source})" for b in budgets if b.period == kind), "")
        out.commands.append(_command(ctx, state, "budget", "closed", action="none", trigger={},
                                     breaker=budget_breaker_id(scope, kind),
                                     reason=f"the period of the exhausted {kind} budget for {scope}{source} is over"))
    return out


def _projection(state: ScopeState, ctx: Context, budget: Budget) -> Decisions:
    """Alert once per period when a linear forecast of the period-end spend crosses the budget."""
    out = Decisions()
    period = month_of(ctx.now_s) if budget.period == "monthly" else day_of(ctx.now_s)
    start, end = period_bounds(period)
    spent = state.periods.get(period, Decimal(0))
    elapsed = Decimal(ctx.now_s - start) / (end - start)
    alert_id = f"budget_projected|{state.scope.key}|{period}"
    if elapsed < PROJECTION_MIN_ELAPSED or spent >= budget.amount or alert_id in state.alerted:
        return out
    projected = spent / elapsed
    if projected >= budget.amount:
        state.alerted.add(alert_id)
        out.alerts.append(_alert(
            ctx, state, alert_id, "budget_projected", "warning", period=period, observed=projected,
            threshold=budget.amount, unit=ctx.currency,
            message=f"{state.scope.key} is on course to spend {show(projected)} {ctx.currency} in {period}, above its "
                    f"{budget.period} budget of {show(budget.amount)} {ctx.currency} "
                    f"({show(spent)} spent with {percent(elapsed)} of the period gone)."))
    return out


# --- unallocated share (global scope) ---------------------------------------------------------------------

def decide_unallocated(state: ScopeState, ctx: Context) -> Decisions:
    out = Decisions()
    share_limit = ctx.policy.max_unallocated_share
    if state.scope.items or share_limit is None:
        return out
    day = day_of(ctx.now_s)
    total = state.periods.get(day, Decimal(0))
    alert_id = f"unallocated_share|{state.scope.key}|{day}"
    if total < ctx.policy.velocity.min_spend_per_min * UNALLOCATED_MIN_MINUTES or alert_id in state.alerted:
        return out
    share = state.unallocated.get(day, Decimal(0)) / total
    if share > share_limit:
        state.alerted.add(alert_id)
        out.alerts.append(_alert(
            ctx, state, alert_id, "unallocated_share", "warning", period=day, observed=share, threshold=share_limit,
            unit="share", message=f"{percent(share)} of today's spend ({show(total)} {ctx.currency}) has no team or "
                                  f"other required attribution, above the {percent(share_limit)} allowed."))
    return out


def decide(state: ScopeState, ctx: Context) -> Decisions:
    """Everything due for this scope now."""
    out = decide_budgets(state, ctx)
    out.extend(decide_rate(state, ctx))
    out.extend(decide_unallocated(state, ctx))
    return out


def unpriced_alert(provider: str | None, model: str | None, exc_reason: tuple[str, str], *, now_s: int,
                   issued_s: float) -> Alert:
    """One alert per unpriced model per UTC day (stage 1 sends it; the id makes repeats harmless)."""
    reason, detail = exc_reason
    name = f"{provider or '?'}/{model or '?'}"
    day = day_of(now_s)
    return Alert(alert_id=f"unpriced_model|{name}|{day}", kind="unpriced_model", severity="warning", scope="global",
                 scope_attributes={}, period=day, observed="1", threshold="0", unit="calls",
                 message=f"Calls to {name} cannot be priced ({reason}): {detail}. They are in genai.deadletter; "
                         "add a pricing override to bill them.",
                 event_time=rfc3339(now_s), issued_at=rfc3339(issued_s),
                 details={"provider": provider, "model": model, "reason": reason})
