"""Reading a compacted topic to its end on the real broker: a changelog restore must see every record.

The embedded broker answers ListOffsets with the last batch's base offset + 1, so a state written
as one batch of several records (the guardrail stage writes a batch's states together) was read
short by all but the first record of that batch: a scope restored one batch behind its committed
spend, and money lost in a failover (tests/integration/test_guardrails_failover.py under load).
"""

from __future__ import annotations

import asyncio
import typing

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import read_to_end, reader
from pipeline.kafka.producer import BatchProducer, partition_for
from schemas.config import KafkaConfig
from tests.conftest import new_topics

pytestmark = pytest.mark.integration


async def write_then_read(bootstrap: str, topic: str, compression: str = KafkaConfig().compression) -> list[int]:
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    producer = BatchProducer(kafka.client_options({}), compression=compression)
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


# every codec the config accepts: the embedded broker stores the producer's batches as they are (a zstd batch
# is fetched as zstd), so the consumer must decode each of them (cramjam, a core dependency)
@pytest.mark.parametrize("compression", typing.get_args(typing.get_type_hints(KafkaConfig)["compression"]))
def test_read_to_end_sees_every_record_of_the_last_batch(broker: EmbeddedBroker, compression: str) -> None:
    topics = new_topics(broker.bootstrap_servers, partitions=1)
    assert asyncio.run(write_then_read(broker.bootstrap_servers, topics.guardrail_state, compression)) \
        == list(range(9))


async def placed_partitions(bootstrap: str, topics: dict[str, int], keys: list[bytes]
                            ) -> dict[str, set[tuple[bytes, int]]]:
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    producer = BatchProducer.of(kafka, {})
    await producer.start()
    try:
        for _ in range(2):  # the second time, from the producer's memory of where each key goes
            for topic in topics:
                await producer.send_all(topic, [(key, b"v") for key in keys])
    finally:
        await producer.stop()
    consumer = reader(kafka)
    await consumer.start()
    placed: dict[str, set[tuple[bytes, int]]] = {topic: set() for topic in topics}

    def keep(record: ConsumerRecord[bytes, bytes]) -> None:
        placed[record.topic].add((record.key or b"", record.partition))

    try:
        await read_to_end(consumer, [TopicPartition(t, p) for t, n in topics.items() for p in range(n)], keep)
    finally:
        await consumer.stop()
    return placed


def test_keyed_records_land_where_a_keyed_send_puts_them_in_topics_of_any_size(broker: EmbeddedBroker) -> None:
    keys = [f"team=t{i}|use_case=u{i % 3}".encode() for i in range(40)]
    topics = {new_topics(broker.bootstrap_servers, partitions=n).usage: n for n in (3, 8)}
    placed = asyncio.run(placed_partitions(broker.bootstrap_servers, topics, keys))
    for topic, partitions in topics.items():
        assert placed[topic] == {(key, partition_for(key, partitions)) for key in keys}
