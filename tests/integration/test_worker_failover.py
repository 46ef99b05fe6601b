"""Two real workers in one consumer group; one is killed mid-stream. The survivor takes over its partitions
and prices every usage event: each one's FOCUS rows are on `genai.cost.focus`, none missing (DESIGN §5).
A batch the victim had not committed is priced again, with the same row ids, which the exporter keeps once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from collector.ingest import NestedCallFilter, ingest_request
from pipeline.kafka.broker import EmbeddedBroker
from schemas.config import Config
from schemas.usage import encode_usage_batch
from tests.conftest import new_topics
from tests.dialects import DIALECTS
from tests.integration.roles import role
from tests.integration.test_worker import produce
from tests.support import free_port, make_request, make_span, read_topic, usage_counted

pytestmark = [pytest.mark.integration, pytest.mark.failover]
KEYS = 24
MESSAGES = 1200


def usage_messages() -> tuple[list[tuple[bytes, bytes]], set[str]]:
    """MESSAGES usage batches of one event each, spread over KEYS attribution keys, and their usage ids."""
    records, ids = [], set()
    for i in range(MESSAGES):
        request = make_request(
            [make_span(DIALECTS[0].attrs)],
            {"service.name": f"svc-{i % KEYS}", "team.name": "t", "feature.name": "u",
             "deployment.environment.name": "prod"})
        [event] = ingest_request(request, Config(), None, NestedCallFilter()).events
        records.append((event.attribution_key.encode(), encode_usage_batch([event])))
        ids.add(event.id)
    return records, ids


@pytest.fixture
def workers(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], int]]]:
    started: list[tuple[subprocess.Popen[bytes], int]] = []
    yield started
    for process, _ in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def rows_by_usage(bootstrap: str, topic: str) -> dict[str, set[str]]:
    """usage id -> the distinct row ids of its FOCUS rows on the topic."""
    out: dict[str, set[str]] = defaultdict(set)
    for record in read_topic(bootstrap, topic):
        row = orjson.loads(record.value)
        out[row["x_UsageId"]].add(row["x_RowId"])
    return out


def test_killed_worker_loses_nothing(broker: EmbeddedBroker, tmp_path: Path,
                                     workers: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    topics = new_topics(broker.bootstrap_servers, partitions=4)
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n  partitions: 4\n")
    messages, ids = usage_messages()
    for i in range(2):
        port = free_port()
        workers.append((role("worker", broker, config, tmp_path, port, instance=str(i)), port))
    (survivor, survivor_port), (victim, _) = workers
    asyncio.run(produce(broker.bootstrap_servers, topics.usage, messages[: MESSAGES // 2]))
    wait_for(lambda: len(rows_by_usage(broker.bootstrap_servers, topics.cost_focus)) >= MESSAGES // 2, 60)

    asyncio.run(asyncio.wait_for(_produce_and_kill(broker.bootstrap_servers, topics.usage,
                                                   messages[MESSAGES // 2:], victim), timeout=60))
    killed_at = time.monotonic()
    wait_for(lambda: set(rows_by_usage(broker.bootstrap_servers, topics.cost_focus)) >= ids, 90)
    recovered_s = time.monotonic() - killed_at
    assert survivor.poll() is None, "the survivor died"
    rows = rows_by_usage(broker.bootstrap_servers, topics.cost_focus)
    assert set(rows) == ids  # every call priced, nothing that was not sent
    meters = {len(row_ids) for row_ids in rows.values()}
    assert meters == {len(next(iter(rows.values())))} and meters != {0}  # every call has all its meters' rows
    print(f"failover: all {MESSAGES} events priced {recovered_s:.1f}s after the kill; the survivor handled "
          f"{usage_counted(survivor_port):.0f} (redeliveries included)")


async def _produce_and_kill(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]],
                            victim: subprocess.Popen[bytes]) -> None:
    half = len(records) // 2
    await produce(bootstrap, topic, records[:half])
    await asyncio.sleep(0.3)  # the victim is busy with them
    os.kill(victim.pid, signal.SIGKILL)
    await produce(bootstrap, topic, records[half:])


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not reached within {timeout_s}s")
