"""BatchProducer: many keyed records to Kafka as one batch per partition, acknowledged before return.

A FOCUS row per message makes 2-4 messages per call; aiokafka's per-message `send()` caps near
26k/s, `create_batch()` + `send_batch()` per partition near 116k/s (DESIGN §5). The batches are encoded
whole (record_batch.py), cheaper again than aiokafka's builder, and handed over with `send_batch()`. Keys are placed
with aiokafka's default partitioner, so a record lands where a keyed `send()` would put it.
Every role that writes to Kafka (collector, stages, kill switch) uses this one producer.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.kafka.record_batch import CODECS, encode_record_batch, record_batches, with_producer_state
from schemas.codec import Record
from schemas.config import KafkaConfig

#: a record for an explicit partition; a None value is a tombstone (compacted topics)
PlacedRecord = tuple[int, tuple[bytes, bytes | None]]


def partition_for(key: bytes, partitions: int) -> int:
    """The partition a keyed send puts `key` on, of a topic with `partitions` partitions (aiokafka's default
    partitioner: murmur2, as Kafka's Java client), for readers that must find where a key went."""
    every = list(range(partitions))
    return int(_PARTITIONER(key, every, every))


_PARTITIONER: Final = DefaultPartitioner()
#: keys whose partition a producer remembers per topic: aiokafka's murmur2 is pure Python (~10 us a key, a
#: quarter of a worker's publish time), while a stage sends the few attribution keys of a batch over and over
_PLACED_MAX: Final = 100_000
#: a record batch's records at most, uncompressed (a longer record goes alone): the batch stays under the broker's
#: message size limit (Kafka's message.max.bytes, 1 MiB + 12 bytes by default) even should they not compress
_BATCH_BYTES: Final = 1_000_000


class BatchProducer:
    def __init__(self, connection: Mapping[str, Any], *, compression: str = KafkaConfig().compression,
                 request_timeout_s: float = 40.0) -> None:
        """`connection` holds aiokafka's connection options (`KafkaConfig.client_options()`)."""
        self._codec = CODECS[compression]
        self._options = dict(connection, acks="all", compression_type=None if compression == "none" else compression,
                             max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024, linger_ms=0,
                             request_timeout_ms=max(int(request_timeout_s * 1000), 1000), retry_backoff_ms=100)
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._placed: dict[str, dict[bytes, int]] = {}  # topic -> key -> its partition
        self._started: AIOKafkaProducer | None = None

    @classmethod
    def of(cls, kafka: KafkaConfig, environ: Mapping[str, str], *, request_timeout_s: float = 40.0) -> BatchProducer:
        """A producer with the deployment's connection settings and compression."""
        return cls(kafka.client_options(environ), compression=kafka.compression, request_timeout_s=request_timeout_s)

    @property
    def started(self) -> bool:
        return self._started is not None

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._started is None:
            raise RuntimeError("BatchProducer used before start()")
        return self._started

    async def start(self) -> None:
        """Connect. Raises aiokafka's KafkaError when the broker cannot be reached (nothing is left open)."""
        # aiokafka binds a producer to the running loop, so it is made here, not in __init__
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._started = producer

    async def stop(self) -> None:
        """Flush what is buffered and disconnect; safe twice or without start()."""
        producer, self._started = self._started, None
        if producer is not None:
            await producer.stop()

    async def partitions_of(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        return self._partitions[topic]

    async def send_all(self, topic: str, records: Sequence[Record]) -> None:
        """Return once the broker acknowledged every record (raises aiokafka's KafkaError otherwise)."""
        await acknowledged(await self.enqueue_all(topic, records))

    async def enqueue_all(self, topic: str, records: Sequence[Record]) -> list[Delivery]:
        """Hand the records to the producer, placed by key, and return their deliveries (see `acknowledged`):
        a caller making many records sends each part as it is made, and waits once."""
        if not records:
            return []
        partitions = await self.partitions_of(topic)
        placed = self._placed.setdefault(topic, {})
        by_partition: dict[int, list[Record]] = {}
        for record in records:
            partition = placed.get(record[0])
            if partition is None:
                if len(placed) >= _PLACED_MAX:
                    placed.clear()  # a flood of distinct keys must not grow memory
                partition = placed[record[0]] = self._partitioner(record[0], partitions, partitions)
            part = by_partition.get(partition)
            if part is None:
                part = by_partition[partition] = []
            part.append(record)
        return await self._enqueue(topic, by_partition)

    async def send_everywhere(self, topic: str, value: bytes) -> None:
        """The same value to every partition of `topic` (e.g. a clock tick), acknowledged."""
        await self.send_to(topic, [(p, (b"", value)) for p in await self.partitions_of(topic)])

    async def send_to(self, topic: str, records: Sequence[PlacedRecord]) -> None:
        """Records to the partitions given with them, acknowledged before return."""
        await acknowledged(await self.enqueue_to(topic, records))

    async def enqueue_to(self, topic: str, records: Sequence[PlacedRecord]) -> list[Delivery]:
        """Records to the partitions given with them, handed to the producer; returns their deliveries."""
        by_partition: defaultdict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        for partition, record in records:
            by_partition[partition].append(record)
        return await self._enqueue(topic, by_partition)

    async def _enqueue(self, topic: str, by_partition: Mapping[int, Sequence[tuple[bytes, bytes | None]]]
                       ) -> list[Delivery]:
        producer, stamp = self._producer, int(time.time() * 1000)
        futures = []
        for partition, items in by_partition.items():
            for batch in record_batches(items, _BATCH_BYTES):
                encoded = _Encoded(encode_record_batch(batch, self._codec, stamp), len(batch))
                futures.append(await producer.send_batch(encoded, topic, partition=partition))
        for future in futures:
            # one its caller gave up on (a deadline, a stop before it awaited them all): its outcome is no longer
            # anyone's business, not an exception asyncio logs as never retrieved
            future.add_done_callback(_consume_outcome)
        return futures


class _Encoded:
    """An encoded record batch (record_batch.py) in the shape aiokafka's producer takes a batch from
    `create_batch()`: `send_batch` queues it, its sender sends `_build()`'s bytes (again, should it retry)."""

    def __init__(self, data: bytes, records: int) -> None:
        self._data, self._records = data, records

    def _build(self) -> bytes:
        return self._data

    def record_count(self) -> int:
        return self._records

    def size(self) -> int:
        return len(self._data)

    def closed(self) -> bool:
        return True  # complete: nothing is appended to it, so the sender need not linger for more

    def close(self) -> None:
        pass

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        # called by an idempotent producer only (ours are not): the batch then carries its id and sequence
        self._data = with_producer_state(self._data, producer_id, producer_epoch, base_sequence)


#: a batch handed to the producer: done when the broker acknowledged it
Delivery = asyncio.Future[object]


async def acknowledged(deliveries: Sequence[Delivery]) -> None:
    """Return once the broker acknowledged every delivery (raises aiokafka's KafkaError otherwise)."""
    await asyncio.gather(*deliveries)


def _consume_outcome(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
