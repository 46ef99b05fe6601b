"""Stage 2's pure core: spend added once, budgets, projection, velocity, limits, breaker state machine."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from pipeline.guardrails.decide import Context, decide, retain_from
from pipeline.guardrails.readings import read_scopes
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.guardrails.stage import PartitionState, apply_messages, decide_partition, sweep_idle
from pipeline.guardrails.state import ScopeState
from schemas.breaker import BreakerCommand
from schemas.config import config_from_dict
from schemas.errors import ConfigError, SchemaError
from schemas.guardrail_state import decode_scope_state, encode_state_value
from schemas.policy import Policy, Scope, duration_s
from schemas.spend import Reset, SpendEntry, SpendMessage, Tick, decode_spend
from schemas.usage import TokenCounts, UsageEvent

NOV_22 = int(datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp())  # 70 % of November gone


def through_changelog(state: ScopeState) -> ScopeState:
    """The state as a worker taking the scope over reads it back from the changelog."""
    return ScopeState.from_value(decode_scope_state(encode_state_value(state.to_value())))


def policy(**sections: object) -> Policy:
    return config_from_dict({"billing_currency": "EUR", "fx": {"USD": 0.92}, **sections}).policy


class Feed:
    """Spend for one scope, one usage partition, consecutive offsets; decisions at the latest event time."""

    def __init__(self, scope: str, pol: Policy) -> None:
        self.state = ScopeState(Scope.parse(scope))
        self.policy = pol
        self.offset = 0
        self.now = 0
        self.alerts: list[str] = []
        self.commands: list[tuple[str, str]] = []
        self.sent: list[BreakerCommand] = []

    def spend(self, at_s: int, cost: str, requests: int = 1, tokens: int = 100, unallocated: str = "0") -> None:
        self.offset += 1
        self.now = max(self.now, at_s)
        entry = SpendEntry(0, self.offset, at_s - at_s % 5, Decimal(cost), requests, tokens, Decimal(unallocated))
        self.state.add([entry], retain_from(self.policy, self.now))
        self.decide()

    def tick(self, at_s: int) -> None:
        self.now = max(self.now, at_s)
        self.decide()

    def decide(self) -> None:
        out = decide(self.state, Context(self.policy, "EUR", self.now, 0.0))
        self.state.prune(retain_from(self.policy, self.now), self.now)
        self.alerts += [a.alert_id for a in out.alerts]
        self.commands += [(c.breaker_id, c.state) for c in out.commands]
        self.sent += out.commands


def call(team: str | None, key: str, start_s: int, *, allocated: bool = True, end_s: int | None = None) -> UsageEvent:
    attribution = {"use_case": "chat", "env": "prod", "key": key, "team": team or "unallocated"}
    return UsageEvent(id=f"t-{start_s}-{key}", trace_id="t", span_id="s", parent_span_id=None,
                      start_time_unix_nano=start_s * 10**9,
                      end_time_unix_nano=(start_s + 1 if end_s is None else end_s) * 10**9,
                      operation="chat", provider="openai", request_model="gpt-4o", response_model="gpt-4o",
                      tokens=TokenCounts(input_uncached=100, output=50), attribution=attribution,
                      attribution_key=f"{team}|{key}", allocated=allocated)


# --- stage 1: partial spend per scope --------------------------------------------------------------------

def test_spend_goes_to_every_scope_of_a_call_once_per_usage_message() -> None:
    pol = policy(budgets=[{"scope": {"team": "search", "env": "prod"}, "amount": 100}],
                 keys=[{"key": "k1", "limits": {"requests_per_minute": 5}}])
    calls = [PricedCall(call("search", "k1", NOV_22), 0, 7, Decimal("0.25")),
             PricedCall(call("search", "k1", NOV_22 + 1), 0, 7, Decimal("0.5")),
             PricedCall(call(None, "k2", NOV_22, allocated=False), 1, 3, Decimal("1"))]
    messages = {key.decode(): decode_spend(value)
                for key, value in spend_records(calls, ScopeIndex(pol), latest_ns=(NOV_22 + 300) * 10**9)}
    assert set(messages) == {"global", "team=search", "key=k1", "env=prod,team=search", "team=unallocated",
                             "key=k2"}
    search = messages["env=prod,team=search"]
    assert isinstance(search, SpendMessage)
    assert search.entries == [SpendEntry(0, 7, NOV_22, Decimal("0.75"), 2, 300, Decimal(0), NOV_22)]
    world = messages["global"]
    assert isinstance(world, SpendMessage)
    assert sum(e.cost for e in world.entries) == Decimal("1.75")
    assert sum(e.unallocated for e in world.entries) == Decimal("1")


def test_a_long_call_counts_for_velocity_when_it_ends_and_for_its_period_when_it_started() -> None:
    """A 10-minute call (agents stream for minutes) must be seen by the rate windows now, not 10 minutes ago
    where no window looks any more; its day and month are those of its FOCUS rows (its start)."""
    month_end = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    long_call = call("search", "k1", month_end - 600, end_s=month_end + 12)
    (_, value), = [r for r in spend_records([PricedCall(long_call, 0, 1, Decimal("3"))], ScopeIndex(policy()),
                                           latest_ns=(month_end + 300) * 10**9) if r[0] == b"global"]
    message = decode_spend(value)
    assert isinstance(message, SpendMessage)
    assert message.entries == [SpendEntry(0, 1, month_end + 10, Decimal(3), 1, 150, Decimal(0), month_end - 600)]
    state = ScopeState(Scope())
    state.add(message.entries, month_end - 60)
    assert state.buckets[month_end + 10].cost == Decimal(3)
    assert state.periods == {"2026-11": Decimal(3), "2026-11-30": Decimal(3)}


def test_a_far_future_end_time_is_capped_at_now_plus_the_accepted_skew() -> None:
    hostile = call("search", "k1", NOV_22, end_s=NOV_22 + 86400 * 365)
    records = spend_records([PricedCall(hostile, 0, 1, Decimal("1"))], ScopeIndex(policy()),
                            latest_ns=(NOV_22 + 302) * 10**9)
    message = decode_spend(records[0][1])
    assert isinstance(message, SpendMessage)
    assert [(e.bucket_s, e.charged_s) for e in message.entries] == [(NOV_22 + 300, NOV_22)]


def test_a_previous_release_spend_message_charges_by_its_one_bucket() -> None:
    old = orjson.dumps({"schema_version": 1, "scope": "team=search",
                        "entries": [[0, 4, NOV_22, "1.5", 1, 10, "0"]]})
    message = decode_spend(old)
    assert isinstance(message, SpendMessage)
    assert message.entries[0].period_s == NOV_22
    with pytest.raises(SchemaError, match="2 charged_s for 1 entries"):
        decode_spend(old[:-1] + b',"charged_s":[1,2]}')


def test_spend_added_once_however_a_replay_cuts_its_batches() -> None:
    entries = [SpendEntry(p, o, NOV_22, Decimal(f"0.{o}1"), 1, 10, Decimal(0)) for p in (0, 1) for o in range(1, 9)]
    once = ScopeState(Scope())
    once.add(entries, 0)
    replayed = ScopeState(Scope())
    replayed.add(entries[:5], 0)
    replayed.add(entries[3:11], 0)  # a crash after 5: the replay starts earlier and ends later
    replayed.add(entries, 0)
    assert replayed.periods == once.periods
    assert replayed.buckets == once.buckets
    assert replayed.offsets == {0: 8, 1: 8}


def test_state_survives_its_changelog_form() -> None:
    feed = Feed("team=search", policy(budgets=[{"scope": {"team": "search"}, "amount": 10,
                                                "on_exhausted": {"prod": "block"}}]))
    feed.spend(NOV_22, "12.5")
    restored = through_changelog(feed.state)
    assert restored == feed.state


# --- budgets ------------------------------------------------------------------------------------------------

def test_each_threshold_alerts_once_and_the_hard_limit_opens_the_budget_breaker_until_month_end() -> None:
    feed = Feed("team=search", policy(budgets=[{"scope": {"team": "search"}, "amount": 2000,
                                                "on_exhausted": {"non_prod": "block", "prod": "approved_only"}}],
                                      velocity={"scopes": []}))
    month_start = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
    for i in range(30):  # 30 x 80 EUR = 2400 EUR, in the first days of the month (no projection yet)
        feed.spend(month_start + 3600 * i, "80")
    assert feed.alerts == ["budget_threshold|team=search|2026-11|50%", "budget_threshold|team=search|2026-11|80%",
                           "budget_threshold|team=search|2026-11|100%"]
    assert feed.commands == [("budget|team=search|monthly", "open")]
    feed.tick(int(datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC).timestamp()))
    assert feed.commands[-1] == ("budget|team=search|monthly", "closed")


def test_budget_command_carries_the_action_of_each_environment() -> None:
    pol = policy(budgets=[{"scope": {"team": "search"}, "amount": 10, "on_exhausted": {"non_prod": "block"}}])
    state = ScopeState(Scope.parse("team=search"))
    state.add([SpendEntry(0, 1, NOV_22, Decimal(11), 1, 1, Decimal(0))], 0)
    command = decide(state, Context(pol, "EUR", NOV_22, 0.0)).commands[0]
    assert (command.env_actions, command.action) == ({"prod": "none", "non_prod": "block"}, "block")
    assert command.expires_at == "2026-12-01T00:00:00Z"


def test_projected_exhaustion_alerts_once_when_the_forecast_crosses_the_budget() -> None:
    feed = Feed("team=search", policy(budgets=[{"scope": {"team": "search"}, "amount": 1000, "alerts": [1.0]}]))
    feed.spend(NOV_22, "600")  # 70 % of the month gone: 600 / 0.7 = 857 < 1000
    assert feed.alerts == []
    feed.spend(NOV_22 + 60, "150")  # 750 / 0.7 > 1000
    assert feed.alerts == ["budget_projected|team=search|2026-11"]
    feed.spend(NOV_22 + 120, "10")
    assert len(feed.alerts) == 1


def test_key_soft_and_hard_limits() -> None:
    feed = Feed("key=k1", policy(keys=[{"key": "k1", "budget": {"period": "daily", "soft_limit": 50,
                                                                "hard_limit": 80}}]))
    feed.spend(NOV_22 - 11 * 3600, "60")
    assert feed.alerts == ["budget_threshold|key=k1|2026-11-22|62.5%"] and feed.commands == []
    feed.spend(NOV_22 - 11 * 3600 + 5, "30")
    assert feed.alerts[-1] == "budget_threshold|key=k1|2026-11-22|100%"
    assert feed.commands == [("budget|key=k1|daily", "open")]


# --- velocity and the rate breaker ------------------------------------------------------------------------

def velocity_policy(**breaker: object) -> Policy:
    return policy(velocity={"window": "5m", "rate_window": "30s", "spike_ratio": 3, "min_spend_per_min": 1,
                            "min_history": "1m", "scopes": ["team"]},
                  breaker={"cool_down": "20s", "probe": "10s", **breaker})


def steady(feed: Feed, start: int, seconds: int, per_s: str) -> None:
    for t in range(start, start + seconds):
        feed.spend(t, per_s)


def test_spike_over_the_trailing_baseline_opens_then_half_opens_then_closes() -> None:
    feed = Feed("team=research", velocity_policy())
    steady(feed, NOV_22, 300, "0.05")  # 3 EUR/min for five minutes
    assert feed.commands == []
    steady(feed, NOV_22 + 300, 3, "2")  # a runaway: 120 EUR/min
    assert feed.commands == [("rate|team=research", "open")]
    assert feed.alerts[0].startswith("velocity_spike|team=research|")
    steady(feed, NOV_22 + 303, 15, "1")
    assert feed.commands == [("rate|team=research", "open")]  # still running away: no probing
    steady(feed, NOV_22 + 318, 120, "0.05")  # back to normal
    assert feed.commands == [("rate|team=research", "open"), ("rate|team=research", "half_open"),
                             ("rate|team=research", "closed")]


def test_a_new_scope_has_no_baseline_and_only_its_ceiling_applies() -> None:
    pol = policy(velocity={"scopes": ["key"], "min_history": "2m", "rate_window": "10s"},
                 keys=[{"key": "new", "circuit_breaker": {"cost_velocity_per_min": 30}}])
    feed = Feed("key=new", pol)
    steady(feed, NOV_22, 4, "0.4")  # 24 EUR/min over 10 s: no history, under the ceiling
    assert feed.commands == []
    steady(feed, NOV_22 + 4, 2, "2")
    assert feed.commands == [("rate|key=new", "open")]
    assert feed.alerts[0].startswith("velocity_ceiling|key=new|")


def test_half_open_trips_again_when_the_rate_comes_back() -> None:
    feed = Feed("team=research", velocity_policy())
    steady(feed, NOV_22, 300, "0.05")
    steady(feed, NOV_22 + 300, 3, "2")
    feed.tick(NOV_22 + 340)  # blocked by the gateways: no spend, cool-down passes
    assert feed.commands[-1] == ("rate|team=research", "half_open")
    steady(feed, NOV_22 + 341, 3, "5")
    assert feed.commands[-1] == ("rate|team=research", "open")


def test_late_spend_counts_in_its_own_minute() -> None:
    feed = Feed("team=research", velocity_policy())
    steady(feed, NOV_22, 300, "0.05")
    feed.spend(NOV_22 + 120, "20")  # a late batch from four minutes ago: in the baseline, not a spike now
    assert feed.commands == []
    assert feed.state.periods["2026-11-22"] == Decimal("0.05") * 300 + 20


def test_limits_per_key_open_the_rate_breaker() -> None:
    limits = {"requests_per_minute": 10, "tokens_per_minute": 5000}
    feed = Feed("key=k1", policy(velocity={"scopes": []}, keys=[{"key": "k1", "limits": limits}]))
    for t in range(10):
        feed.spend(NOV_22 + t, "0.001", requests=1, tokens=100)
    assert feed.commands == []
    feed.spend(NOV_22 + 11, "0.001", requests=1, tokens=100)
    assert feed.commands == [("rate|key=k1", "open")]
    assert feed.alerts == ["limit_exceeded|key=k1|2026-11-22T12:00:00Z|requests/min"]


def test_unallocated_share_alerts_once_a_day() -> None:
    feed = Feed("global", policy(attribution={"max_unallocated_share": 0.2}))
    feed.spend(NOV_22, "8")
    feed.spend(NOV_22 + 1, "4", unallocated="4")  # 33 % of 12 EUR; 12 > 10 min x 1 EUR/min
    feed.spend(NOV_22 + 2, "4", unallocated="4")
    assert feed.alerts == ["unallocated_share|global|2026-11-22"]


# --- policy errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sections", "expected"), [
    ({"budgets": [{"scope": {"squad": "x"}, "amount": 5}]}, "budgets[0].scope: unknown dimension 'squad'"),
    ({"budgets": [{"scope": {"team": "x"}, "amount": 0}]}, "budgets[0].amount: must be above 0"),
    ({"budgets": [{"scope": {"team": "x"}, "amount": 5}, {"scope": {"team": "x"}, "amount": 6}]},
     "budgets[1]: a monthly budget for team=x is already set at budgets[0]"),
    ({"keys": [{"key": "k", "budget": {"soft_limit": 9, "hard_limit": 5}}]}, "keys[0].budget.soft_limit"),
    ({"keys": [{"key": "k"}, {"key": "k"}]}, "keys[1].key: 'k' is listed twice"),
    ({"velocity": {"scopes": ["tem"]}}, "velocity.scopes[0]: unknown dimension 'tem'"),
    ({"velocity": {"window": "1m", "rate_window": "5m"}}, "velocity.rate_window: longer than velocity.window"),
])
def test_policy_mistakes_are_named(sections: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(sections)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_scope_keys_round_trip_with_awkward_values() -> None:
    scope = Scope.of({"team": "a,b=c|d%", "env": "prod"})
    assert scope.key == "env=prod,team=a%2Cb%3Dc%7Cd%25"
    assert Scope.parse(scope.key) == scope
    assert Scope.parse("global") == Scope() and Scope().key == "global"
    with pytest.raises(ValueError, match="expected 'global'"):
        Scope.parse("team")


def test_idle_scopes_are_forgotten_once_nothing_reads_them() -> None:
    pol = policy(budgets=[{"scope": {"team": "search"}, "amount": 100}], velocity={"scopes": ["team", "key"]})
    partition = PartitionState({})
    spend = [SpendMessage(key, [SpendEntry(0, 1, NOV_22, Decimal(1), 1, 10, Decimal(0))])
             for key in ("team=search", "team=ads", "key=k1")]
    apply_messages(partition, spend, pol, wall_s=NOV_22 + 3600)
    assert sweep_idle(partition, Context(pol, "EUR", NOV_22 + 60, 0.0)) == []  # still within the window
    assert sweep_idle(partition, Context(pol, "EUR", NOV_22 + 90, 0.0)) == []  # one sweep per minute
    forgotten = sweep_idle(partition, Context(pol, "EUR", NOV_22 + 3600, 0.0))
    assert sorted(forgotten) == ["key=k1", "team=ads"]
    assert list(partition.scopes) == ["team=search"]  # its budget still counts on the month's total


def test_no_stamp_moves_a_partition_clock_past_the_wall_clock() -> None:
    pol = policy(velocity={"scopes": ["team"]})
    partition = PartitionState({})
    year_2200_s = 7_258_118_400
    apply_messages(partition, [Tick(year_2200_s * 10**9),
                               SpendMessage("team=x", [SpendEntry(0, 1, year_2200_s, Decimal(1), 1, 10, Decimal(0))])],
                   pol, wall_s=NOV_22)
    assert partition.clock_s == NOV_22
    apply_messages(partition, [Tick((NOV_22 + 30) * 10**9)], pol, wall_s=NOV_22 + 60)
    assert partition.clock_s == NOV_22 + 30  # real time still moves it


# --- new scopes: a baseline of zero once the partition has been watching -----------------------------------

class PartitionFeed:
    """Spend for many scopes of one spend partition, through the stage's own pure steps, a second at a time."""

    def __init__(self, pol: Policy) -> None:
        self.partition = PartitionState({})
        self.policy = pol
        self.offset = 0
        self.commands: list[tuple[str, str]] = []
        self.alerts: list[str] = []
        self.dirty: set[str] = set()  # the scopes of the last second whose state goes to the changelog

    def second(self, at_s: int, spend: dict[str, tuple[str, int]], resets: tuple[str, ...] = ()) -> None:
        """`spend`: scope -> (cost, calls) in this second; a tick moves the clock even when there is none.
        `resets`: scopes an operator resets in this second, after its spend."""
        messages: list[SpendMessage | Tick | Reset] = [Tick(at_s * 10**9)]
        for scope, (cost, calls) in spend.items():
            self.offset += 1
            messages.append(SpendMessage(scope, [SpendEntry(0, self.offset, at_s - at_s % 5, Decimal(cost), calls,
                                                            100 * calls, Decimal(0))]))
        messages += [Reset(scope, "operator", at_s) for scope in resets]
        changed = apply_messages(self.partition, messages, self.policy, wall_s=at_s)
        out, self.dirty = decide_partition(self.partition, changed,
                                           Context(self.policy, "EUR", self.partition.clock_s, 0.0))
        self.commands += [(c.breaker_id, c.state) for c in out.commands]
        self.alerts += [a.alert_id for a in out.alerts]

    def restart(self) -> None:
        """Another worker takes the partition over from the changelog (what `_process` writes for each scope)."""
        self.partition = PartitionState({k: through_changelog(s) for k, s in self.partition.scopes.items()},
                                        self.partition.watching_since_s)


