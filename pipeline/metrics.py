"""Every metric the pipeline workers export, declared in one place (Prometheus, default registry).

Label values that come from traffic (attribution, models, scopes) are bounded by `metrics.*` in
the config (pipeline/cardinality.py), so a flood of new keys cannot blow up the series count.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Final, get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.cardinality import OTHER, LabelBudget, top_scopes
from pipeline.cost_records import METRIC_DIMENSIONS, CostOutput
from pipeline.guardrails.readings import BREAKER_STATE_VALUE, Readings
from schemas.alert import AlertKind
from schemas.breaker import BreakerState
from schemas.config import MetricsConfig

USAGE_EVENTS_COUNTED: Final = Counter(
    "spendstream_worker_usage_events", "Usage events counted once (replays excluded)"
)
USAGE_MESSAGES_REPLAYED: Final = Counter(
    "spendstream_worker_usage_messages_replayed", "genai.usage messages skipped as already counted"
)
USAGE_MESSAGES_INVALID: Final = Counter(
    "spendstream_worker_usage_messages_invalid", "genai.usage messages that do not match the schema"
)

USAGE_PRICED: Final = Counter("spendstream_worker_usage_priced", "Usage events priced into FOCUS rows")
USAGE_UNPRICED: Final = Counter(
    "spendstream_worker_usage_unpriced", "Usage events that could not be priced (dead-lettered); alert on any",
    ["reason"])
FOCUS_ROWS: Final = Counter("spendstream_worker_focus_rows", "FOCUS rows published to genai.cost.focus")
USAGE_LABELS: Final = (*METRIC_DIMENSIONS, "provider", "model")
#: the labels whose values come from traffic; each keeps at most `metrics.max_label_values` values
BOUNDED_LABELS: Final = (*METRIC_DIMENSIONS, "model")
COST_BILLED: Final = Counter("spendstream_cost_billed", "Billed cost (FOCUS BilledCost) in the billing currency",
                             ["currency", *USAGE_LABELS, "meter"])
TOKENS: Final = Counter("spendstream_tokens", "Tokens priced, by meter", [*USAGE_LABELS, "meter"])
REQUESTS: Final = Counter("spendstream_requests", "Model calls priced", USAGE_LABELS)
LABELS_FOLDED: Final = Counter("spendstream_metric_labels_folded",
                               "Label tuples counted under `other` because a label or series budget was full",
                               ["metric"])
BATCH_MESSAGES: Final = Histogram("spendstream_batch_messages", "Messages per consumed batch", ["stage"],
                                  buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
PUBLISH_SECONDS: Final = Histogram(
    "spendstream_publish_seconds", "Time from publishing a batch's output to the broker's acknowledgement",
    ["stage"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
CONSUMER_LAG: Final = Gauge("spendstream_consumer_lag", "Messages behind the partition's end, per consumer group",
                            ["group", "topic", "partition"])
CATALOG_INFO: Final = Gauge("spendstream_price_catalog_info", "The price catalog in use (value 1)", ["version"])
EXPORTER_ROWS: Final = Counter("spendstream_exporter_rows", "FOCUS rows written to Parquet files")
EXPORTER_DUPLICATES: Final = Counter("spendstream_exporter_duplicate_rows",
                                     "FOCUS rows dropped as already written (same x_RowId)")
EXPORTER_INVALID: Final = Counter("spendstream_exporter_invalid_messages",
                                  "genai.cost.focus messages that are not FOCUS rows (skipped, logged)")
EXPORTER_FILES: Final = Counter("spendstream_exporter_files", "Parquet files written")

SPEND_MESSAGES: Final = Counter("spendstream_worker_spend_messages", "Partial-spend messages sent to genai.spend")
POLICY_RELOADS: Final = Counter("spendstream_policy_reloads", "Policy reloads by outcome", ["outcome"])
ALERTS: Final = Counter("spendstream_alerts", "Alerts published to genai.alerts", ["kind"])
BREAKER_COMMANDS: Final = Counter("spendstream_breaker_commands", "Breaker commands published", ["state"])
# known label values start at 0, so a dashboard shows "none yet" rather than "no data"
for _kind in get_args(AlertKind):
    ALERTS.labels(_kind)
for _state in get_args(BreakerState):
    BREAKER_COMMANDS.labels(_state)
SPEND_REPLAYED: Final = Counter("spendstream_guardrails_entries_replayed",
                                "Spend entries skipped as already added (redelivery after a crash or rebalance)")
SCOPES: Final = Gauge("spendstream_guardrails_scopes", "Scopes whose state this worker holds")
STATE_RESTORED: Final = Counter("spendstream_guardrails_scopes_restored",
                                "Scope states read back from the changelog on taking over a partition")


class UsageCounters:
    """Counts one priced batch into the cost, token and request counters, within the label budgets."""

    def __init__(self, limits: MetricsConfig, currency: str) -> None:
        self._currency = currency
        self._calls, self._meters = (
            LabelBudget(labels, BOUNDED_LABELS, max_values=limits.max_label_values, max_series=limits.max_series)
            for labels in (USAGE_LABELS, (*USAGE_LABELS, "meter")))
        for metric in ("spendstream_requests", "spendstream_cost_billed"):
            LABELS_FOLDED.labels(metric)  # exported at 0 from the start, so "none folded" is a value, not a gap

    def count(self, out: CostOutput) -> None:
        before = {"spendstream_requests": self._calls.folded, "spendstream_cost_billed": self._meters.folded}
        for labels, requests in out.requests.items():
            REQUESTS.labels(*self._calls.fold(labels)).inc(requests)
        for labels, total in out.by_meter.items():
            series = self._meters.fold(labels)
            COST_BILLED.labels(self._currency, *series).inc(float(total.cost))
            TOKENS.labels(*series).inc(total.tokens)
        for metric, budget in (("spendstream_requests", self._calls), ("spendstream_cost_billed", self._meters)):
            if budget.folded > before[metric]:
                LABELS_FOLDED.labels(metric).inc(budget.folded - before[metric])


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


def serve_metrics(port: int) -> None:
    """Expose the default registry on :port. Raises OSError naming the flag when the port is taken."""
    try:
        start_http_server(port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on :{port}: {exc.strerror} "
                      "(change it with --metrics-port)") from exc
