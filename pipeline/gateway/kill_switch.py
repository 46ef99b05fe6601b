"""The manual kill switch (`spendstream breaker trip|reset|list`): commands on the same topic gateways follow.

A manual trip is its own breaker (`manual|<scope>`), so an automatic breaker closing never
lifts it. `reset` closes the manual, rate and budget breakers of the scope at once; stage 2
publishes again at its next transition of that scope (a rate breaker that cools down, a budget
that is exhausted in a new period).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from pipeline.gateway.board import epoch_s
from pipeline.gateway.client import read_commands
from pipeline.kafka.consumer import reader
from pipeline.kafka.producer import BatchProducer
from schemas.breaker import BreakerAction, BreakerCommand, BreakerSource, BreakerState, breaker_id, command_id
from schemas.codec import rfc3339
from schemas.config import KafkaConfig
from schemas.policy import Scope
from schemas.topics import TopicNames

SOURCES: tuple[BreakerSource, ...] = ("manual", "rate", "budget")


def _command(scope: Scope, source: BreakerSource, state: BreakerState, action: BreakerAction, *, reason: str,
             now_s: float, downgrade: Mapping[str, str] | None = None, expires_at: str | None = None
             ) -> BreakerCommand:
    bid = breaker_id(source, scope.key)
    return BreakerCommand(command_id=command_id(bid, state, now_s),
                          breaker_id=bid, source=source, scope=scope.key, scope_attributes=scope.as_dict(),
                          state=state, action=action, reason=reason, issued_at=rfc3339(now_s),
                          downgrade=dict(downgrade or {}), expires_at=expires_at,
                          trigger={"kind": "manual"})


def trip_command(scope: Scope, action: BreakerAction, reason: str, *, ttl_s: int | None,
                 downgrade: Mapping[str, str], now_s: float) -> BreakerCommand:
    if action == "downgrade" and not downgrade:
        raise ValueError("--action downgrade needs a model map: --downgrade FROM=TO, or `downgrade:` in the config")
    return _command(scope, "manual", "open", action, reason=reason, now_s=now_s,
                    downgrade=downgrade if action == "downgrade" else None,
                    expires_at=rfc3339(now_s + ttl_s) if ttl_s else None)


def reset_commands(scope: Scope, reason: str, now_s: float) -> list[BreakerCommand]:
    return [_command(scope, source, "closed", "none", reason=reason, now_s=now_s) for source in SOURCES]


async def publish(kafka: KafkaConfig, commands: list[BreakerCommand]) -> None:
    producer = BatchProducer.of(kafka, os.environ)
    await producer.start()
    try:
        await producer.send_all(TopicNames(kafka.topic_prefix).breaker_commands,
                                [(c.breaker_id.encode(), c.encode()) for c in commands])
    finally:
        await producer.stop()


async def latest_commands(kafka: KafkaConfig) -> dict[str, BreakerCommand]:
    """The latest command of every breaker ever written (the compacted topic's view)."""
    latest: dict[str, BreakerCommand] = {}
    consumer = reader(kafka)
    await consumer.start()
    try:
        await read_commands(consumer, TopicNames(kafka.topic_prefix).breaker_commands,
                          lambda c: latest.__setitem__(c.breaker_id, c))
    finally:
        await consumer.stop()
    return latest


def in_force(command: BreakerCommand, now_s: float | None = None) -> bool:
    expires = epoch_s(command.expires_at)
    return command.state != "closed" and (expires is None or (now_s or time.time()) < expires)
