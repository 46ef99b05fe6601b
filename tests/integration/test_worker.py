"""A real worker process on the real broker: prices every usage event once, dead-letters garbage."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from collector.ingest import NestedCallFilter, ingest_request
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import unread
from pipeline.kafka.producer import BatchProducer, Delivery
from pipeline.pricing import PriceCatalog
from pipeline.pricing.focus import Billing
from pipeline.pricing.stage import PRICING_GROUP, PricingStage
from schemas.codec import Record
from schemas.config import Config, KafkaConfig
from schemas.spend import SpendMessage, decode_spend
from schemas.topics import TopicNames
from schemas.usage import encode_usage_batch
from tests.dialects import DIALECTS
from tests.support import free_port, make_request, make_span, metric, read_deadletters, read_topic, usage_counted

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


def spend_coordinates(bootstrap: str, topic: str) -> set[tuple[int, int]]:
    """The (usage partition, offset) of every spend entry on the topic (ticks left out)."""
    messages = [decode_spend(r.value) for r in read_topic(bootstrap, topic)]
    return {(e.partition, e.offset) for m in messages if isinstance(m, SpendMessage) for e in m.entries}


def test_spend_goes_out_while_rows_wait_and_the_offsets_wait_for_the_rows(
    broker: EmbeddedBroker, topics: TopicNames, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # breakers must not wait for FOCUS rows (~3/4 of the stage's CPU): the rows of the first batch are held back,
    # and the spend of both batches still goes out; nothing is committed until the rows are acknowledged
    released = threading.Event()
    enqueue = BatchProducer.enqueue_all

    async def held(self: BatchProducer, topic: str, records: Sequence[Record]) -> list[Delivery]:
        while topic == topics.cost_focus and not released.is_set():
            await asyncio.sleep(0.05)
        return await enqueue(self, topic, records)

    monkeypatch.setattr(BatchProducer, "enqueue_all", held)
    bootstrap = broker.bootstrap_servers
    config = Config(kafka=KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=topics.prefix, partitions=2))
    [first, second] = [encode_usage_batch(ingest_request(make_request([make_span(DIALECTS[0].attrs)]), config, None,
                                                         NestedCallFilter()).events) for _ in range(2)]
    stage = PricingStage(config, PriceCatalog(), Billing(), PolicyFile(None, config.policy))
    loop = asyncio.new_event_loop()
    running = loop.create_task(stage.run())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(running)
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    try:
        asyncio.run(produce_to(bootstrap, topics.usage, 0, first))
        thread.start()
        wait_for(lambda: spend_coordinates(bootstrap, topics.spend) == {(0, 0)}, timeout_s=60)
        asyncio.run(produce_to(bootstrap, topics.usage, 0, second))
        wait_for(lambda: spend_coordinates(bootstrap, topics.spend) == {(0, 0), (0, 1)}, timeout_s=60)
        assert read_topic(bootstrap, topics.cost_focus) == []
        assert asyncio.run(unread(config.kafka, PRICING_GROUP, topics.usage)) == 2
        released.set()
        wait_for(lambda: asyncio.run(unread(config.kafka, PRICING_GROUP, topics.usage)) == 0, timeout_s=60)
        assert len(read_topic(bootstrap, topics.cost_focus)) >= 2
    finally:
        released.set()
        loop.call_soon_threadsafe(running.cancel)
        thread.join(timeout=30)


async def produce_to(bootstrap: str, topic: str, partition: int, value: bytes) -> None:
    producer = BatchProducer.of(KafkaConfig(bootstrap_servers=bootstrap), {})
    await producer.start()
    try:
        await producer.send_to(topic, [(partition, (b"team=a", value))])
    finally:
        await producer.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
