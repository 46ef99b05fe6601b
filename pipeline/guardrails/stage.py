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
from pathlib import Path
from typing import Final

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.guardrails.decide import Context, Decisions, decide, held_after_reset, retain_from
from pipeline.guardrails.gauges import GUARDRAIL_GAUGES
from pipeline.guardrails.history import recorded_scopes, recorded_spend
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.readings import merge_readings, read_scopes
from pipeline.guardrails.state import BUCKET_S, DAY_S, ScopeState, day_of, month_of, period_bounds
from pipeline.kafka.consumer import commit_processed, group_consumer, read_to_end, reader
from pipeline.kafka.producer import BatchProducer, PlacedRecord, partition_for
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.observability.rejections import PROCESSING_FAILED, Rejections
from schemas.config import Config
from schemas.errors import SchemaError, SpendstreamError
from schemas.guardrail_state import PartitionValue, decode_partition_state, decode_scope_state, encode_state_value
from schemas.policy import Policy, Scope
from schemas.spend import Reset, SpendMessage, Tick, decode_spend
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
GUARDRAILS_GROUP = "spendstream-guardrails"
SWEEP_EVERY_S = 60
#: how often the per-scope gauges are read off the states (a scrape sees a snapshot at most this old)
READINGS_EVERY_S = 5.0
_NS = 1_000_000_000


#: the changelog key of a partition's own record (scope keys never start with "@")
PARTITION_KEY: Final = "@partition"


class RestoreError(SpendstreamError):
    """A taken-over partition's state could not be restored; the worker ends so that it is restarted (and the
    partitions move) instead of ignoring their spend."""


class PartitionState:
    """The scopes of one `genai.spend` partition, its event-time clock, and since when it has been watching:
    a scope first seen later spent nothing before, which is a baseline of zero, not "no data"."""

    def __init__(self, scopes: dict[str, ScopeState], watching_since_s: int | None = None) -> None:
        self.scopes = scopes
        self.clock_s = 0
        self.swept_s = 0  # event time of the last sweep_idle
        self.watching_since_s = watching_since_s

    def advance(self, ts_s: int) -> None:
        self.clock_s = max(self.clock_s, ts_s)
        if self.watching_since_s is None:
            self.watching_since_s = ts_s

    def record(self) -> bytes:
        """The partition's own changelog value."""
        return encode_state_value(PartitionValue(self.watching_since_s))

    def pending(self) -> Iterable[ScopeState]:
        """Scopes with a breaker that time alone can move (cool-down, probe, period end)."""
        return (s for s in self.scopes.values() if s.rate.state != "closed" or bool(s.budget_open))


