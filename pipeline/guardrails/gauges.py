"""Stage 2's per-scope gauges (budgets, velocity, breakers), built at scrape time within the label budgets."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Final

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.guardrails.readings import BREAKER_STATE_VALUE, Readings
from pipeline.observability.cardinality import OTHER, top_scopes
from schemas.config import MetricsConfig


class GuardrailGauges(Collector):
    """Stage 2's per-scope gauges, built at scrape time from the last Readings: the top `max_scopes`
    scopes by value get a series each, the rest are summed into `scope="other"`."""

    def __init__(self) -> None:
        self.readings = Readings()
        self.currency = ""
        self.max_scopes = MetricsConfig().max_scopes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self.readings  # one snapshot per scrape: the stage swaps in a new one every few seconds
        yield from self._budgets(readings)
        yield from self._velocity(readings)
        yield from self._breakers(readings)
        if readings.unallocated_share is not None:
            yield GaugeMetricFamily("spendstream_unallocated_share", "Today's share of spend that lacks a required "
                                    "attribution dimension", value=float(readings.unallocated_share))

    def _budgets(self, readings: Readings) -> Iterator[GaugeMetricFamily]:
        n, currency = self.max_scopes, self.currency
        spent = GaugeMetricFamily("spendstream_budget_spent", "Spend in the budget's current period",
                                  labels=["scope", "period", "currency"])
        amount = GaugeMetricFamily("spendstream_budget_amount", "The budget", labels=["scope", "period", "currency"])
        used = GaugeMetricFamily("spendstream_budget_used_ratio", "Share of the budget spent in its current period "
                                 "(alerts at the configured thresholds, 50/80/100 % by default)",
                                 labels=["scope", "period"])
        top, rest = top_scopes(((b.scope, b) for b in readings.budgets), n, lambda b: b.used_ratio)
        for scope, budget in top:
            spent.add_metric([scope, budget.period, currency], float(budget.spent))
            amount.add_metric([scope, budget.period, currency], float(budget.amount))
            used.add_metric([scope, budget.period], float(budget.used_ratio))
        if rest:
            spent.add_metric([OTHER, "all", currency], float(sum((b.spent for b in rest), Decimal(0))))
            amount.add_metric([OTHER, "all", currency], float(sum((b.amount for b in rest), Decimal(0))))
        yield from (spent, amount, used)

    def _velocity(self, readings: Readings) -> Iterator[GaugeMetricFamily]:
        n, currency = self.max_scopes, self.currency
        rate = GaugeMetricFamily("spendstream_velocity_per_min", f"Spend per minute over the rate window "
                                 f"({currency}/min)", labels=["scope"])
        limit = GaugeMetricFamily("spendstream_velocity_threshold_per_min", "The rate that trips the scope's "
                                  "breaker: the lower of its ceiling and spike_ratio x its baseline", labels=["scope"])
        top_rates, other_rates = top_scopes(readings.velocity, n, lambda v: v.per_min)
        for scope, reading in top_rates:
            rate.add_metric([scope], float(reading.per_min))
            if reading.threshold is not None:
                limit.add_metric([scope], float(reading.threshold))
        if other_rates:
            rate.add_metric([OTHER], float(sum((v.per_min for v in other_rates), Decimal(0))))
        yield from (rate, limit)

    def _breakers(self, readings: Readings) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily("spendstream_breaker_state", "Breaker state: 0 closed, 1 half_open, 2 open",
                                  labels=["breaker", "scope", "source", "action"])
        count = GaugeMetricFamily("spendstream_breakers", "Breakers by state", labels=["state"])
        top_breakers, _ = top_scopes(((b.breaker, b) for b in readings.breakers), self.max_scopes,
                                     lambda b: BREAKER_STATE_VALUE[b.state])
        for breaker, shown in top_breakers:
            state.add_metric([breaker, shown.scope, shown.source, shown.action], BREAKER_STATE_VALUE[shown.state])
        for name in BREAKER_STATE_VALUE:
            count.add_metric([name], sum(1 for b in readings.breakers if b.state == name))
        yield from (state, count)


GUARDRAIL_GAUGES: Final = GuardrailGauges()
REGISTRY.register(GUARDRAIL_GAUGES)
