"""Every consumer spendstream makes, from one factory, and the two loops they share: the commit rule of
the stages (pricing, guardrails, exporter) and reading a compacted topic to its end."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, RebalanceInProgressError

from schemas.config import KafkaConfig

#: a dead worker's partitions move after about this long (not the 45 s default). 6 s is Apache Kafka's
#: group.min.session.timeout.ms default: the lowest a broker accepts without its own settings changed.
SESSION_TIMEOUT_MS: Final = 6_000
HEARTBEAT_INTERVAL_MS: Final = 1_000
#: how long a rebalance waits for members to rejoin; a stage that restores state on assignment needs more
REBALANCE_TIMEOUT_MS: Final = 6_000


def group_consumer(kafka: KafkaConfig, group: str, *topics: str, max_poll_records: int,
                   rebalance_timeout_ms: int = REBALANCE_TIMEOUT_MS) -> AIOKafkaConsumer:
    """A member of the deployment's consumer group `group` (prefixed like the topics) that commits by hand,
    starts from the earliest offset when the group has none, and gives up a dead member's partitions fast.
    With no `topics`, the caller subscribes (e.g. with a rebalance listener)."""
    return AIOKafkaConsumer(
        *topics, **kafka.client_options(os.environ), group_id=f"{kafka.topic_prefix}{group}",
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=max_poll_records,
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        rebalance_timeout_ms=rebalance_timeout_ms)


def reader(kafka: KafkaConfig, environ: Mapping[str, str] = os.environ) -> AIOKafkaConsumer:
    """A consumer in no group, for reading assigned partitions (changelogs, the breaker commands)."""
    return AIOKafkaConsumer(**kafka.client_options(environ), enable_auto_commit=False)


async def commit_processed(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], stage: str,
                           log: logging.Logger) -> None:
    """Commit exactly the offsets processed, of the partitions still assigned. If partitions moved meanwhile,
    their new owner processes the batch again; each stage's outputs are idempotent (row ids, offset guards), so
    that is safe. A commit the group refuses because of a rebalance (the generation moved on, a partition just
    revoked or no assignment yet: IllegalStateError) is logged and skipped, never raised."""
    assigned = consumer.assignment()
    owned = {tp: offset for tp, offset in offsets.items() if tp in assigned}
    if not owned:
        return
    try:
        await consumer.commit(owned)
    except (CommitFailedError, RebalanceInProgressError, IllegalStateError) as exc:
        log.info("%s: commit skipped, partitions were reassigned (%s)", stage, exc)


OnRecord = Callable[[ConsumerRecord[bytes, bytes]], None]


async def read_to_end(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], on_record: OnRecord) -> None:
    """Assign `tps` to `consumer` and hand every record from the beginning to the current end to `on_record`
    (rebuilding state from a compacted topic: a changelog, the breaker commands).

    The end is the high watermark of the fetch answers, not only ListOffsets: the embedded broker (Tansu)
    answers ListOffsets with the last batch's base offset + 1, so a state written as a batch of several
    records would lose all but its first (a restored scope one batch behind its committed spend)."""
    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(list(tps))
    await _read_until(consumer, ends, on_record, follow_highwater=True)


async def read_range(consumer: AIOKafkaConsumer, ranges: Mapping[TopicPartition, tuple[int, int]],
                     on_record: OnRecord) -> None:
    """Hand every record of each partition from its start offset up to (not including) its end offset to
    `on_record`, in offset order per partition."""
    consumer.assign(list(ranges))
    for tp, (start, _) in ranges.items():
        consumer.seek(tp, start)
    await _read_until(consumer, {tp: end for tp, (start, end) in ranges.items() if end > start}, on_record)


async def _read_until(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int], on_record: OnRecord, *,
                      follow_highwater: bool = False) -> None:
    until = dict(ends)
    todo = {tp for tp, end in until.items() if end > 0}
    while todo:
        for tp, records in (await consumer.getmany(*todo, timeout_ms=500)).items():
            for record in records:
                if record.offset < until[tp] or follow_highwater:
                    on_record(record)
        if follow_highwater:
            until.update((tp, max(until[tp], consumer.highwater(tp) or 0)) for tp in todo)
        todo = {tp for tp in todo if await consumer.position(tp) < until[tp]}


async def unread(kafka: KafkaConfig, group: str, topic: str) -> int:
    """How many records of `topic` the consumer group `group` (unprefixed) has not committed yet. The end of
    each partition is taken from a fetch answer's high watermark (ListOffsets alone falls short on the
    embedded broker, see read_to_end)."""
    probe = AIOKafkaConsumer(**kafka.client_options(os.environ), group_id=f"{kafka.topic_prefix}{group}",
                             enable_auto_commit=False)
    await probe.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or ())]
        if not tps:
            await probe.topics()
            tps = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or ())]
        probe.assign(tps)
        ends = await probe.end_offsets(tps)
        for tp in tps:
            probe.seek(tp, max(ends[tp] - 1, 0))
        await probe.getmany(*tps, timeout_ms=200)
        left = 0
        for tp in tps:
            end = max(ends[tp], probe.highwater(tp) or 0)
            left += max(end - (await probe.committed(tp) or 0), 0)
        return left
    finally:
        await probe.stop()
