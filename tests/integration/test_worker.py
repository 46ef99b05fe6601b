"""A real worker process on the real broker: prices every usage event once, dead-letters garbage."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from collector.ingest import NestedCallFilter, ingest_request
from pipeline.kafka.broker import EmbeddedBroker
from schemas.config import Config
from schemas.topics import TopicNames
from schemas.usage import encode_usage_batch
from tests.dialects import DIALECTS
from tests.support import free_port, make_request, make_span, metric, read_deadletters, usage_counted

pytestmark = pytest.mark.integration


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


def test_worker_counts_events_and_dead_letters_invalid_messages(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path,
) -> None:
    events = ingest_request(make_request([make_span(d.attrs) for d in DIALECTS]), Config(), None,
                            NestedCallFilter()).events
    good = [(e.attribution_key.encode(), encode_usage_batch([e])) for e in events]
    garbage = [(b"team=x", b"\x00 not json"), (b"team=y", orjson.dumps({"schema_version": 1, "events": [{}]}))]
    asyncio.run(produce(broker.bootstrap_servers, topics.usage, good[:5] + garbage + good[5:]))

    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n  partitions: 2\n")
    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--kafka", broker.bootstrap_servers, "--config", str(config),
         "--metrics-port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        counted = invalid = 0.0
        while time.monotonic() < deadline and (counted < len(events) or invalid < len(garbage)):
            time.sleep(0.5)
            try:
                counted = usage_counted(port)
                invalid = metric(port, 'spendstream_messages_rejected_total{reason="invalid_usage_message",'
                                       'stage="pricing"}')
            except OSError:
                continue
        assert counted == len(events)
        assert invalid == len(garbage)
        letters = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=2)
        assert sorted(letter["reason"] for letter in letters) == ["invalid_usage_message"] * 2
        assert all(letter["fields"]["topic"] == topics.usage for letter in letters)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
