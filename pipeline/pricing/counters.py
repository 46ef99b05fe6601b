"""Stage 1's traffic counters: cost, tokens and requests of each priced batch, within the label budgets."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from pipeline.observability.cardinality import LabelBudget
from pipeline.observability.metrics import (
    BOUNDED_LABELS,
    COST_BILLED,
    LABELS_FOLDED,
    REQUESTS,
    TOKENS,
    USAGE_LABELS,
)
from pipeline.pricing.cost_records import CostOutput
from schemas.config import MetricsConfig


class UsageCounters:
    """Counts one priced batch into the cost, token and request counters, within the label budgets."""

    def __init__(self, limits: MetricsConfig, currency: str) -> None:
        self._currency = currency
        self._calls, self._meters = (
            LabelBudget(labels, BOUNDED_LABELS, max_values=limits.max_label_values, max_series=limits.max_series)
            for labels in (USAGE_LABELS, (*USAGE_LABELS, "meter")))
        for metric in ("spendstream_requests", "spendstream_cost_billed"):
            LABELS_FOLDED.labels(metric)  # exported at 0 from the start, so "none folded" is a value, not a gap
        #: (metric, label values) -> its child: prometheus_client's labels() costs ~3 us a call, a few times a
        #: batch per series; the label budgets bound how many there are
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}

    def count(self, out: CostOutput) -> None:
        before = {"spendstream_requests": self._calls.folded, "spendstream_cost_billed": self._meters.folded}
        for labels, requests in out.requests.items():
            self._child(REQUESTS, self._calls.fold(labels)).inc(requests)
        for labels, total in out.by_meter.items():
            series = self._meters.fold(labels)
            self._child(COST_BILLED, (self._currency, *series)).inc(float(total.cost))
            self._child(TOKENS, series).inc(total.tokens)
        for metric, budget in (("spendstream_requests", self._calls), ("spendstream_cost_billed", self._meters)):
            if budget.folded > before[metric]:
                LABELS_FOLDED.labels(metric).inc(budget.folded - before[metric])

    def _child(self, metric: Counter, labels: tuple[str, ...]) -> Any:
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child
