"""Publish usage and dead letters to Kafka; an OTLP call is answered only after the broker acknowledged.

One Kafka message per attribution key per request (a UsageBatch), so a 512-span request
from one service is a handful of messages, not 512.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from aiokafka.errors import KafkaError

from pipeline.kafka.producer import BatchProducer
from schemas.codec import Record
from schemas.config import KafkaConfig
from schemas.errors import TransientError

log = logging.getLogger(__name__)


class BrokerUnavailable(TransientError):
    """The broker did not acknowledge in time; the client should retry the whole request."""


class Publisher(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, topic: str, records: Sequence[Record]) -> None:
        """Return once every record is acknowledged. Raises BrokerUnavailable."""


class KafkaPublisher:
    """The shared BatchProducer (`acks=all`, compression) with a deadline on every publish, and Kafka's
    errors translated into BrokerUnavailable: the one error an OTLP client should retry."""

    def __init__(self, kafka: KafkaConfig, environ: Mapping[str, str], *, timeout_s: float) -> None:
        self._bootstrap = kafka.bootstrap_servers
        self._timeout_s = timeout_s
        self._producer = BatchProducer.of(kafka, environ, request_timeout_s=timeout_s)

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot reach Kafka at {self._bootstrap}: {exc}") from exc
        log.info("publisher connected to %s", self._bootstrap)

    async def stop(self) -> None:
        await self._producer.stop()  # flushes what is still buffered

    async def publish(self, topic: str, records: Sequence[Record]) -> None:
        if not self._producer.started:
            raise BrokerUnavailable("publisher is not started")
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._producer.send_all(topic, records)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout_s:g}s") from exc
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka refused the batch: {exc}") from exc
