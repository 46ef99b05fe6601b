"""The manual kill switch (`spendstream breaker trip|reset|list`): commands on the same topic gateways follow.

A manual trip is its own breaker (`manual|<scope>`), so an automatic breaker closing never
lifts it. Scopes are canonical (values folded as the board matches them: `canonical`), so a
trip of `team=Search ` and a reset of `team=search` name one breaker; a reset also closes the
breakers in force whose scope differs only so (stage 2 names its breakers by the calls' own
spelling, `rate|team=Search`). `reset` closes the manual, rate and budget breakers of the scope at once, and tells
stage 2 with a reset record on `genai.spend` (keyed by the scope, so it lands on the partition
that owns the scope, in order with its spend): stage 2 closes them in its state too, keeps the
rate breaker closed for `breaker.cool_down` and the budget breakers for the rest of their period.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from pipeline.gateway.board import epoch_s, fold
from pipeline.gateway.client import read_commands
from pipeline.kafka.consumer import reader
from pipeline.kafka.producer import BatchProducer
from schemas.breaker import (
    BREAKER_SCHEMA_VERSION,
    BreakerAction,
    BreakerCommand,
    BreakerSource,
    BreakerState,
    breaker_id,
    budget_breaker_id,
    command_id,
)
from schemas.codec import Record, rfc3339
from schemas.config import KafkaConfig
from schemas.policy import Period, Scope
from schemas.spend import Reset, encode_reset
from schemas.topics import TopicNames

SOURCES: tuple[BreakerSource, ...] = ("manual", "rate", "budget")
BUDGET_PERIODS: tuple[Period, ...] = ("monthly", "daily")
#: the trigger of the commands `reset_commands` makes: `publish` tells stage 2 of them
RESET_TRIGGER: Final[Mapping[str, str]] = {"kind": "reset"}


def _command(scope: Scope, source: BreakerSource, state: BreakerState, action: BreakerAction, *, reason: str,
             now_s: float, downgrade: Mapping[str, str] | None = None, expires_at: str | None = None,
             bid: str | None = None, trigger: Mapping[str, str] | None = None) -> BreakerCommand:
    bid = bid or breaker_id(source, scope.key)
    return BreakerCommand(command_id=command_id(bid, state, now_s),
                          breaker_id=bid, source=source, scope=scope.key, scope_attributes=scope.as_dict(),
                          state=state, action=action, reason=reason, issued_at=rfc3339(now_s),
                          downgrade=dict(downgrade or {}), expires_at=expires_at,
                          trigger=dict(trigger or {"kind": "manual"}), schema_version=BREAKER_SCHEMA_VERSION)


def canonical(scope: Scope) -> Scope:
    """The scope as operators' breakers name it: its values folded, as the board matches them."""
    return Scope.of({dim: fold(value) for dim, value in scope.items})


def trip_command(scope: Scope, action: BreakerAction, reason: str, *, ttl_s: int | None,
                 downgrade: Mapping[str, str], now_s: float) -> BreakerCommand:
    if action == "downgrade" and not downgrade:
        raise ValueError("--action downgrade needs a model map: --downgrade FROM=TO, or `downgrade:` in the config")
    return _command(canonical(scope), "manual", "open", action, reason=reason, now_s=now_s,
                    downgrade=downgrade if action == "downgrade" else None,
                    expires_at=rfc3339(now_s + ttl_s) if ttl_s else None)


def reset_commands(scope: Scope, reason: str, now_s: float,
                   known: Iterable[BreakerCommand] = ()) -> list[BreakerCommand]:
    """Close every breaker of the scope: manual, rate, and the breaker of each budget period kind. The last one,
    `budget|<scope>` without a period, is what versions before per-budget breakers opened: closed too, so a
    reset lifts it during an upgrade. The same for every spelling of the scope among the `known` commands
    (`latest_commands`) still open: the board obeys them all for the canonical scope."""
    target = canonical(scope)
    scopes = {target.key: target} | {c.scope: parsed for c in known
                                     if c.state != "closed" and canonical(parsed := Scope.parse(c.scope)) == target}
    return [command for spelling in scopes.values() for command in _closing(spelling, reason, now_s)]


def _closing(scope: Scope, reason: str, now_s: float) -> list[BreakerCommand]:
    ids: list[tuple[BreakerSource, str]] = [(source, breaker_id(source, scope.key)) for source in SOURCES
                                            if source != "budget"]
    ids += [("budget", budget_breaker_id(scope.key, period)) for period in BUDGET_PERIODS]
    ids.append(("budget", breaker_id("budget", scope.key)))
    return [_command(scope, source, "closed", "none", reason=reason, now_s=now_s, bid=bid, trigger=RESET_TRIGGER)
            for source, bid in ids]


def is_reset(command: BreakerCommand) -> bool:
    """One of the commands of an operator's `breaker reset` (`reset_commands`)."""
    return command.state == "closed" and command.source == "manual" and dict(command.trigger) == RESET_TRIGGER


def reset_records(commands: Sequence[BreakerCommand]) -> list[Record]:
    """Stage 2's reset records (for `genai.spend`, keyed by scope) of the resets among `commands`, one per scope."""
    resets = {c.scope: Reset(c.scope, c.reason, int(epoch_s(c.issued_at) or 0)) for c in commands if is_reset(c)}
    return [(scope.encode(), encode_reset(reset)) for scope, reset in resets.items()]


async def publish(kafka: KafkaConfig, commands: list[BreakerCommand]) -> None:
    """Publish the commands. A reset among them (`reset_commands`) first goes to stage 2 on `genai.spend`, so that
    stage 2 is told before the gateways are: a transition it publishes meanwhile is then followed, not
    preceded, by the reset's closing commands."""
    names = TopicNames(kafka.topic_prefix)
    producer = BatchProducer.of(kafka, os.environ)
    await producer.start()
    try:
        await producer.send_all(names.spend, reset_records(commands))
        await producer.send_all(names.breaker_commands, [(c.breaker_id.encode(), c.encode()) for c in commands])
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
