"""Serve a process's own metrics: each role exposes only the metrics it declares (its imports decide)."""

from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(port: int) -> None:
    """Expose the default registry on :port. Raises OSError naming the flag when the port is taken."""
    try:
        start_http_server(port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on :{port}: {exc.strerror} "
                      "(change it with --metrics-port)") from exc