NEW_SCOPE_POLICY = {"velocity": {"scopes": ["team"], "min_spend_per_min": 1, "spike_ratio": 3}}


def test_a_new_team_that_loops_from_its_first_call_is_stopped_within_seconds() -> None:
    feed = PartitionFeed(policy(**NEW_SCOPE_POLICY))
    for t in range(NOV_22, NOV_22 + 120):
        feed.second(t, {"team=steady": ("0.03", 1)})  # the pipeline has been watching for two minutes
    for t in range(NOV_22 + 120, NOV_22 + 125):
        feed.second(t, {"team=steady": ("0.03", 1), "team=newcomer": ("10", 1)})  # 600 EUR/min from its first call
        if ("rate|team=newcomer", "open") in feed.commands:
            break
    assert feed.commands == [("rate|team=newcomer", "open")]
    assert t < NOV_22 + 123  # at the third call: velocity.min_requests


@pytest.mark.parametrize("shape", ["steady", "one large call", "doubling gradually"])
def test_the_usual_shapes_of_a_new_team_do_not_trip(shape: str) -> None:
    feed = PartitionFeed(policy(**NEW_SCOPE_POLICY))
    for t in range(NOV_22, NOV_22 + 120):
        feed.second(t, {"team=steady": ("0.03", 1)})
    start = NOV_22 + 120
    for i, t in enumerate(range(start, start + 900)):
        spend = {"team=steady": ("0.03", 1)}
        if shape == "steady" and i % 10 == 0:
            spend["team=new"] = ("0.1", 1)  # 0.6 EUR/min, under min_spend_per_min
        elif shape == "one large call" and i == 0:
            spend["team=new"] = ("50", 1)
        elif shape == "doubling gradually" and i % 10 == 0:
            spend["team=new"] = (str(Decimal("0.1") * (1 + Decimal(i) / 900)), 1)  # 0.6 -> 1.2 EUR/min
        feed.second(t, spend)
    assert feed.commands == []


