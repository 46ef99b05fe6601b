"""Each process imports only what it runs: the collector loads no pricing, guardrails, exporter or worker metrics."""

from __future__ import annotations

import subprocess
import sys

from tests.support import free_port

WORKER_ONLY = ("pipeline.pricing", "pipeline.guardrails", "pipeline.export", "pipeline.gateway",
               "pipeline.observability.metrics", "genai_prices", "duckdb", "pyarrow", "faust")


def imported_modules(*args: str) -> set[str]:
    """Every module `spendstream ARGS` imported before it exited (python -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_the_collector_process_imports_no_worker_code() -> None:
    # no broker listens there: the collector imports everything it runs, fails to connect and exits
    modules = imported_modules("collector", "--kafka", f"127.0.0.1:{free_port()}", "--grpc-port", "0",
                               "--http-port", "0", "--metrics-port", str(free_port()))
    assert "collector.app" in modules and "pipeline.kafka.producer" in modules
    loaded = sorted(m for m in modules if m.startswith(WORKER_ONLY))
    assert not loaded, f"the collector imported worker code: {loaded}"


def test_price_imports_no_kafka_client() -> None:
    modules = imported_modules("price", "gpt-4o", "--input", "10", "--output", "1")
    assert "pipeline.pricing.explain" in modules
    assert not [m for m in modules if m.startswith(("aiokafka", "pipeline.kafka", "grpc"))]
