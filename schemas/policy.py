"""The guardrail policy of spendstream.yaml, typed: scopes, budgets, limits, velocity, breaker, downgrade.

`policy_from_sections` turns the schema-checked YAML sections into a `Policy` and lists every
cross-field problem (`key: problem`), so the config loader reports them with the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal

Action = Literal["block", "downgrade", "approved_only"]
#: what a key's `limits` do when exceeded: an action of its own, or only alert
LimitAction = Literal["alert_only", "block", "downgrade", "approved_only"]
Period = Literal["daily", "monthly"]
DEFAULT_THRESHOLDS: Final = (Decimal("0.5"), Decimal("0.8"), Decimal("1"))
DEFAULT_PERIOD: Final[Period] = "monthly"
GLOBAL: Final = "global"
_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration_s(text: str) -> int:
    """'30s', '5m', '1h', '7d' -> seconds. Raises ValueError naming the text."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration like 30s, 5m, 1h or 7d: {text!r}")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _escape(value: str) -> str:
    return value.replace("%", "%25").replace(",", "%2C").replace("=", "%3D").replace("|", "%7C")


def _unescape(value: str) -> str:
    return value.replace("%7C", "|").replace("%3D", "=").replace("%2C", ",").replace("%25", "%")


@dataclass(frozen=True, slots=True)
class Scope:
    """A set of attribution values, e.g. {team: search, env: prod}; empty is the global scope.

    `key` is its canonical text (dimensions sorted, `,` `=` `|` `%` escaped): the Kafka key of
    `genai.spend`, alerts and breaker commands.
    """

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, values: Mapping[str, str]) -> Scope:
        return cls(tuple(sorted(values.items())))

    @classmethod
    def parse(cls, text: str) -> Scope:
        """'global' or 'team=search,env=prod' (the form `key` writes and the CLI takes)."""
        if text in (GLOBAL, ""):
            return cls()
        items = []
        for part in text.split(","):
            dim, sep, value = part.partition("=")
            if not sep or not dim or not value:
                raise ValueError(f"scope {text!r}: expected 'global' or dimension=value[,dimension=value…]")
            items.append((dim.strip(), _unescape(value.strip())))
        return cls.of(dict(items))

    @property
    def key(self) -> str:
        return ",".join(f"{d}={_escape(v)}" for d, v in self.items) if self.items else GLOBAL

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.items)

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)

    def matches(self, attribution: Mapping[str, str]) -> bool:
        return all(attribution.get(d) == v for d, v in self.items)


@dataclass(frozen=True, slots=True)
class Threshold:
    ratio: Decimal  # of the budget amount
    #: crossing it opens the budget breaker (the hard limit); otherwise it only alerts
    hard: bool = False


@dataclass(frozen=True, slots=True)
class Budget:
    """Spend allowed per calendar period (UTC) for one scope, in the billing currency."""

    source: str  # where it was configured, e.g. "budgets[0]": named in messages
    scope: Scope
    period: Period
    amount: Decimal
    thresholds: tuple[Threshold, ...]
    #: breaker action at the hard limit by environment class ("prod", "non_prod"); none: alert only
    on_exhausted: Mapping[str, Action] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    #: what exceeding them does: alert_only (no breaker) or the rate breaker's action; None: `breaker.action`
    action: LimitAction | None = None


@dataclass(frozen=True, slots=True)
class VelocityPolicy:
    #: trailing baseline the current rate is compared with
    window_s: int = 300
    #: the current rate is the spend of this last stretch of event time, per minute
    rate_window_s: int = 60
    spike_ratio: Decimal = Decimal(3)
    min_spend_per_min: Decimal = Decimal(1)
    #: spend known for less than this gives no baseline yet: only ceilings apply. A scope first seen while
    #: its partition was already watching has a known baseline of zero from when the watching began.
    min_history_s: int = 60
    #: a spike needs at least this many calls in the rate window: one large call is not a runaway
    min_requests: int = 3
    #: which scopes are watched: each a tuple of dimensions, () is global
    shapes: tuple[tuple[str, ...], ...] = (("team",), ("key",))
    #: absolute ceiling (per minute) for every watched scope without its own
    max_per_min: Decimal | None = None


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    action: Action = "block"
    #: an open breaker stays open at least this long (event time), and until the rate is back under
    cool_down_s: int = 60
    #: half-open: this long under threshold closes it; gateways let `probe_ratio` of traffic through
    probe_s: int = 30
    probe_ratio: Decimal = Decimal("0.1")
    #: gateways stop obeying a rate command this long after it was issued if nothing follows (fail open)
    expire_after_s: int = 900
    prod_envs: tuple[str, ...] = ("prod", "production")