def test_a_scope_that_spent_from_the_start_of_watching_keeps_the_usual_baseline() -> None:
    feed = PartitionFeed(policy(**NEW_SCOPE_POLICY))
    for t in range(NOV_22, NOV_22 + 300):
        feed.second(t, {"team=busy": ("0.1", 1)})  # 6 EUR/min for five minutes
    for t in range(NOV_22 + 300, NOV_22 + 310):
        feed.second(t, {"team=busy": ("0.2", 1)})  # twice its baseline: under spike_ratio
    assert feed.commands == []


# --- operators stay in charge: resets, a breaker per budget, limits with an action, durations in days -------

RESET_POLICY = {"budgets": [{"scope": {"team": "search"}, "amount": 100, "on_exhausted": {"prod": "block"}}],
                "velocity": {"scopes": ["team"], "min_spend_per_min": 1, "spike_ratio": 3},
                "breaker": {"cool_down": "20s", "probe": "10s"}}
DEC_1 = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
BUDGET = "budget|team=search|monthly"


def runaway_then_reset(feed: PartitionFeed) -> int:
    """Two minutes of steady spend, then team=search runs away: its rate breaker opens, then its budget is
    exhausted; an operator resets it. Returns the second of the reset."""
    for t in range(NOV_22, NOV_22 + 120):
        feed.second(t, {"team=search": ("0.03", 1)})
    t = NOV_22 + 120
    while (BUDGET, "open") not in feed.commands:
        feed.second(t, {"team=search": ("10", 1)})
        t += 1
    assert feed.commands == [("rate|team=search", "open"), (BUDGET, "open")]
    feed.second(t, {}, resets=("team=search",))
    return t


