"""Every metric the collector exports, declared in one place (Prometheus, default registry)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

SPANS_RECEIVED: Final = Counter(
    "spendstream_collector_spans_received", "Spans received over OTLP", ["transport"]
)
SPANS_OUTCOME: Final = Counter(
    "spendstream_collector_spans", "Spans by outcome: accepted, not_usage, nested_duplicate, "
    "unallocated, spoofed, sampled, malformed_tracestate, rejected:<reason>", ["outcome"]
)
REQUESTS: Final = Counter(
    "spendstream_collector_requests", "OTLP export requests by transport and answer", ["transport", "code"]
)
EVENTS_PUBLISHED: Final = Counter(
    "spendstream_collector_usage_events_published", "Usage events acknowledged by Kafka"
)
DEADLETTERS_PUBLISHED: Final = Counter(
    "spendstream_collector_deadletters_published", "Rejected spans kept in the dead-letter topic", ["reason"]
)
PUBLISH_SECONDS: Final = Histogram(
    "spendstream_collector_publish_seconds", "Time from publish to broker acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
INTERNAL_ERRORS: Final = Counter(
    "spendstream_collector_internal_errors", "OTLP requests answered INTERNAL / 500 by error type", ["error"]
)
FORWARD_SPANS_SENT: Final = Counter(
    "spendstream_collector_forward_spans_sent", "Spans the downstream OTLP endpoint accepted (processor mode)"
)
FORWARD_SPANS_PRICED: Final = Counter(
    "spendstream_collector_forward_spans_priced", "Forwarded model-call spans that carry gen_ai.usage.cost.amount"
)
FORWARD_SPANS_DROPPED: Final = Counter(
    "spendstream_collector_forward_spans_dropped", "Spans not forwarded, by reason: queue_full, "
    "retries_exhausted, refused (a permanent error or a partial success), failed (a bug, logged), shutdown", ["reason"]
)
FORWARD_RETRIES: Final = Counter(
    "spendstream_collector_forward_retries", "Export attempts to the downstream endpoint that failed and are retried"
)
FORWARD_QUEUE_SPANS: Final = Gauge(
    "spendstream_collector_forward_queue_spans", "Spans waiting to be forwarded (limit: collector.forward.queue_spans)"
)
INFLIGHT_BYTES: Final = Gauge(
    "spendstream_collector_inflight_bytes",
    "Request bytes the collector holds now (limit: collector.max_inflight_bytes)",
)
