"""A takeover's changelog restore runs outside the rebalance callback, and nothing is skipped meanwhile.

aiokafka stops heartbeating while a rebalance callback runs, so on Apache Kafka a restore done
inside `on_partitions_assigned` that takes longer than the session timeout (100k scopes took ~7 s,
the session is 6 s) gets the member expelled; it rejoins, restores again, is expelled again, and
spend is never decided. The embedded broker does not expire sessions (a 24 s callback kept its
member), so the test checks where the restore runs: in the stage's loop, with heartbeats going and
the taken-over partitions paused until their state is back."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import ClassVar

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.stage import GuardrailStage, PartitionState
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import SESSION_TIMEOUT_MS
from schemas.config import config_from_dict
from schemas.spend import SpendEntry, encode_spend
from schemas.topics import TopicNames
from tests.support import read_topic

pytestmark = pytest.mark.integration
RESTORE_S = SESSION_TIMEOUT_MS / 1000 + 2


class SlowRestore(GuardrailStage):
    """A restore as slow as a changelog of a few hundred thousand scopes."""

    restores: ClassVar[list[bool]] = []  # per restore: whether it ran inside the rebalance callback
    in_callback = False

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        SlowRestore.in_callback = True
        try:
            await super().on_partitions_assigned(assigned)
        finally:
            SlowRestore.in_callback = False

    async def _restore(self, partitions: list[int]) -> dict[int, PartitionState]:
        SlowRestore.restores.append(SlowRestore.in_callback)
        await asyncio.sleep(RESTORE_S)
        return await super()._restore(partitions)


async def run_stage(bootstrap: str, topics: TopicNames) -> None:
    config = config_from_dict({"kafka": {"bootstrap_servers": bootstrap, "topic_prefix": topics.prefix,
                                         "partitions": 2}})
    stage = SlowRestore(config, PolicyFile(None, config.policy))
    running = asyncio.create_task(stage.run())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        now_s = int(time.time())
        while not SlowRestore.restores and not running.done():  # sent while the partitions are being restored
            await asyncio.sleep(0.1)
        await producer.send_and_wait(topics.spend, encode_spend("global", [
            SpendEntry(0, 1, now_s - now_s % 5, Decimal("2.5"), 1, 10, Decimal(0))]), key=b"global")
        deadline = time.monotonic() + 4 * RESTORE_S + 20
        while time.monotonic() < deadline and not running.done():
            states = await asyncio.to_thread(read_topic, bootstrap, topics.guardrail_state, timeout_s=1)
            if any(r.key == b"global" for r in states):
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail(f"the spend was never decided ({SlowRestore.restores} restores)")
    finally:
        await producer.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def test_a_restore_longer_than_the_session_neither_loses_the_partitions_nor_repeats(
        broker: EmbeddedBroker, topics: TopicNames) -> None:
    asyncio.run(run_stage(broker.bootstrap_servers, topics))
    assert SlowRestore.restores == [False], "restored inside the rebalance callback, without heartbeats"