@dataclass(frozen=True, slots=True)
class Policy:
    budgets: tuple[Budget, ...] = ()
    limits: Mapping[str, Limits] = field(default_factory=dict)  # scope key -> limits
    ceilings: Mapping[str, Decimal] = field(default_factory=dict)  # scope key -> spend per minute
    velocity: VelocityPolicy = field(default_factory=VelocityPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    downgrade: Mapping[str, str] = field(default_factory=dict)
    max_unallocated_share: Decimal | None = Decimal("0.1")

    def budgets_of(self, scope_key: str) -> list[Budget]:
        return [b for b in self.budgets if b.scope.key == scope_key]

    def watched(self, scope: Scope) -> bool:
        """Is this scope's velocity checked (a watched shape, or a scope with its own ceiling or limits)?"""
        return scope.dims in self.velocity.shapes or scope.key in self.ceilings or scope.key in self.limits

    def ceiling(self, scope: Scope) -> Decimal | None:
        return self.ceilings.get(scope.key, self.velocity.max_per_min if scope.dims in self.velocity.shapes else None)

    def scopes_of(self, attribution: Mapping[str, str]) -> list[Scope]:
        """Every scope a call with this attribution adds spend to: global, the watched shapes it has
        values for, the budgeted and limited scopes it matches."""
        scopes = {GLOBAL: Scope()}
        for shape in self.velocity.shapes:
            if all(attribution.get(d) for d in shape):
                scope = Scope(tuple((d, attribution[d]) for d in sorted(shape)))
                scopes[scope.key] = scope
        for budget in self.budgets:
            if budget.scope.matches(attribution):
                scopes[budget.scope.key] = budget.scope
        key = attribution.get("key")
        if key:
            scope = Scope((("key", key),))
            if scope.key in self.limits or scope.key in self.ceilings:
                scopes[scope.key] = scope
        return list(scopes.values())


def _money(value: Any) -> Decimal:
    return Decimal(str(value))


def _shape(item: str | Sequence[str]) -> tuple[str, ...]:
    if item == GLOBAL:
        return ()
    return (item,) if isinstance(item, str) else tuple(sorted(item))


def _budget(source: str, raw: Mapping[str, Any]) -> Budget:
    on_exhausted = dict(raw.get("on_exhausted", {}))
    ratios = {_money(r) for r in raw.get("alerts", DEFAULT_THRESHOLDS)}
    if on_exhausted:
        ratios.add(Decimal(1))  # the hard limit acts at 100 % even when no alert is configured there
    return Budget(source=source, scope=Scope.of(raw["scope"]), period=raw.get("period", DEFAULT_PERIOD),
                  amount=_money(raw["amount"]),
                  thresholds=tuple(Threshold(r, hard=bool(on_exhausted) and r == 1) for r in sorted(ratios)),
                  on_exhausted=on_exhausted)


def _key_budget(source: str, key: str, raw: Mapping[str, Any], action: Action) -> Budget | None:
    soft, hard = raw.get("soft_limit"), raw.get("hard_limit")
    if hard is None and soft is None:
        return None
    amount = _money(hard if hard is not None else soft)
    thresholds = []
    if soft is not None and hard is not None and amount:
        thresholds.append(Threshold(_money(soft) / amount))
    thresholds.append(Threshold(Decimal(1), hard=hard is not None))
    return Budget(source=source, scope=Scope((("key", key),)), period=raw.get("period", DEFAULT_PERIOD), amount=amount,
                  thresholds=tuple(thresholds),
                  on_exhausted={"prod": action, "non_prod": action} if hard is not None else {})


#: YAML key -> (dataclass field, converter): a key absent from the file keeps the field's default
_Fields = Mapping[str, tuple[str, Callable[[Any], Any]]]
_BREAKER_FIELDS: Final[_Fields] = {
    "action": ("action", str), "cool_down": ("cool_down_s", duration_s), "probe": ("probe_s", duration_s),
    "probe_ratio": ("probe_ratio", _money), "expire_after": ("expire_after_s", duration_s),
    "prod_envs": ("prod_envs", tuple)}
_VELOCITY_FIELDS: Final[_Fields] = {
    "window": ("window_s", duration_s), "rate_window": ("rate_window_s", duration_s),
    "spike_ratio": ("spike_ratio", _money), "min_spend_per_min": ("min_spend_per_min", _money),
    "min_history": ("min_history_s", duration_s), "min_requests": ("min_requests", int),
    "scopes": ("shapes", lambda v: tuple(_shape(s) for s in v)),
    "max_per_min": ("max_per_min", _money)}


def _given(raw: Mapping[str, Any], fields: _Fields) -> dict[str, Any]:
    return {name: convert(raw[key]) for key, (name, convert) in fields.items() if key in raw}


def policy_from_sections(data: Mapping[str, Any], dimensions: Sequence[str]) -> tuple[Policy, list[str]]:
    """The Policy of a schema-checked config mapping, and every problem found (empty when valid)."""
    problems: list[str] = []
    known = set(dimensions)
    breaker = BreakerPolicy(**_given(data.get("breaker", {}), _BREAKER_FIELDS))
    velocity = VelocityPolicy(**_given(data.get("velocity", {}), _VELOCITY_FIELDS))
    if velocity.rate_window_s > velocity.window_s:
        problems.append("velocity.rate_window: longer than velocity.window (the baseline it is compared with)")
    for i, shape in enumerate(velocity.shapes):
        problems += [f"velocity.scopes[{i}]: unknown dimension {d!r}" for d in shape if d not in known]

    budgets: list[Budget] = []
    for i, raw in enumerate(data.get("budgets", ())):
        budget = _budget(f"budgets[{i}]", raw)
        problems += [f"budgets[{i}].scope: unknown dimension {d!r} (known: {', '.join(sorted(known))})"
                     for d in budget.scope.dims if d not in known]
        if not budget.amount:
            problems.append(f"budgets[{i}].amount: must be above 0")
        budgets.append(budget)
    limits: dict[str, Limits] = {}
    ceilings: dict[str, Decimal] = {}
    listed: set[str] = set()
    for i, raw in enumerate(data.get("keys", ())):
        scope = Scope((("key", raw["key"]),))
        if scope.key in listed:
            problems.append(f"keys[{i}].key: {raw['key']!r} is listed twice")
        listed.add(scope.key)
        if "limits" in raw:
            raw_limits = raw["limits"]
            limits[scope.key] = Limits(requests_per_minute=raw_limits.get("requests_per_minute"),
                                       tokens_per_minute=raw_limits.get("tokens_per_minute"),
                                       action=raw_limits.get("action"))
            if raw_limits.get("action") == "downgrade" and not data.get("downgrade"):
                problems.append(f"keys[{i}].limits.action: downgrade needs a `downgrade:` model map")
        if "cost_velocity_per_min" in raw.get("circuit_breaker", {}):
            ceilings[scope.key] = _money(raw["circuit_breaker"]["cost_velocity_per_min"])
        budget_raw = raw.get("budget", {})
        soft, hard = budget_raw.get("soft_limit"), budget_raw.get("hard_limit")
        if soft is not None and hard is not None and soft > hard:
            problems.append(f"keys[{i}].budget.soft_limit: {soft} is above hard_limit {hard}")
        key_budget = _key_budget(f"keys[{i}].budget", raw["key"], budget_raw, breaker.action)
        if key_budget is not None:
            budgets.append(key_budget)
    seen: dict[tuple[str, str], str] = {}
    for budget in budgets:
        where = seen.setdefault((budget.scope.key, budget.period), budget.source)
        if where != budget.source:
            problems.append(f"{budget.source}: a {budget.period} budget for {budget.scope.key} is already set at "
                            f"{where}")
    share = _given(data.get("attribution", {}), {"max_unallocated_share": ("max_unallocated_share", _money)})
    policy = Policy(budgets=tuple(budgets), limits=limits, ceilings=ceilings, velocity=velocity, breaker=breaker,
                    downgrade=dict(data.get("downgrade", {})), **share)
    return policy, problems
