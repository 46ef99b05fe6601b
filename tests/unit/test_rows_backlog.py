"""The pricing stage's rows backlog: a batch fetched before its partitions were revoked is neither published nor
committed by the worker that fetched it (aiokafka's rebalances revoke every partition and start each one assigned
again from its committed offset, so whoever fetches it next prices it again); a message whose calls' rows fail in
two chunks is dead-lettered once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from decimal import Decimal

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import REGISTRY

from pipeline.guardrails.policy_file import PolicyFile
from pipeline.kafka.producer import Delivery
from pipeline.pricing import PriceCatalog, PricedUsage, cost_records
from pipeline.pricing.dedupe import SeenUsage
from pipeline.pricing.focus import Billing, focus_values
from pipeline.pricing.stage import ROWS_CHUNK_CALLS, PricingStage, RowsBacklog
from schemas.codec import Record
from schemas.config import Config
from schemas.usage import encode_usage_batch
from tests.unit.test_poison_messages import usage_event


class _Consumer:
    """Just enough of AIOKafkaConsumer for commit_processed: the group's assignment, the commits asked for."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(offsets)


class _Producer:
    """Just enough of BatchProducer: what was sent, by topic, acknowledged at once."""

    def __init__(self) -> None:
        self.sent: dict[str, list[Record]] = {}

    async def send_all(self, topic: str, records: Sequence[Record]) -> None:
        self.sent.setdefault(topic, []).extend(records)

    async def enqueue_all(self, topic: str, records: Sequence[Record]) -> list[Delivery]:
        await self.send_all(topic, records)
        return []


def _fetched(stage: PricingStage, offset: int, *ns: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """One usage message at `offset` with the calls `usage_event(n)` of `ns`."""
    value = encode_usage_batch([usage_event(n) for n in ns])
    tp = TopicPartition(stage._names.usage, 0)
    return {tp: [ConsumerRecord(tp.topic, 0, offset, 0, 0, b"team=search", value, None, 0, len(value), ())]}


async def _drained(backlog: RowsBacklog) -> None:
    deadline = time.monotonic() + 30
    while backlog._batches or backlog._calls:
        assert time.monotonic() < deadline, "the backlog was not drained"
        await asyncio.sleep(0.01)


def _stage() -> PricingStage:
    config = Config()
    stage = PricingStage(config, PriceCatalog(), Billing(), PolicyFile(None, config.policy))
    stage._seen[0] = SeenUsage(config.worker.dedupe_horizon_s)
    return stage


async def _published(stage: PricingStage, consumer: _Consumer, rows: _Producer, backlog: RowsBacklog) -> None:
    publishing = asyncio.create_task(stage._publish_rows(consumer, rows, backlog))  # type: ignore[arg-type]
    try:
        await _drained(backlog)
    finally:
        publishing.cancel()


async def _rebalance_with_a_batch_in_the_backlog() -> tuple[_Consumer, _Producer]:
    stage = _stage()
    config = stage._config
    tp = TopicPartition(stage._names.usage, 0)
    consumer, producer, rows = _Consumer({tp}), _Producer(), _Producer()
    backlog = RowsBacklog(1000)
    await backlog.put(await stage._price(_fetched(stage, 10, 1), producer, stage._revocations))  # type: ignore[arg-type]
    # a rebalance before its rows are made: another worker owns the partition a while, prices up to offset 20 and
    # commits 20; the partition comes back, and this worker fetches it from there, restoring its ids as
    # _restore_seen does
    await stage.on_partitions_revoked([tp])
    await stage.on_partitions_assigned([tp])
    stage._seen[0] = SeenUsage(config.worker.dedupe_horizon_s)
    await backlog.put(await stage._price(_fetched(stage, 20, 2), producer, stage._revocations))  # type: ignore[arg-type]
    await _published(stage, consumer, rows, backlog)
    return consumer, rows


def test_a_batch_fetched_before_a_rebalance_is_left_to_the_next_fetch_of_its_partition() -> None:
    # published and committed, the old batch moved the group's offset back (20 -> 11: what the other owner
    # committed is read again after the next crash) and made rows its partition's owner made too
    consumer, rows = asyncio.run(_rebalance_with_a_batch_in_the_backlog())
    tp = TopicPartition(Config().kafka.topic_prefix + "genai.usage", 0)
    assert consumer.committed == [{tp: 21}]  # only by the batch fetched after the rebalance
    values = [value for _, value in rows.sent["genai.cost.focus"]]
    assert values and {orjson.loads(value)["x_UsageId"] for value in values} == {usage_event(2).id}
    assert len(values) == len({orjson.loads(value)["x_RowId"] for value in values})  # each row once


def test_a_message_whose_rows_fail_in_two_chunks_is_dead_lettered_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # rows are made ROWS_CHUNK_CALLS calls at a time: a message's calls can straddle two chunks
    bad = {usage_event(n).id for n in (ROWS_CHUNK_CALLS, ROWS_CHUNK_CALLS + 1)}  # the last of one, the first of next
    values = focus_values

    def breaks(priced: PricedUsage, billing: Billing, costs: Sequence[Decimal]) -> list[bytes]:
        if priced.event.id in bad:
            raise ZeroDivisionError("a row the mapping cannot make")
        return values(priced, billing, costs)

    monkeypatch.setattr(cost_records, "focus_values", breaks)

    async def publish() -> _Producer:
        stage = _stage()
        rows, backlog = _Producer(), RowsBacklog(1000)
        fetched = _fetched(stage, 10, *range(1, 2 * ROWS_CHUNK_CALLS + 1))
        await backlog.put(await stage._price(fetched, _Producer(), stage._revocations))  # type: ignore[arg-type]
        await _published(stage, _Consumer(set(fetched)), rows, backlog)
        return rows

    rows = asyncio.run(publish())
    [(_, letter)] = rows.sent["genai.deadletter"]
    assert orjson.loads(letter)["fields"]["offset"] == 10
    assert len({orjson.loads(value)["x_UsageId"] for _, value in rows.sent["genai.cost.focus"]}) == \
        2 * ROWS_CHUNK_CALLS - 2


def test_the_spend_and_the_rows_are_timed_apart() -> None:
    """spendstream_publish_seconds{stage="pricing"} times a batch's spend (the breaker's path) from sent to
    acknowledged, {stage="focus_rows"} its rows' acknowledgement: not the rows' making, which takes longer."""

    def count(stage: str) -> float:
        return REGISTRY.get_sample_value("spendstream_publish_seconds_count", {"stage": stage}) or 0.0

    async def one_batch() -> None:
        stage = _stage()
        tp = TopicPartition(stage._names.usage, 0)
        backlog = RowsBacklog(1000)
        await backlog.put(await stage._price(_fetched(stage, 10, 1), _Producer(), stage._revocations))  # type: ignore[arg-type]
        assert count("pricing") == before["pricing"] + 1 and count("focus_rows") == before["focus_rows"]
        await _published(stage, _Consumer({tp}), _Producer(), backlog)

    before = {stage: count(stage) for stage in ("pricing", "focus_rows")}
    asyncio.run(one_batch())
    assert count("pricing") == before["pricing"] + 1
    assert count("focus_rows") == before["focus_rows"] + 1
