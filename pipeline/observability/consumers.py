"""Each consumer's metrics: batch sizes and `spendstream_consumer_lag` of its partitions."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.observability.metrics import BATCH_MESSAGES, CONSUMER_LAG

LAG_EVERY_S = 1.0


class ConsumerMetrics:
    """One consumer's metrics: the size of every batch fetched, and `spendstream_consumer_lag` of its assigned
    partitions (at most once a second; the series of partitions it no longer holds are dropped)."""

    def __init__(self, consumer: AIOKafkaConsumer, group: str, stage: str) -> None:
        self._consumer = consumer
        self._group = group
        self._batches = BATCH_MESSAGES.labels(stage)
        self._at = 0.0
        self._shown: set[tuple[str, str]] = set()

    async def after_fetch(self, batches: Mapping[TopicPartition, Sequence[object]]) -> None:
        if batches:
            self._batches.observe(sum(len(records) for records in batches.values()))
        await self._update_lag()

    async def _update_lag(self) -> None:
        if time.monotonic() - self._at < LAG_EVERY_S:
            return
        self._at = time.monotonic()
        shown = set()
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)  # known once a fetch from the partition was answered
            if end is None:
                continue
            labels = (tp.topic, str(tp.partition))
            CONSUMER_LAG.labels(self._group, *labels).set(max(end - await self._consumer.position(tp), 0))
            shown.add(labels)
        for labels in self._shown - shown:
            CONSUMER_LAG.remove(self._group, *labels)
        self._shown = shown