def test_a_reset_closes_the_state_and_the_budget_stays_closed_for_the_rest_of_its_period() -> None:
    feed = PartitionFeed(policy(**RESET_POLICY))
    reset_at = runaway_then_reset(feed)
    state = feed.partition.scopes["team=search"]
    assert feed.commands == [("rate|team=search", "open"), (BUDGET, "open")], "stage 2 publishes nothing"
    assert "team=search" in feed.dirty, "the reset state goes to the changelog"
    assert (state.rate.state, state.rate.since_s, state.rate.trigger) == ("closed", reset_at, {"kind": "reset"})
    assert state.budget_open == {}
    feed.restart()  # the reset is remembered across a takeover
    for t in range(reset_at + 1, reset_at + 600):
        feed.second(t, {"team=search": ("0.03", 1)})
    feed.second(reset_at + 600, {"team=search": ("500", 1)})  # far over the budget, same month
    assert [c for c in feed.commands if c[0] == BUDGET] == [(BUDGET, "open")]
    feed.second(DEC_1 + 5, {"team=search": ("150", 1)})
    assert [c for c in feed.commands if c[0] == BUDGET] == [(BUDGET, "open")] * 2  # a new period: it acts again
    assert "budget_threshold|team=search|2026-12|100%" in feed.alerts


