"""Kill the worker and the exporter mid-stream (SIGKILL) and restart them: no FOCUS row is missing
from the files, and none is there twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.kafka.broker import EmbeddedBroker
from schemas.topics import TopicNames
from schemas.usage import TokenCounts, UsageEvent, decode_usage_batch, encode_usage_batch
from tests.integration.roles import produce_slowly, role
from tests.support import free_port, metric

pytestmark = pytest.mark.integration
EVENTS = 3_000
PER_MESSAGE = 5
TEAMS = ("search", "support", "research", "ads")


def usage_messages() -> list[tuple[bytes, bytes]]:
    start = int(time.time()) * 10**9
    messages = []
    for m in range(EVENTS // PER_MESSAGE):
        team = TEAMS[m % len(TEAMS)]
        key = f"team={team}|use_case=u|env=prod|app=a|key="
        events = [
            UsageEvent(id=f"{m:08x}-{i:04x}", trace_id=f"{m:08x}", span_id=f"{i:04x}", parent_span_id=None,
                       start_time_unix_nano=start + m * 10**6, end_time_unix_nano=start + m * 10**6 + 10**9,
                       operation="chat", provider="openai", request_model="gpt-4o", response_model=None,
                       tokens=TokenCounts(input_uncached=100 + m, cache_read=(m % 3) * 64, output=20 + i),
                       attribution={"team": team}, attribution_key=key)
            for i in range(PER_MESSAGE)]
        messages.append((key.encode(), encode_usage_batch(events)))
    return messages


def expected_rows(messages: list[tuple[bytes, bytes]]) -> int:
    return sum(2 + (e.tokens.cache_read > 0) for _, v in messages for e in decode_usage_batch(v))


def rows_in_files(data: Path) -> tuple[int, int]:
    files = list((data / "focus" / "request").rglob("part-*.parquet"))
    if not files:
        return 0, 0
    with duckdb.connect() as con:
        result = con.execute("SELECT count(*), count(DISTINCT x_RowId) FROM read_parquet(?)",
                             [[str(f) for f in files]]).fetchone()
    assert result is not None
    return int(result[0]), int(result[1])


def test_killed_worker_and_exporter_lose_and_duplicate_nothing(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path,
) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n  partitions: 2\n"
                      "exporter:\n  flush_seconds: 0.5\n")
    messages = usage_messages()
    want = expected_rows(messages)
    worker_port, exporter_port = free_port(), free_port()
    worker = role("worker", broker, config, tmp_path, worker_port)
    exporter = role("exporter", broker, config, tmp_path, exporter_port)
    feeder = threading.Thread(target=produce_slowly, args=(broker.bootstrap_servers, topics.usage, messages, 8.0))
    try:
        feeder.start()
        killed_worker = killed_exporter = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                published = metric(worker_port, "spendstream_worker_focus_rows_total")
                written = metric(exporter_port, "spendstream_exporter_rows_total")
            except OSError:
                continue
            if not killed_worker and published > want / 4:
                worker.kill()
                worker.wait()
                worker = role("worker", broker, config, tmp_path, worker_port)
                killed_worker = True
            elif killed_worker and not killed_exporter and written > want / 2:
                exporter.kill()
                exporter.wait()
                exporter = role("exporter", broker, config, tmp_path, exporter_port)
                killed_exporter = True
            elif killed_exporter and rows_in_files(tmp_path / "data")[1] >= want:
                break
        assert killed_worker and killed_exporter, "the stream ended before both kills"
        time.sleep(2)  # anything redelivered late would show up now
        total, distinct = rows_in_files(tmp_path / "data")
        assert distinct == want, f"{want - distinct} rows missing"
        assert total == distinct, f"{total - distinct} rows duplicated"
    finally:
        feeder.join(timeout=30)
        for process in (worker, exporter):
            process.terminate()
            process.wait(timeout=30)
