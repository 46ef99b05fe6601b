"""What spendstream's hand-built consumers share: the commit rule of the stages (pricing, guardrails)
and reading a compacted topic to its end."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, RebalanceInProgressError


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
