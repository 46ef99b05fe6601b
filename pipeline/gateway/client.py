"""BreakerClient: what an AI gateway embeds to obey spendstream's breaker commands.

    client = BreakerClient(KafkaConfig(bootstrap_servers="kafka:9092"))
    await client.start()            # reads the compacted topic to its end: the state in force now
    decision = client.decide({"team": "search", "env": "prod", "key": "k1"}, "gpt-4o")

`start` rebuilds the current state from the compacted `genai.breaker.commands`; after that a
background task follows new commands. `decide` never does I/O (BreakerBoard).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.gateway.board import BreakerBoard, Decision
from pipeline.kafka.consumer import read_to_end, reader
from pipeline.observability.metrics import MESSAGES_REJECTED
from pipeline.observability.rejections import PROCESSING_FAILED
from schemas.breaker import BreakerCommand, decode_command
from schemas.config import KafkaConfig
from schemas.errors import SchemaError
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
#: the `stage` label of the commands readers skip
READER_STAGE = "breaker_client"


OnCommand = Callable[[BreakerCommand], None]


async def read_commands(consumer: AIOKafkaConsumer, topic: str, on_command: OnCommand) -> None:
    """Every partition of the commands topic from the beginning to its current end: the state in force."""
    tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
    await read_to_end(consumer, tps, lambda record: _apply(on_command, record))


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        await consumer._client.force_metadata_update()  # aiokafka has no public call for it
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} not found (run `spendstream topics`)")


def _apply(on_command: OnCommand, record: ConsumerRecord[bytes, bytes]) -> None:
    """Hand one command on. One that does not decode or validate, or that `on_command` cannot take, is skipped,
    counted and logged, not dead-lettered: every gateway, `spendstream breaker list` and the breaker keeper read
    the compacted topic from its start, so each would dead-letter the same message again on every start."""
    if record.value is None:  # a tombstone: the compacted topic forgot the breaker
        return
    try:
        command = decode_command(record.value)
    except SchemaError as exc:
        MESSAGES_REJECTED.labels(READER_STAGE, "invalid_breaker_command").inc()
        log.warning("breaker client: skipped %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
        return
    try:
        on_command(command)
    except Exception:  # this command only: the board keeps the others, the follower goes on
        MESSAGES_REJECTED.labels(READER_STAGE, PROCESSING_FAILED).inc()
        log.exception("breaker client: %s[%d]@%d could not be applied", record.topic, record.partition, record.offset)


def _report_death(follow: asyncio.Task[None]) -> None:
    if not follow.cancelled() and follow.exception() is not None:
        log.error("breaker client: stopped following breaker commands; decisions go stale", exc_info=follow.exception())


class BreakerClient:
    def __init__(self, kafka: KafkaConfig, environ: Mapping[str, str] = os.environ, *,
                 also: OnCommand | None = None) -> None:
        """`also` sees every command the board takes (the breaker keeper keeps the resets the board drops)."""
        self._kafka = kafka
        self._also = also
        self._environ = environ
        self._topic = TopicNames(kafka.topic_prefix).breaker_commands
        self.board = BreakerBoard()
        self._consumer: AIOKafkaConsumer | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns once the state in force has been read; follows new commands afterwards."""
        consumer = reader(self._kafka, self._environ)
        await consumer.start()
        self._consumer = consumer
        await read_commands(consumer, self._topic, self._take)
        self._follow = asyncio.create_task(self._run(consumer))
        self._follow.add_done_callback(_report_death)

    def _take(self, command: BreakerCommand) -> None:
        self.board.apply(command)
        if self._also is not None:
            self._also(command)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    _apply(self._take, record)

    async def lost(self) -> None:
        """Returns once the follower stopped (died, or `stop`); at once before `start`."""
        if self._follow is not None:
            await asyncio.gather(asyncio.shield(self._follow), return_exceptions=True)

    def following(self) -> bool:
        """Still following new commands: False before `start` and once the follower died (its decisions go stale)."""
        return self._follow is not None and not self._follow.done()

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    def decide(self, attribution: Mapping[str, str], model: str) -> Decision:
        return self.board.decide(attribution, model, time.time())
