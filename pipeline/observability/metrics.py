"""Every metric the pipeline workers export, declared in one place (Prometheus, default registry).

Label values that come from traffic (attribution, models, scopes) are bounded by `metrics.*` in
the config (`cardinality.py`), so a flood of new keys cannot blow up the series count. The
collectors that fill them live with their stage (`pricing/counters.py`, `guardrails/gauges.py`).
"""

from __future__ import annotations

from typing import Final, get_args

from prometheus_client import Counter, Gauge, Histogram

from pipeline.observability.cardinality import METRIC_DIMENSIONS
from schemas.alert import AlertKind
from schemas.breaker import BreakerState

MESSAGES_REJECTED: Final = Counter(
    "spendstream_messages_rejected",
    "Consumed messages a stage could not decode, validate or process: dead-lettered and skipped (breaker-command "
    "readers skip them without a dead letter)", ["stage", "reason"])

USAGE_PRICED: Final = Counter("spendstream_worker_usage_priced", "Usage events priced into FOCUS rows")
USAGE_DUPLICATES: Final = Counter(
    "spendstream_worker_usage_duplicates", "Usage events skipped as already priced (client retries, redeliveries)")
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
EXPORTER_FILES: Final = Counter("spendstream_exporter_files", "Parquet files written")
EXPORTER_BUFFERED: Final = Gauge("spendstream_exporter_buffered_rows",
                                 "FOCUS rows the exporter holds in memory, those being written included "
                                 "(at most exporter.max_buffered_rows)")
EXPORTER_COMPACTED_FILES: Final = Counter("spendstream_exporter_compacted_files",
                                          "Request files merged away by compaction (files before - files after)")

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
AUTHZ_DECISIONS: Final = Counter("spendstream_authz_decisions", "Answers of `spendstream authz`, by protocol and "
                                 "answer (allow, downgrade, block, approval_required, unknown_key)",
                                 ["protocol", "decision"])