def test_a_reset_before_the_budget_is_exhausted_keeps_it_closed_in_that_period_only() -> None:
    pol = policy(budgets=[{"scope": {"team": "search"}, "period": "daily", "amount": 50,
                           "on_exhausted": {"prod": "block", "non_prod": "block"}}], velocity={"scopes": []})
    feed = PartitionFeed(pol)
    feed.second(NOV_22, {"team=search": ("10", 1)}, resets=("team=search",))
    feed.restart()
    feed.second(NOV_22 + 60, {"team=search": ("60", 1)})
    assert feed.alerts[-1] == "budget_threshold|team=search|2026-11-22|100%"  # still alerted ...
    assert feed.commands == []  # ... but the breaker stays closed
    feed.second(NOV_22 + 86_400, {"team=search": ("60", 1)})  # the next day
    assert feed.commands == [("budget|team=search|daily", "open")]


def test_a_reset_rate_breaker_stays_closed_for_its_cool_down_even_while_spiking_then_trips_again() -> None:
    feed = PartitionFeed(policy(**{**RESET_POLICY, "budgets": []}))
    for t in range(NOV_22, NOV_22 + 120):
        feed.second(t, {"team=search": ("0.03", 1)})
    for t in range(NOV_22 + 120, NOV_22 + 125):
        feed.second(t, {"team=search": ("10", 1)})
    assert feed.commands == [("rate|team=search", "open")]
    reset_at = NOV_22 + 125
    feed.second(reset_at, {"team=search": ("10", 1)}, resets=("team=search",))
    for t in range(reset_at + 1, reset_at + 20):  # breaker.cool_down: 20s
        feed.second(t, {"team=search": ("10", 1)})  # still running away
    assert feed.commands == [("rate|team=search", "open")]
    assert feed.partition.scopes["team=search"].rate.state == "closed"
    feed.second(reset_at + 20, {"team=search": ("10", 1)})
    assert feed.commands == [("rate|team=search", "open"), ("rate|team=search", "open")]


