"""Bounded metric labels and the per-scope gauges: what a flood of new keys does to the series count."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.guardrails.decide import Context, decide
from pipeline.guardrails.gauges import GuardrailGauges
from pipeline.guardrails.readings import Readings, merge_readings, read_scopes
from pipeline.guardrails.state import ScopeState
from pipeline.observability.cardinality import OTHER, LabelBudget, top_scopes
from pipeline.pricing.cost_records import CostOutput
from pipeline.pricing.counters import UsageCounters
from schemas.config import MetricsConfig, config_from_dict
from schemas.policy import Scope
from schemas.spend import SpendEntry

NOW = int(datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp())


def test_label_budget_admits_first_values_then_folds_into_other() -> None:
    budget = LabelBudget(("team", "provider"), ["team"], max_values=2, max_series=100)
    assert budget.fold(("a", "openai")) == ("a", "openai")
    assert budget.fold(("b", "openai")) == ("b", "openai")
    assert budget.fold(("c", "openai")) == (OTHER, "openai")
    assert budget.fold(("a", "anthropic")) == ("a", "anthropic"), "an admitted value stays admitted"
    assert budget.fold(("d", "anthropic")) == (OTHER, "anthropic")
    assert budget.series == 5
    assert budget.folded == 2


def test_label_budget_series_ceiling_folds_every_bounded_label() -> None:
    budget = LabelBudget(("team", "model", "meter"), ["team", "model"], max_values=1000, max_series=3)
    seen = {budget.fold((f"t{i}", f"m{i}", "input")) for i in range(100)}
    assert seen == {("t0", "m0", "input"), ("t1", "m1", "input"), ("t2", "m2", "input"), (OTHER, OTHER, "input")}
    assert budget.series <= 4, "the ceiling plus one all-`other` series per unbounded value"


def test_label_budget_rejects_a_label_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="key"):
        LabelBudget(("team",), ["key"], max_values=1, max_series=1)


def test_top_scopes_keeps_the_heaviest_and_returns_the_rest() -> None:
    top, rest = top_scopes([("a", 1), ("b", 5), ("c", 3), ("d", 2)], 2, float)
    assert top == [("b", 5), ("c", 3)]
    assert sorted(rest) == [1, 2]
    assert top_scopes([("a", 1)], 5, float) == ([("a", 1)], [])


def _series(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_usage_counters_stay_inside_the_series_budget_and_keep_the_sum_exact() -> None:
    counters = UsageCounters(MetricsConfig(max_label_values=10, max_series=50), "EUR")
    out = CostOutput()
    for i in range(5_000):  # 5,000 apps (a leaked id used as an app name)
        labels = ("search", "rag", "prod", f"app-{i}", "openai", "gpt-4o")
        out.requests[labels] += 1
        out.by_meter[(*labels, "input_tokens")].cost += Decimal("0.25")
        out.by_meter[(*labels, "input_tokens")].tokens += 100
    before = {name: sum(v for labels, v in samples if labels.get("team") == "search")
              for name, samples in _series(REGISTRY).items()}
    counters.count(out)
    after = _series(REGISTRY)
    app_values = {labels["app"] for labels, _ in after["spendstream_requests_total"] if labels.get("team") == "search"}
    assert len(app_values) <= 11 and OTHER in app_values
    requests = sum(v for labels, v in after["spendstream_requests_total"] if labels.get("team") == "search")
    cost = sum(v for labels, v in after["spendstream_cost_billed_total"] if labels.get("team") == "search")
    assert requests - before.get("spendstream_requests_total", 0) == 5_000
    assert cost - before.get("spendstream_cost_billed_total", 0) == pytest.approx(1_250)


def _state(scope: str, spend: list[tuple[int, str]], first_offset: int = 0) -> ScopeState:
    state = ScopeState(Scope.parse(scope))
    state.add([SpendEntry(0, first_offset + i, at, Decimal(cost), 1, 100, Decimal(0))
               for i, (at, cost) in enumerate(spend)], 0)
    return state


def test_readings_and_gauges_show_top_scopes_and_fold_the_rest() -> None:
    config = config_from_dict({"billing_currency": "EUR", "fx": {"USD": 0.92}, "budgets": [
        {"scope": {"team": "search"}, "period": "monthly", "amount": 100}]})
    ctx = Context(config.policy, "EUR", NOW, NOW)
    states = [_state(f"key=k{i}", [(NOW - 30, str(i + 1))]) for i in range(20)]
    search = _state("team=search", [(NOW - 3600, "40"), (NOW - 20, "20")])
    states.append(search)
    # a run of calls (a spike needs velocity.min_requests of them), the last one large
    spiking = _state("team=research", [(NOW - 300 + 5 * i, "1") for i in range(48)]
                     + [(NOW - 12, "0"), (NOW - 11, "0"), (NOW - 10, "500")])
    decide(spiking, ctx)  # opens its rate breaker
    states.append(spiking)
    readings = merge_readings([read_scopes(states[:10], ctx), read_scopes(states[10:], ctx)])
    assert [(b.scope, b.spent) for b in readings.budgets] == [("team=search", Decimal(60))]
    assert {b.breaker: b.state for b in readings.breakers} == {"rate|team=research": "open"}

    gauges = GuardrailGauges()
    gauges.readings, gauges.currency, gauges.max_scopes = readings, "EUR", 5
    registry = CollectorRegistry()
    registry.register(gauges)
    series = _series(registry)
    rates = {labels["scope"]: value for labels, value in series["spendstream_velocity_per_min"]}
    assert len(rates) == 6, "top 5 plus other"
    assert rates["team=research"] == max(rates.values())
    total = sum(float(v.per_min) for _, v in readings.velocity)
    assert sum(rates.values()) == pytest.approx(total), "folding keeps the total"
    assert series["spendstream_budget_used_ratio"] == [({"scope": "team=search", "period": "monthly"}, 0.6)]
    assert ({"breaker": "rate|team=research", "scope": "team=research", "source": "rate", "action": "block"},
            2.0) in series["spendstream_breaker_state"]
    thresholds = {labels["scope"]: v for labels, v in series["spendstream_velocity_threshold_per_min"]}
    assert thresholds["team=research"] < rates["team=research"], "it tripped: over its threshold"


def test_empty_readings_expose_no_scope_series() -> None:
    gauges = GuardrailGauges()
    gauges.readings = Readings()
    registry = CollectorRegistry()
    registry.register(gauges)
    series = _series(registry)
    assert "spendstream_velocity_per_min" not in series
    assert {labels["state"]: v for labels, v in series["spendstream_breakers"]} == {
        "closed": 0, "half_open": 0, "open": 0}
