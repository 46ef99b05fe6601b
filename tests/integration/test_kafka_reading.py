"""Reading a compacted topic to its end on the real broker: a changelog restore must see every record.

The embedded broker answers ListOffsets with the last batch's base offset + 1, so a state written
as one batch of several records (the guardrail stage writes a batch's states together) was read
short by all but the first record of that batch: a scope restored one batch behind its committed
spend, and money lost in a failover (tests/integration/test_guardrails_failover.py under load).
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import read_to_end, reader
from pipeline.kafka.producer import BatchProducer
from schemas.config import KafkaConfig
from tests.conftest import new_topics

pytestmark = pytest.mark.integration


async def write_then_read(bootstrap: str, topic: str) -> list[int]:
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    producer = BatchProducer.of(kafka, {})
    await producer.start()
    try:
        for size in (1, 3, 5):  # each send_to is one produce request: one batch per partition
            await producer.send_to(topic, [(0, (b"k%d" % i, b"v")) for i in range(size)])
    finally:
        await producer.stop()
    await asyncio.sleep(0.5)  # long after the acknowledgement: this is not a read-after-write race
    consumer = reader(kafka)
    await consumer.start()
    offsets: list[int] = []

    def keep(record: ConsumerRecord[bytes, bytes]) -> None:
        offsets.append(record.offset)

    try:
        await read_to_end(consumer, [TopicPartition(topic, 0)], keep)
    finally:
        await consumer.stop()
    return offsets


def test_read_to_end_sees_every_record_of_the_last_batch(broker: EmbeddedBroker) -> None:
    topics = new_topics(broker.bootstrap_servers, partitions=1)
    assert asyncio.run(write_then_read(broker.bootstrap_servers, topics.guardrail_state)) == list(range(9))
