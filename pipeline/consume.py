"""The one commit rule of spendstream's hand-built consumer stages (pricing, guardrails)."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, RebalanceInProgressError


async def commit_processed(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], stage: str,
                           log: logging.Logger) -> None:
    """Commit exactly the offsets processed. If the partitions moved meanwhile, their new owner processes
    the batch again; each stage's outputs are idempotent (row ids, offset guards), so that is safe."""
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, RebalanceInProgressError) as exc:
        log.info("%s: commit skipped, partitions were reassigned (%s)", stage, exc)
