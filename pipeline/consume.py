"""What spendstream's hand-built consumers share: the commit rule of the stages (pricing, guardrails),
reading a compacted topic to its end, and their metrics (lag, batch sizes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, RebalanceInProgressError

from pipeline.metrics import BATCH_MESSAGES, CONSUMER_LAG

LAG_EVERY_S = 1.0


async def commit_processed(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], stage: str,
                           log: logging.Logger) -> None:
    """Commit exactly the offsets processed. If the partitions moved meanwhile, their new owner processes
    the batch again; each stage's outputs are idempotent (row ids, offset guards), so that is safe."""
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, RebalanceInProgressError) as exc:
        log.info("%s: commit skipped, partitions were reassigned (%s)", stage, exc)


async def read_to_end(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                      on_record: Callable[[ConsumerRecord[bytes, bytes]], None]) -> None:
    """Assign `tps` to `consumer` and hand every record from the beginning to the current end to `on_record`
    (rebuilding state from a compacted topic: a changelog, the breaker commands)."""
    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(list(tps))
    todo = {tp for tp in tps if ends[tp] > 0}
    while todo:
        for records in (await consumer.getmany(*todo, timeout_ms=500)).values():
            for record in records:
                on_record(record)
        todo = {tp for tp in todo if await consumer.position(tp) < ends[tp]}


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