def apply_messages(partition: PartitionState, messages: Iterable[SpendMessage | Tick | Reset], policy: Policy,
                   wall_s: int) -> set[str]:
    """Add spend to the partition's scopes and move its clock, never past the wall clock `wall_s`: spend
    stamped a little ahead (within collector.max_skew_s) waits in its own bucket until the clock gets there.
    An operator's reset closes the scope's breakers in its state (the kill switch published the commands).
    Returns the keys of scopes that changed."""
    changed: set[str] = set()
    for message in messages:
        if isinstance(message, Tick):
            partition.advance(min(message.tick_ns // _NS, wall_s))
            continue
        state = partition.scopes.get(message.scope)
        if state is None:
            state = partition.scopes[message.scope] = ScopeState(Scope.parse(message.scope),
                                                                 first_s=partition.watching_since_s)
        if isinstance(message, Reset):
            # on the partition clock; a partition just taken over has none until its first tick: the reset's own
            # time then (never past the wall clock), so the cool-down it holds the rate breaker for is not lost
            state.reset(partition.clock_s or min(message.at_s, wall_s))
            log.info("guardrails: %s reset by an operator (%s)", message.scope, message.reason)
            changed.add(message.scope)
            continue
        if message.entries:
            partition.advance(min(max(e.bucket_s for e in message.entries), wall_s))
        added = state.add(message.entries, retain_from(policy, partition.clock_s))
        metrics.SPEND_REPLAYED.inc(len(message.entries) - added)
        if added:
            changed.add(message.scope)
    return changed


def cold_partitions(partitions: dict[int, PartitionState]) -> dict[int, PartitionState]:
    """The partitions whose changelog held nothing: neither a scope nor the partition's own record."""
    return {p: partition for p, partition in partitions.items()
            if not partition.scopes and partition.watching_since_s is None}


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
    """Nothing left that a decision reads: no recent spend, no breaker, no operator's reset still holding its rate
    breaker closed, no budget counting on its totals."""
    return (not state.buckets and state.rate.state == "closed" and not state.budget_open
            and not held_after_reset(state, ctx) and bool(state.scope.items)
            and not ctx.policy.budgets_of(state.scope.key))


class GuardrailStage(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, config: Config, policy: PolicyFile, data_dir: Path | None = None) -> None:
        self._config = config
        self._policy = policy
        self._data_dir = data_dir  # the FOCUS files: the record of spend when the changelog has none
        self._tracked_budgets = {b.scope.key for b in policy.policy.budgets}
        self._spend_partitions = 0
        self._names = TopicNames(config.kafka.topic_prefix)
        self._partitions: dict[int, PartitionState] = {}
        self._retired: dict[int, PartitionState] = {}  # revoked, until the rebalance's assignment is known
        self._lock = asyncio.Lock()
        #: assigned, paused, waiting for the loop to restore their changelog (not the rebalance callback: aiokafka
        #: stops heartbeating while it runs, and a restore longer than the session got the member expelled)
        self._unrestored: set[int] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._rejections = Rejections("guardrails", log)
        self._read_at = 0.0
        self.alerts = self.commands = 0
        GUARDRAIL_GAUGES.currency = config.billing_currency
        GUARDRAIL_GAUGES.max_scopes = config.metrics.max_scopes

    # --- rebalance: restore before consuming, never write after losing a partition -----------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            self._unrestored.difference_update(tp.partition for tp in revoked)
            for tp in revoked:
                partition = self._partitions.pop(tp.partition, None)
                if partition is not None:
                    self._retired[tp.partition] = partition

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            # a partition that comes back in the same rebalance was consumed by no one in between: its state here
            # is the newest, no need to read the changelog again
            kept = {tp.partition: self._retired[tp.partition] for tp in assigned if tp.partition in self._retired}
            self._retired.clear()
            self._partitions.update(kept)
            missing = [tp for tp in assigned if tp.partition not in self._partitions]
            if missing:  # nothing of them is fetched before their state is back
                assert self._consumer is not None, "the listener is subscribed by run(), after the consumer is set"
                self._consumer.pause(*missing)
                self._unrestored.update(tp.partition for tp in missing)
            metrics.SCOPES.set(sum(len(p.scopes) for p in self._partitions.values()))

    async def _restore_taken_over(self, consumer: AIOKafkaConsumer) -> None:
        async with self._lock:
            partitions = sorted(self._unrestored)
            try:
                restored = await self._restore(partitions)
            except Exception as exc:  # assigned partitions this worker cannot serve: let it restart
                raise RestoreError("guardrails: restoring the state of taken-over spend partitions failed "
                                   f"({exc!r})") from exc
            self._partitions.update(restored)
            self._unrestored.clear()
            consumer.resume(*(TopicPartition(self._names.spend, p) for p in partitions))
            metrics.SCOPES.set(sum(len(p.scopes) for p in self._partitions.values()))

    async def _restore(self, partitions: list[int]) -> dict[int, PartitionState]:
        changelog = reader(self._config.kafka)
        await changelog.start()
        out: dict[int, dict[str, ScopeState]] = {p: {} for p in partitions}
        since: dict[int, int | None] = dict.fromkeys(partitions)

        def restore(record: ConsumerRecord[bytes, bytes]) -> None:
            scopes, key = out[record.partition], (record.key or b"").decode("utf-8", "replace")
            try:
                if key == PARTITION_KEY:
                    since[record.partition] = decode_partition_state(record.value or b"").watching_since_s
                elif record.value is not None:
                    scopes[key] = ScopeState.from_value(decode_scope_state(record.value))
                else:  # a tombstone (null, not an empty value): the scope was forgotten
                    scopes.pop(key, None)
            except SchemaError as exc:  # the scope keeps its last good value, if any; the takeover goes on
                self._rejections.add(record, "invalid_guardrail_state", exc)

        try:
            await read_to_end(changelog, [TopicPartition(self._names.guardrail_state, p) for p in partitions],
                              restore)
        finally:
            await changelog.stop()
        count = sum(len(s) for s in out.values())
        metrics.STATE_RESTORED.inc(count)
        log.info("guardrails: took over spend partitions %s, %d scope states restored from the changelog",
                 sorted(partitions), count)
        restored = {p: PartitionState(scopes, since[p]) for p, scopes in out.items()}
        # only a partition the changelog knows nothing of (a new or emptied broker) is rebuilt from the files: a
        # changelog is exact up to its committed spend, and `genai.spend` after that may hold calls the files
        # already have (the backlog of a takeover), which would count twice
        cold = cold_partitions(restored)
        if self._data_dir is not None and cold:
            await self._apply_files(cold, cold=True)
        return restored

    async def _apply_files(self, partitions: dict[int, PartitionState], *, cold: bool,
                           scopes: set[str] | None = None) -> None:
        """Fill from the FOCUS files what the stream never counted. `cold`: partitions with no changelog state
        take every recorded scope's period totals and recent buckets (so their baselines need no blind minute).
        Otherwise (budgets added by a reload) only `scopes` without any state take their period totals: a scope
        with state has been counted by the stream since its partition started watching, and adding the files
        to it would count twice."""
        assert self._data_dir is not None
        policy, now_s = self._policy.policy, int(time.time())
        since_s = min(period_bounds(month_of(now_s))[0], period_bounds(day_of(now_s))[0] - DAY_S)
        recent_s = retain_from(policy, now_s)
        days = await asyncio.to_thread(recorded_spend, self._data_dir, since_s, DAY_S)
        buckets = await asyncio.to_thread(recorded_spend, self._data_dir, recent_s, BUCKET_S) if cold else []
        recorded = recorded_scopes(days, buckets, policy,
                                   lambda key: partition_for(key.encode(), self._spend_partitions) in partitions
                                   and (scopes is None or key in scopes))
        recorded_from = min((b.start_s for b in buckets), default=None)  # the files' record of the window starts
        rebuilt = 0
        for key, spend in recorded.items():
            partition = partitions[partition_for(key.encode(), self._spend_partitions)]
            if key in partition.scopes or not (policy.budgets_of(key) or (cold and spend.buckets)):
                continue  # counted by the stream already, or nothing decides on it
            state = partition.scopes[key] = ScopeState(Scope.parse(key))
            state.periods = dict(spend.periods)
            state.unallocated = dict(spend.unallocated)
            if cold and spend.buckets:
                state.buckets = spend.buckets
                state.first_s = recorded_from
            rebuilt += 1
        if cold and recorded_from is not None:  # the files were written from then on: spend before is known zero
            for partition in partitions.values():
                partition.watching_since_s = recorded_from
        log.info("guardrails: %d scopes of spend partitions %s rebuilt from the FOCUS files (%s)", rebuilt,
                 sorted(partitions), "cold partitions" if cold else "budgets added by a reload")

    # --- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        kafka = self._config.kafka
        # a rebalance waits for the new owner to restore its partitions' changelog
        consumer = group_consumer(kafka, GUARDRAILS_GROUP, max_poll_records=5_000, rebalance_timeout_ms=20_000)
        consumer.subscribe([self._names.spend], listener=self)
        producer = BatchProducer.of(kafka, os.environ)
        await producer.start()
        self._spend_partitions = len(await producer.partitions_of(self._names.spend))
        self._consumer = consumer
        await consumer.start()
        observed = ConsumerMetrics(consumer, GUARDRAILS_GROUP, "guardrails")
        try:
            while True:
                if self._unrestored:
                    await self._restore_taken_over(consumer)
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
        added = {b.scope.key for b in policy.budgets} - self._tracked_budgets
        if added and self._data_dir is not None:  # a budget added mid-period counts the whole period
            await self._apply_files(self._partitions, cold=False, scopes=added)
        self._tracked_budgets = {b.scope.key for b in policy.budgets}
        issued = time.time()
        decisions = Decisions()
        states: list[PlacedRecord] = []
        for p, partition in self._partitions.items():
            records = next((r for tp, r in batches.items() if tp.partition == p), [])
            watching = partition.watching_since_s
            changed = set()
            for record in records:
                try:
                    message = decode_spend(record.value or b"")
                except SchemaError as exc:
                    self._rejections.add(record, "invalid_spend_message", exc)
                    continue
                try:
                    changed |= apply_messages(partition, [message], policy, int(issued))
                except Exception as exc:  # this message only: dead-lettered, the stage goes on
                    self._rejections.add(record, PROCESSING_FAILED, exc)
            changed |= {key for key in added if key in partition.scopes}  # rebuilt: decide and write them
            if partition.watching_since_s != watching:
                states.append((p, (PARTITION_KEY.encode(), partition.record())))
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
                        states.append((p, (key.encode(), encode_state_value(state.to_value()))))
            # after the decisions: a tombstone follows any state just written for the same scope
            states += [(p, (key.encode(), None)) for key in sweep_idle(partition, ctx)]
        with metrics.PUBLISH_SECONDS.labels("guardrails").time():
            await asyncio.gather(
                producer.send_all(self._names.alerts, [(a.scope.encode(), a.encode()) for a in decisions.alerts]),
                producer.send_all(self._names.breaker_commands,
                                  [(c.breaker_id.encode(), c.encode()) for c in decisions.commands]),
                producer.send_to(self._names.guardrail_state, states),
                producer.send_all(self._names.deadletter, self._rejections.take()))
        for alert in decisions.alerts:
            metrics.ALERTS.labels(alert.kind).inc()
            log.info("alert %s: %s", alert.kind, alert.message)
        for command in decisions.commands:
            metrics.BREAKER_COMMANDS.labels(command.state).inc()
            log.info("breaker %s %s: %s", command.breaker_id, command.state, command.reason)
        metrics.SCOPES.set(sum(len(p.scopes) for p in self._partitions.values()))
        # only what was processed: records fetched just before a revoke are not, and committing them (the old
        # generation is still current until the group re-forms) would skip them for good
        return {tp: records[-1].offset + 1 for tp, records in batches.items()
                if records and tp.partition in self._partitions}

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