def test_a_reset_scope_with_no_spend_is_remembered_while_the_reset_holds() -> None:
    pol = policy(**{**RESET_POLICY, "budgets": []})
    partition = PartitionState({})
    apply_messages(partition, [Tick(NOV_22 * 10**9), Reset("team=quiet", "x", NOV_22)], pol, wall_s=NOV_22)
    assert sweep_idle(partition, Context(pol, "EUR", NOV_22 + 10, 0.0)) == []  # held: cool_down 20s
    assert sweep_idle(partition, Context(pol, "EUR", NOV_22 + 80, 0.0)) == ["team=quiet"]


def test_two_budgets_on_one_scope_have_their_own_breakers() -> None:
    pol = policy(budgets=[{"scope": {"team": "search"}, "amount": 200, "on_exhausted": {"prod": "block"}},
                          {"scope": {"team": "search"}, "period": "daily", "amount": 50,
                           "on_exhausted": {"prod": "approved_only"}}], velocity={"scopes": []})
    feed = Feed("team=search", pol)
    feed.spend(NOV_22, "60")
    assert feed.commands == [("budget|team=search|daily", "open")]
    feed.spend(NOV_22 + 60, "150")
    assert feed.commands[-1] == ("budget|team=search|monthly", "open")
    assert feed.sent[0].env_actions["prod"] == "approved_only" and feed.sent[-1].env_actions["prod"] == "block"
    readings = read_scopes([feed.state], Context(pol, "EUR", NOV_22 + 60, 0.0))
    assert {b.breaker: b.action for b in readings.breakers} == {"budget|team=search|daily": "approved_only",
                                                                "budget|team=search|monthly": "block"}
    feed.tick(NOV_22 + 12 * 3600 + 5)  # the next day: only the daily breaker closes
    assert feed.commands[-1] == ("budget|team=search|daily", "closed")
    assert "daily budget" in feed.sent[-1].reason
    assert feed.state.budget_open == {"monthly": DEC_1}
    feed.tick(DEC_1 + 5)
    assert feed.commands[-1] == ("budget|team=search|monthly", "closed") and feed.state.budget_open == {}
    assert len(feed.commands) == 4


