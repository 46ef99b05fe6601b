"""Every metric the pipeline workers export, declared in one place (Prometheus, default registry)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, start_http_server

USAGE_EVENTS_COUNTED: Final = Counter(
    "spendstream_worker_usage_events", "Usage events counted once (replays excluded)"
)
USAGE_MESSAGES_REPLAYED: Final = Counter(
    "spendstream_worker_usage_messages_replayed", "genai.usage messages skipped as already counted"
)
USAGE_MESSAGES_INVALID: Final = Counter(
    "spendstream_worker_usage_messages_invalid", "genai.usage messages that do not match the schema"
)


def serve_metrics(port: int) -> None:
    """Expose the default registry on :port. Raises OSError naming the flag when the port is taken."""
    try:
        start_http_server(port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on :{port}: {exc.strerror} "
                      "(change it with --metrics-port)") from exc
