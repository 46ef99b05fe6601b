"""Stage 2's shell: `genai.spend` -> state per scope -> `genai.alerts` and `genai.breaker.commands`.

Like the pricing stage it is a plain aiokafka consumer group (money cannot be lost, so no stream
framework's delivery sits in between). Its state has its own changelog, `genai.guardrails.state`,
partitioned like `genai.spend`: partition p's scopes are written to changelog partition p.

One batch: add the spend (entries at or below a scope's stored usage offset are replays and
skipped), decide, publish alerts, commands and the changed states, await the broker, commit.
A worker that takes a partition over first reads its changelog partition to the end, so it
continues with the same totals, offsets and decisions. Rebalances wait for the batch in hand
(the revoke callback takes the same lock), so a worker that loses a partition cannot write a
stale state after the new owner has read it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable

import orjson
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.guardrails.decide import Context, Decisions, decide, retain_from
from pipeline.guardrails.gauges import GUARDRAIL_GAUGES
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.readings import merge_readings, read_scopes
from pipeline.guardrails.state import ScopeState
from pipeline.kafka.consumer import commit_processed, group_consumer, read_to_end, reader
from pipeline.kafka.producer import BatchProducer, PlacedRecord
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from schemas.config import Config
from schemas.errors import SchemaError
from schemas.policy import Policy, Scope
from schemas.spend import SpendMessage, Tick, decode_spend
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
GUARDRAILS_GROUP = "spendstream-guardrails"
SWEEP_EVERY_S = 60
#: how often the per-scope gauges are read off the states (a scrape sees a snapshot at most this old)
READINGS_EVERY_S = 5.0
_NS = 1_000_000_000


class PartitionState:
    """The scopes of one `genai.spend` partition and its event-time clock."""

    def __init__(self, scopes: dict[str, ScopeState]) -> None:
        self.scopes = scopes
        self.clock_s = 0
        self.swept_s = 0  # event time of the last sweep_idle

    def advance(self, ts_s: int) -> None:
        self.clock_s = max(self.clock_s, ts_s)

    def pending(self) -> Iterable[ScopeState]:
        """Scopes with a breaker that time alone can move (cool-down, probe, period end)."""
        return (s for s in self.scopes.values() if s.rate.state != "closed" or s.budget_open_until_s is not None)


def apply_messages(partition: PartitionState, messages: Iterable[SpendMessage | Tick], policy: Policy) -> set[str]:
    """Add spend to the partition's scopes and move its clock; returns the keys of scopes that changed."""
    changed: set[str] = set()
    for message in messages:
        if isinstance(message, Tick):
            partition.advance(message.tick_ns // _NS)
            continue
        state = partition.scopes.get(message.scope)
        if state is None:
            state = partition.scopes[message.scope] = ScopeState(Scope.parse(message.scope))
        if message.entries:
            partition.advance(max(e.bucket_s for e in message.entries))
        added = state.add(message.entries, retain_from(policy, partition.clock_s))
        metrics.SPEND_REPLAYED.inc(len(message.entries) - added)
        if added:
            changed.add(message.scope)
    return changed


def decide_partition(partition: PartitionState, changed: set[str], ctx: Context) -> tuple[Decisions, set[str]]:
    """Decide for the scopes that changed and those a clock tick can move; returns the decisions and every
    scope whose state changed (to be written to the changelog)."""
    out = Decisions()
    dirty = set(changed)
    due = {s.scope.key: s for s in partition.pending()}
    due.update((key, partition.scopes[key]) for key in changed)
    cutoff = retain_from(ctx.policy, ctx.now_s)
    for key, state in due.items():
        decided = decide(state, ctx)
        state.prune(cutoff, ctx.now_s)
        if decided.alerts or decided.commands:
            dirty.add(key)
        out.extend(decided)
    return out, dirty


def sweep_idle(partition: PartitionState, ctx: Context) -> list[str]:
    """Once a minute of event time, prune every scope of the partition and forget those nothing reads any
    more (a scope only gets decided on when it has spend or a breaker, so an idle one is reached here).
    Returns the keys forgotten, whose changelog records become tombstones."""
    if ctx.now_s < partition.swept_s + SWEEP_EVERY_S:
        return []
    partition.swept_s = ctx.now_s
    cutoff = retain_from(ctx.policy, ctx.now_s)
    forgotten = []
    for key, state in list(partition.scopes.items()):
        state.prune(cutoff, ctx.now_s)
        if _forgettable(state, ctx):
            del partition.scopes[key]
            forgotten.append(key)
    return forgotten


def _forgettable(state: ScopeState, ctx: Context) -> bool:
    """Nothing left that a decision reads: no recent spend, no breaker, no budget counting on its totals."""
    return (not state.buckets and state.rate.state == "closed" and state.budget_open_until_s is None
            and bool(state.scope.items) and not ctx.policy.budgets_of(state.scope.key))


class GuardrailStage(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, config: Config, policy: PolicyFile) -> None:
        self._config = config
        self._policy = policy
        self._names = TopicNames(config.kafka.topic_prefix)
        self._partitions: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self._read_at = 0.0
        self.alerts = self.commands = 0
        GUARDRAIL_GAUGES.currency = config.billing_currency
        GUARDRAIL_GAUGES.max_scopes = config.metrics.max_scopes

    # --- rebalance: restore before consuming, never write after losing a partition -----------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            for tp in revoked:
                self._partitions.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            missing = [tp.partition for tp in assigned if tp.partition not in self._partitions]
            if missing:
                restored = await self._restore(missing)
                self._partitions.update(restored)
            metrics.SCOPES.set(sum(len(p.scopes) for p in self._partitions.values()))

    async def _restore(self, partitions: list[int]) -> dict[int, PartitionState]:
        changelog = reader(self._config.kafka)
        await changelog.start()
        out: dict[int, dict[str, ScopeState]] = {p: {} for p in partitions}

        def restore(record: ConsumerRecord[bytes, bytes]) -> None:
            scopes, key = out[record.partition], (record.key or b"").decode()
            if record.value:
                scopes[key] = ScopeState.from_json(orjson.loads(record.value))
            else:  # a tombstone: the scope was forgotten
                scopes.pop(key, None)

        try:
            await read_to_end(changelog, [TopicPartition(self._names.guardrail_state, p) for p in partitions],
                              restore)
        finally:
            await changelog.stop()
        count = sum(len(s) for s in out.values())
        metrics.STATE_RESTORED.inc(count)
        log.info("guardrails: took over spend partitions %s, %d scope states restored from the changelog",
                 sorted(partitions), count)
        return {p: PartitionState(scopes) for p, scopes in out.items()}

    # --- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        kafka = self._config.kafka
        # a rebalance waits for the new owner to restore its partitions' changelog
        consumer = group_consumer(kafka, GUARDRAILS_GROUP, max_poll_records=5_000, rebalance_timeout_ms=20_000)
        consumer.subscribe([self._names.spend], listener=self)
        producer = BatchProducer.of(kafka, os.environ)
        await producer.start()
        await consumer.start()
        observed = ConsumerMetrics(consumer, GUARDRAILS_GROUP, "guardrails")
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=5_000)
                await observed.after_fetch(batches)
                async with self._lock:
                    offsets = await self._process(batches, producer)
                    if offsets:
                        await commit_processed(consumer, offsets, "guardrails", log)
                    self._read_gauges()
        finally:
            await consumer.stop()
            await producer.stop()

    async def _process(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
                       producer: BatchProducer) -> dict[TopicPartition, int]:
        policy = self._policy.policy
        issued = time.time()
        decisions = Decisions()
        states: list[PlacedRecord] = []
        for p, partition in self._partitions.items():
            records = next((r for tp, r in batches.items() if tp.partition == p), [])
            messages: list[SpendMessage | Tick] = []
            for record in records:
                try:
                    messages.append(decode_spend(record.value or b""))
                except SchemaError as exc:
                    log.warning("guardrails: skipped %s[%d]@%d: %s", record.topic, p, record.offset, exc)
            changed = apply_messages(partition, messages, policy)
            ctx = Context(policy, self._config.billing_currency, partition.clock_s, issued)
            if changed or any(partition.pending()):
                decided, dirty = decide_partition(partition, changed, ctx)
                decisions.extend(decided)
                for key in dirty:
                    state = partition.scopes[key]
                    if _forgettable(state, ctx):
                        del partition.scopes[key]
                        states.append((p, (key.encode(), None)))
                    else:
                        states.append((p, (key.encode(), orjson.dumps(state.to_json()))))
            # after the decisions: a tombstone follows any state just written for the same scope
            states += [(p, (key.encode(), None)) for key in sweep_idle(partition, ctx)]
        with metrics.PUBLISH_SECONDS.labels("guardrails").time():
            await asyncio.gather(
                producer.send_all(self._names.alerts, [(a.scope.encode(), a.encode()) for a in decisions.alerts]),
                producer.send_all(self._names.breaker_commands,
                                  [(c.breaker_id.encode(), c.encode()) for c in decisions.commands]),
                producer.send_to(self._names.guardrail_state, states))
        for alert in decisions.alerts:
            metrics.ALERTS.labels(alert.kind).inc()
            log.info("alert %s: %s", alert.kind, alert.message)
        for command in decisions.commands:
            metrics.BREAKER_COMMANDS.labels(command.state).inc()
            log.info("breaker %s %s: %s", command.breaker_id, command.state, command.reason)
        metrics.SCOPES.set(sum(len(p.scopes) for p in self._partitions.values()))
        return {tp: records[-1].offset + 1 for tp, records in batches.items() if records}

    def _read_gauges(self) -> None:
        """Hand the metrics a fresh snapshot of the per-scope readings, every READINGS_EVERY_S."""
        if time.monotonic() - self._read_at < READINGS_EVERY_S:
            return
        self._read_at = time.monotonic()
        parts = []
        for partition in self._partitions.values():
            ctx = Context(self._policy.policy, self._config.billing_currency, partition.clock_s, time.time())
            parts.append(read_scopes(partition.scopes.values(), ctx))
        GUARDRAIL_GAUGES.readings = merge_readings(parts)
