"""Publish usage and dead letters to Kafka; an OTLP call is answered only after the broker acknowledged.

One Kafka message per attribution key per request (a UsageBatch), so a 512-span request
from one service is a handful of messages, not 512.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.errors import TransientError

log = logging.getLogger(__name__)

Record = tuple[bytes, bytes]  # key, value


class BrokerUnavailable(TransientError):
    """The broker did not acknowledge in time; the client should retry the whole request."""


class Publisher(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, topic: str, records: Sequence[Record]) -> None:
        """Return once every record is acknowledged. Raises BrokerUnavailable."""


class KafkaPublisher:
    """aiokafka producer with `acks=all`, compression and a deadline on every publish."""

    def __init__(self, connection: Mapping[str, Any], *, timeout_s: float, compression: str = "lz4") -> None:
        """`connection` holds aiokafka's connection options (`KafkaConfig.client_options()`)."""
        self._connection = dict(connection)
        self._bootstrap = str(connection["bootstrap_servers"])
        self._timeout_s = timeout_s
        self._compression = compression
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            **self._connection,
            acks="all",
            compression_type=None if self._compression == "none" else self._compression,
            linger_ms=2,
            max_batch_size=1024 * 1024,
            max_request_size=8 * 1024 * 1024,
            request_timeout_ms=max(int(self._timeout_s * 1000), 1000),
            retry_backoff_ms=100,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BrokerUnavailable(f"cannot reach Kafka at {self._bootstrap}: {exc}") from exc
        self._producer = producer
        log.info("publisher connected to %s", self._bootstrap)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is still buffered

    async def publish(self, topic: str, records: Sequence[Record]) -> None:
        if not records:
            return
        if self._producer is None:
            raise BrokerUnavailable("publisher is not started")
        producer = self._producer
        try:
            async with asyncio.timeout(self._timeout_s):
                futures = [await producer.send(topic, value=value, key=key) for key, value in records]
                await asyncio.gather(*futures)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout_s:g}s") from exc
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka refused the batch: {exc}") from exc