def limits_feed(action: str, **sections: object) -> Feed:
    limits = {"requests_per_minute": 10, "action": action}
    return Feed("key=k1", policy(velocity={"scopes": []}, keys=[{"key": "k1", "limits": limits}], **sections))


def test_alert_only_limits_alert_once_a_minute_and_open_nothing() -> None:
    feed = limits_feed("alert_only")
    for t in range(15):
        feed.spend(NOV_22 + t, "0.001")
    assert feed.alerts == ["limit_exceeded|key=k1|2026-11-22T12:00:00Z|requests/min"]
    assert feed.commands == [] and feed.state.rate.state == "closed"
    feed.spend(NOV_22 + 60, "0.001", requests=20)
    assert feed.alerts[-1] == "limit_exceeded|key=k1|2026-11-22T12:01:00Z|requests/min" and len(feed.alerts) == 2
    assert feed.commands == []


def test_limits_open_the_rate_breaker_with_their_own_action() -> None:
    feed = limits_feed("approved_only", breaker={"action": "block", "cool_down": "20s"})
    feed.spend(NOV_22, "0.001", requests=11)
    assert feed.commands == [("rate|key=k1", "open")] and feed.sent[0].action == "approved_only"
    feed.tick(NOV_22 + 90)  # the minute is over and so is the cool-down: it probes with the same action
    assert feed.commands[-1] == ("rate|key=k1", "half_open") and feed.sent[-1].action == "approved_only"


