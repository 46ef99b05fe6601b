"""The exporter compacts closed charge dates: the same rows in fewer files, still valid FOCUS, and still known to
the row ledger (rows delivered again after compaction are dropped, by a restarted exporter too)."""

from __future__ import annotations

import subprocess
import time
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from pipeline.kafka.broker import EmbeddedBroker
from schemas.topics import TopicNames
from tests.focus_validator import validate, validator
from tests.integration.focus_traffic import chunks, focus_messages, produce
from tests.integration.roles import role
from tests.support import free_port, metric

pytestmark = pytest.mark.integration
CALLS = 4_000  # 12,000 rows
DAY_S = 86_400


def day_stats(data: Path) -> dict[str, tuple[int, int, Decimal, int]]:
    """Per charge date: (rows, distinct x_RowId, sum of BilledCost, files)."""
    stats = {}
    for directory in sorted((data / "focus" / "request").glob("billing_period=*/charge_date=*")):
        files = [str(f) for f in directory.glob("part-*.parquet")]
        with duckdb.connect() as con:
            result = con.execute("SELECT count(*), count(DISTINCT x_RowId), sum(BilledCost) FROM read_parquet(?)",
                                 [files]).fetchone()
        assert result is not None
        stats[directory.name] = (int(result[0]), int(result[1]), Decimal(result[2]), len(files))
    return stats


def wait_metric(port: int, name: str, at_least: float, process: subprocess.Popen[bytes], log: Path) -> float:
    deadline = time.monotonic() + 120
    value = 0.0
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            value = metric(port, name)
        except OSError:
            value = 0.0
        if value >= at_least:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name} = {value} < {at_least}: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    assert process.wait(timeout=60) == 0


def test_compaction_keeps_the_rows_valid_and_known_to_the_ledger(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path,
) -> None:
    today = int(time.time()) // DAY_S * DAY_S
    messages = focus_messages(CALLS, start_s=today - 3 * DAY_S, spread_s=2 * DAY_S)  # two closed charge dates
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\nexporter:\n  flush_seconds: 0.2\n"
                      "  compact_every_s: 0\n")
    port = free_port()
    log = tmp_path / "exporter.log"
    exporter = role("exporter", broker, config, tmp_path, port)
    try:
        sent = 0
        for part in chunks(messages, len(messages) // 24):  # a flush each: many small files
            produce(broker.bootstrap_servers, topics.cost_focus, part)
            sent += len(part)
            wait_metric(port, "spendstream_exporter_rows_total", sent, exporter, log)
    finally:
        stop(exporter)
    before = day_stats(tmp_path / "data")
    assert len(before) == 2 and all(files >= 12 for *_, files in before.values()), before

    config.write_text(config.read_text().replace("compact_every_s: 0", "compact_every_s: 1"))
    exporter = role("exporter", broker, config, tmp_path, port)
    try:
        merged = sum(files for *_, files in before.values()) - len(before)
        wait_metric(port, "spendstream_exporter_compacted_files_total", merged, exporter, log)
        after = day_stats(tmp_path / "data")
        assert {day: stats[:3] for day, stats in after.items()} == {day: stats[:3] for day, stats in before.items()}
        assert all(files == 1 for *_, files in after.values()), after
        assert sum(rows for rows, *_ in after.values()) == len(messages)

        produce(broker.bootstrap_servers, topics.cost_focus, messages)  # every row again, at new offsets
        wait_metric(port, "spendstream_exporter_duplicate_rows_total", len(messages), exporter, log)
        assert metric(port, "spendstream_exporter_rows_total") == 0
        assert day_stats(tmp_path / "data") == after
    finally:
        stop(exporter)

    exe = validator()
    compacted = sorted((tmp_path / "data" / "focus" / "request").rglob("part-*.parquet"))[0]
    result = validate(exe, compacted, tmp_path, "1.4")
    print(result.summary)
    assert "| Fail: 0 |" in result.summary and not result.failed_rules, result.output[-4000:]
    assert result.passed >= 370
