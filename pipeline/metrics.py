"""Every metric the pipeline workers export, declared in one place (Prometheus, default registry)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, start_http_server

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
COST_BILLED: Final = Counter(
    "spendstream_cost_billed", "Billed cost in the billing currency", ["currency", "team", "provider", "model",
                                                                         "meter"])
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
SPEND_REPLAYED: Final = Counter("spendstream_guardrails_entries_replayed",
                                "Spend entries skipped as already added (redelivery after a crash or rebalance)")
SCOPES: Final = Gauge("spendstream_guardrails_scopes", "Scopes whose state this worker holds")
STATE_RESTORED: Final = Counter("spendstream_guardrails_scopes_restored",
                                "Scope states read back from the changelog on taking over a partition")


def serve_metrics(port: int) -> None:
    """Expose the default registry on :port. Raises OSError naming the flag when the port is taken."""
    try:
        start_http_server(port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on :{port}: {exc.strerror} "
                      "(change it with --metrics-port)") from exc