def test_a_downgrade_limit_carries_the_model_map_and_the_strictest_of_two_trips_acts() -> None:
    feed = limits_feed("downgrade", downgrade={"gpt-4o": "gpt-4o-mini"})
    feed.spend(NOV_22, "0.001", requests=11)
    assert (feed.sent[0].action, feed.sent[0].downgrade) == ("downgrade", {"gpt-4o": "gpt-4o-mini"})
    both = Feed("key=k1", policy(velocity={"scopes": []}, breaker={"action": "block"}, downgrade={"a": "b"},
                                 keys=[{"key": "k1", "limits": {"requests_per_minute": 10, "action": "downgrade"},
                                        "circuit_breaker": {"cost_velocity_per_min": 5}}]))
    both.spend(NOV_22, "100", requests=11)  # over its limit and its ceiling at once
    assert both.commands == [("rate|key=k1", "open")] and both.sent[0].action == "block"


def test_a_downgrade_limit_needs_a_model_map() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"keys": [{"key": "k", "limits": {"requests_per_minute": 1, "action": "downgrade"}}]})
    assert any("keys[0].limits.action: downgrade needs" in p for p in info.value.problems), info.value.problems


def test_durations_take_days() -> None:
    assert duration_s("7d") == 604_800
    assert policy(breaker={"expire_after": "2d"}).breaker.expire_after_s == 172_800
    with pytest.raises(ValueError, match=r"like 30s, 5m, 1h or 7d: '7w'"):
        duration_s("7w")
    with pytest.raises(ConfigError, match=r"breaker\.expire_after"):
        policy(breaker={"expire_after": "1 day"})


def test_state_written_before_budget_breakers_per_period_still_reads() -> None:
    old = {"scope": "team=search", "offsets": [[0, 7]], "buckets": [[NOV_22, "1.5", 2, 30]], "first_s": NOV_22,
           "periods": {"2026-11": "101"}, "unallocated": {}, "alerted": ["budget_threshold|team=search|2026-11|100%"],
           "rate": ["open", NOV_22, {"kind": "velocity_spike"}], "budget_open_until_s": DEC_1}
    state = ScopeState.from_value(decode_scope_state(orjson.dumps(old)))
    assert state.budget_open == {"monthly": DEC_1} and state.budget_reset == set()
    assert (state.rate.state, state.rate.action) == ("open", "")
    assert ScopeState.from_value(decode_scope_state(orjson.dumps({**old, "budget_open_until_s": None}))
                                 ).budget_open == {}
    assert through_changelog(state) == state


def test_a_new_team_is_stopped_as_soon_as_the_partition_has_watched_for_min_history() -> None:
    feed = PartitionFeed(policy(**NEW_SCOPE_POLICY))  # rate_window 1m: the baseline window is not filled yet
    for t in range(NOV_22, NOV_22 + 62):
        feed.second(t, {"team=steady": ("0.03", 1)})
    for t in range(NOV_22 + 62, NOV_22 + 66):
        feed.second(t, {"team=steady": ("0.03", 1), "team=newcomer": ("10", 1)})
    assert feed.commands == [("rate|team=newcomer", "open")]
