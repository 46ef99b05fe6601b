"""The supervisor's pure rules and a role's log rotation (the crash tests run `spendstream run`:
tests/e2e/test_supervision.py)."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest

from pipeline.cli.runtime import (
    _WORKER_FLOW,
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    STABLE_AFTER_S,
    Child,
    _flow_status,
    _scrape,
    exit_reason,
    next_backoff,
)
from pipeline.cli.startup import LOG_FILES_KEPT, configure_logging
from tests.support import free_port


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    waits, backoff = [], FIRST_BACKOFF_S / 2
    for _ in range(8):
        backoff = next_backoff(backoff, ran_for_s=2.0)
        waits.append(backoff)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert next_backoff(MAX_BACKOFF_S, ran_for_s=STABLE_AFTER_S) == FIRST_BACKOFF_S


def test_exit_reasons_name_the_signal() -> None:
    assert exit_reason(-signal.SIGKILL) == "was killed by SIGKILL"
    assert exit_reason(1) == "exited with code 1"
    assert exit_reason(-200) == "was killed by signal 200"


def test_a_role_that_dies_is_started_again_after_its_backoff(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    role = Child("price", ["price", "--no-such-flag"], tmp_path)  # argparse exits with code 2 at once
    role.start()
    assert role.process is not None
    role.process.wait(timeout=30)
    role.supervise(time.monotonic())
    assert role.process is None and role.restart_at_s is not None
    assert "spendstream: price exited with code 2; starting it again in 1 s" in capsys.readouterr().err
    role.supervise(role.restart_at_s)
    assert role.process is not None and role.restarts == 1
    role.process.wait(timeout=30)


def test_role_logs_rotate(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "worker-1.log"
    configure_logging("info", str(log_file), max_bytes=10_000)
    try:
        for _ in range(100):
            logging.getLogger("flood").info("x" * 1000)
    finally:
        logging.basicConfig(force=True)
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["worker-1.log", *[f"worker-1.log.{i}" for i in range(1, LOG_FILES_KEPT + 1)]]
    assert sum(p.stat().st_size for p in log_file.parent.iterdir()) <= 10_000 * (LOG_FILES_KEPT + 1) + 2_000


def test_the_flow_line_asks_each_role_only_for_the_samples_it_shows() -> None:
    from prometheus_client import REGISTRY  # noqa: PLC0415

    from collector import metrics as collector_metrics  # noqa: PLC0415
    from pipeline.observability import metrics  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    base = free_port(3)  # collector, one worker, exporter: consecutive ports
    for i in range(3):
        serve_metrics(base + i)  # this process's registry, on each role's port
    collector_metrics.SPANS_RECEIVED.labels("grpc").inc(5)
    metrics.USAGE_PRICED.inc(4)
    metrics.EXPORTER_ROWS.inc(9)
    metrics.TOKENS.labels("team-a", "rag", "prod", "app", "openai", "gpt-4o", "input_tokens").inc(100)
    line = _flow_status(base, workers=1)

    def total(name: str) -> float:  # other tests in this process count too
        return sum(s.value for family in REGISTRY.collect() for s in family.samples if s.name == name)

    assert f"{total('spendstream_collector_spans_received_total'):,.0f} spans received" in line
    assert f"{total('spendstream_worker_usage_priced_total'):,.0f} priced" in line
    assert f"{total('spendstream_exporter_rows_total'):,.0f} FOCUS rows in files" in line
    # the worker renders the four counters the line shows, not its labelled series (tokens, cost, lag...)
    assert set(_scrape(base + 1, _WORKER_FLOW)) <= set(_WORKER_FLOW)
