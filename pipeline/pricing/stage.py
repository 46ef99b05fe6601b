"""Stage 1's shell: `genai.usage` -> priced FOCUS rows on `genai.cost.focus`, with a plain aiokafka consumer.

Money must not be lost, so the loop is the whole protocol (docs/architecture.md, "No faust",
says why no stream framework sits in between): fetch a batch, price it, publish
rows and dead letters, await the broker's acknowledgement, then commit exactly the offsets
that were processed. A crash or a rebalance before the commit redelivers the batch; its rows
carry the same `x_RowId`s and the exporter keeps one of each.

The same batch feeds stage 2: its spend per scope goes to `genai.spend` (with the usage offsets
it came from, so stage 2 adds it once), and about once a second an event-time tick goes to every
`genai.spend` partition, so breakers can cool down while their scope is quiet. The first call
to a model nobody prices raises an `unpriced_model` alert.

Breakers must not wait for FOCUS rows, which are ~3/4 of the stage's CPU: a fetched batch is priced and its
spend, dead letters and alerts sent (and acknowledged) at once, by a producer of their own, then the batch
waits in a bounded backlog for its rows, which another task makes and sends in chunks, each only while no
batch is being priced: under a burst the spend runs ahead until the backlog is full. A batch's offsets are
committed, in fetch order, once its rows are acknowledged too; a rebalance leaves the batches fetched before it to
the next fetch of their partitions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.guardrails.decide import unpriced_alert
from pipeline.guardrails.history import recorded_usage
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.kafka.consumer import commit_processed, group_consumer, read_range, reader
from pipeline.kafka.producer import BatchProducer, Delivery, acknowledged, partition_for
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.observability.rejections import PROCESSING_FAILED, Rejections
from pipeline.pricing import PriceCatalog, PricedUsage, UnpricedError
from pipeline.pricing.cost_records import CostOutput, focus_records, price_calls
from pipeline.pricing.counters import UsageCounters
from pipeline.pricing.dedupe import SeenUsage
from pipeline.pricing.focus import Billing
from schemas.codec import Record
from schemas.config import Config
from schemas.deadletter import DeadLetter
from schemas.errors import SchemaError
from schemas.spend import encode_tick
from schemas.topics import TopicNames
from schemas.usage import UsageEvent, decode_usage_batch

log = logging.getLogger(__name__)
PRICING_GROUP = "spendstream-pricing"
#: a usage message holds the calls of one attribution key in one request (~7 in the e2e bench): a batch is priced
#: in one go, which stage 2 (same loop) waits for, so it stays small (~0.1 s)
BATCH_MAX_MESSAGES = 500
PROGRESS_EVERY_S = 10.0
TICK_EVERY_S = 1.0
#: with no calls for this long, ticks follow the wall clock (a quiet pipeline still cools breakers down)
IDLE_AFTER_S = 5.0
#: the calls priced (their spend sent) whose rows may wait to be published: how far the spend runs ahead of
#: the rows under load (~2.7 KB a call held, ~160 MB in all; a batch larger than this still goes, alone)
ROWS_BACKLOG_CALLS = 60_000
#: the calls whose rows are made and handed to the producer before the loop lets the spend path run (~10 ms)
ROWS_CHUNK_CALLS = 250
_NS = 1_000_000_000


#: (usage event, usage partition, usage offset)
Located = tuple[UsageEvent, int, int]


def invalid_timestamp_letter(event: UsageEvent, latest_ns: int) -> bytes:
    """A call that claims to start after the latest time the pipeline accepts (a foreign producer, a clock
    the collector did not check): never priced, never a watermark."""
    return DeadLetter(
        reason="invalid_timestamp", detail=f"start time {event.start_time_unix_nano} ns is after {latest_ns} ns "
        "(now + collector.max_skew_s)", stage="pricing", attribution_key=event.attribution_key, usage_id=event.id,
        fields={"start_time_unix_nano": event.start_time_unix_nano}).encode()


class EventClock:
    """Stage 1's event-time watermark: the latest call start seen, never ahead of the wall clock (so no
    client's clock can move it past now), and following the wall clock when idle."""

    def __init__(self) -> None:
        self.watermark_ns = 0
        self._last_call = self._last_tick = time.monotonic()

    def saw(self, start_ns: int, wall_ns: int) -> None:
        self._last_call = time.monotonic()
        self.watermark_ns = max(self.watermark_ns, min(start_ns, wall_ns))

    def tick_due(self, wall_ns: int) -> int | None:
        """The tick to send now, or None (not yet due). Before the first call it is the wall clock: stage 2
        keeps time (readings, cool-downs, period ends) from the start, traffic or not."""
        now = time.monotonic()
        if now - self._last_tick < TICK_EVERY_S:
            return None
        if not self.watermark_ns or now - self._last_call >= IDLE_AFTER_S:
            self.watermark_ns = min(self.watermark_ns + int((now - self._last_tick) * _NS), wall_ns) \
                if self.watermark_ns else wall_ns
        self._last_tick = now
        return self.watermark_ns


@dataclass(frozen=True, slots=True)
class PricedBatch:
    """A fetched batch, priced, its spend acknowledged: its rows are still to be published."""

    calls: list[PricedCall]
    #: what each call's rows are made of, aligned with `calls`
    priced: list[PricedUsage]
    line_costs: list[list[Decimal]]
    offsets: dict[TopicPartition, int]  # to commit once the rows are acknowledged
    #: the stage's revocations when it was fetched: a rebalance since hands its rows and offsets to the next fetch
    revocations: int


class RowsBacklog:
    """The priced batches waiting for their rows, in fetch order, holding at most `max_calls` calls (a batch
    larger than that is let in alone). Rows give way to the spend: they wait while a batch is being priced."""

    def __init__(self, max_calls: int) -> None:
        self._max_calls = max_calls
        self._batches: deque[PricedBatch] = deque()
        self._calls = 0  # of the batches queued or being published
        self._changed = asyncio.Condition()
        self._not_pricing = asyncio.Event()
        self._not_pricing.set()

    def pricing(self) -> None:
        """A fetched batch is being priced: rows wait until it is put here."""
        self._not_pricing.clear()

    async def rows_turn(self) -> None:
        """Return when no batch is being priced (at once, without yielding to the loop, if none is)."""
        await self._not_pricing.wait()

    async def put(self, batch: PricedBatch) -> None:
        self._not_pricing.set()  # also while it waits for room: the rows make it
        async with self._changed:
            await self._changed.wait_for(lambda: not self._calls or self._calls + len(batch.calls) <= self._max_calls)
            self._batches.append(batch)
            self._calls += len(batch.calls)
            self._changed.notify_all()

    async def get(self) -> PricedBatch:
        """The oldest batch; it counts against the bound until `done` is called with it."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._batches))
            return self._batches.popleft()

    async def done(self, batch: PricedBatch) -> None:
        async with self._changed:
            self._calls -= len(batch.calls)
            self._changed.notify_all()


class _Consumed(NamedTuple):
    """The usage message a call came from, for its dead letter (the collector keys it by attribution key)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None


class PricingStage(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, config: Config, catalog: PriceCatalog, billing: Billing, policy: PolicyFile,
                 data_dir: Path | None = None) -> None:
        self._config = config
        self._data_dir = data_dir  # the FOCUS files: ids priced before the broker was emptied
        self._catalog = catalog
        self._billing = billing
        self._policy = policy
        self._scopes = ScopeIndex(policy.policy)
        self._names = TopicNames(config.kafka.topic_prefix)
        self._clock = EventClock()
        self._alerted_models: set[str] = set()
        self._counters = UsageCounters(config.metrics, billing.currency)
        #: usage partition -> the ids it priced within the dedupe horizon; rebuilt when a partition is taken over
        self._seen: dict[int, SeenUsage] = {}
        self._partitions = 0  # of genai.usage
        self._revocations = 0
        self._rejections = Rejections("pricing", log)
        self._row_rejections = Rejections("pricing", log)  # published with the rows, before their commit
        self.priced = self.unpriced = self.duplicates = 0

    # a partition this worker gives up may be priced elsewhere meanwhile: its ids are rebuilt if it comes back
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._revocations += 1
        for tp in revoked:
            self._seen.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass

    async def run(self) -> None:
        """Price until cancelled."""
        consumer = group_consumer(self._config.kafka, PRICING_GROUP, max_poll_records=BATCH_MAX_MESSAGES)
        consumer.subscribe([self._names.usage], listener=self)
        # the spend has a connection of its own: one produce request is in flight per connection, and it must not
        # queue behind megabytes of rows
        producer, rows_producer = (BatchProducer.of(self._config.kafka, os.environ) for _ in range(2))
        backlog = RowsBacklog(ROWS_BACKLOG_CALLS)
        await producer.start()
        await rows_producer.start()
        await consumer.start()
        self._partitions = len(await producer.partitions_of(self._names.usage))
        tasks = [asyncio.create_task(self._price_batches(consumer, producer, backlog)),
                 asyncio.create_task(self._publish_rows(consumer, rows_producer, backlog))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # both loop until cancelled: one that ended raised
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            await rows_producer.stop()

    async def _price_batches(self, consumer: AIOKafkaConsumer, producer: BatchProducer,
                             backlog: RowsBacklog) -> None:
        """Fetch, price, send the spend, and leave the rows to _publish_rows."""
        observed = ConsumerMetrics(consumer, PRICING_GROUP, "pricing")
        reported, at = 0, time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH_MAX_MESSAGES)
            revocations = self._revocations  # a rebalance from here on leaves these records to the next fetch
            await observed.after_fetch(batches)
            if batches:
                backlog.pricing()
                await self._restore_seen({tp.partition: records[0].offset for tp, records in batches.items()
                                          if tp.partition not in self._seen})
                # a rebalance during the restore may have taken partitions away: their records are not ours
                batches = {tp: records for tp, records in batches.items() if tp.partition in self._seen}
                await backlog.put(await self._price(batches, producer, revocations))
            tick = self._clock.tick_due(time.time_ns())
            if tick is not None:
                await producer.send_everywhere(self._names.spend, encode_tick(tick))
            if time.monotonic() - at >= PROGRESS_EVERY_S and self.priced != reported:
                log.info("pricing: %d usage events priced, %d unpriced (dead-lettered), %d messages rejected, "
                         "%d duplicates skipped", self.priced, self.unpriced,
                         self._rejections.total + self._row_rejections.total,
                         self.duplicates)
                reported, at = self.priced, time.monotonic()

    async def _publish_rows(self, consumer: AIOKafkaConsumer, producer: BatchProducer, backlog: RowsBacklog) -> None:
        """The rows of each priced batch, in fetch order; then its offsets are committed."""
        while True:
            batch = await backlog.get()
            if batch.revocations != self._revocations:
                # a rebalance revokes every partition (aiokafka's are eager) and starts each one assigned again from
                # its committed offset: whoever fetches the batch's partitions next prices it again, and its commit
                # could move the group's offset back past what another owner committed meanwhile
                await backlog.done(batch)
                continue
            deliveries: list[Delivery] = []
            rows = 0
            rejected: set[tuple[int, int]] = set()  # (partition, offset): a message's calls may span two chunks
            for start in range(0, len(batch.calls), ROWS_CHUNK_CALLS):
                await asyncio.sleep(0)  # the spend of the next batches, and stage 2, go first
                await backlog.rows_turn()
                end = start + ROWS_CHUNK_CALLS
                records = self._rows(batch.calls[start:end], batch.priced[start:end], batch.line_costs[start:end],
                                     rejected)
                deliveries += await producer.enqueue_all(self._names.cost_focus, records)
                rows += len(records)
            # from the last rows handed over; acknowledged by the broker before the offsets are committed
            with metrics.PUBLISH_SECONDS.labels("focus_rows").time():
                await acknowledged(deliveries)
                await producer.send_all(self._names.deadletter, self._row_rejections.take())
            metrics.FOCUS_ROWS.inc(rows)
            if batch.revocations == self._revocations:  # else a rebalance meanwhile: the next fetch commits them
                await commit_processed(consumer, batch.offsets, "pricing", log)
            await backlog.done(batch)

    def _rows(self, calls: list[PricedCall], priced: list[PricedUsage], line_costs: list[list[Decimal]],
              rejected: set[tuple[int, int]]) -> list[Record]:
        """The FOCUS rows of priced calls. Should making them raise, they are made call by call, and a call that
        raises has its message rejected (its spend is counted: it was priced), unless `rejected` (the (partition,
        offset) of the messages rejected already, which this adds to) holds it."""
        try:
            return focus_records(priced, line_costs, self._billing)
        except Exception:  # isolated below, call by call
            log.warning("pricing: the rows of a batch failed; making them call by call", exc_info=True)
        out: list[Record] = []
        for call, one, costs in zip(calls, priced, line_costs, strict=True):
            try:
                out += focus_records([one], [costs], self._billing)
            except Exception as exc:  # this call's rows only: dead-lettered, the stage goes on
                if (call.partition, call.offset) not in rejected:
                    rejected.add((call.partition, call.offset))
                    key = call.event.attribution_key
                    self._row_rejections.add(_Consumed(self._names.usage, call.partition, call.offset, key.encode()),
                                         PROCESSING_FAILED, exc, attribution_key=key)
        return out

    async def _restore_seen(self, first_offsets: dict[int, int]) -> None:
        """Rebuild the ids of partitions just taken over from what they hold before the first offset fetched:
        the calls priced there within the dedupe horizon (by whichever worker)."""
        if not first_offsets:
            return
        horizon_s = self._config.worker.dedupe_horizon_s
        revocations = self._revocations
        restored = {p: SeenUsage(horizon_s) for p in first_offsets}
        tps = {TopicPartition(self._names.usage, p): p for p in first_offsets}
        since_ms = (time.time_ns() // _NS - horizon_s) * 1000
        wall_ns = time.time_ns()
        # calls stamped a little ahead (within collector.max_skew_s) were priced too: their retries are repeats
        latest_ns = wall_ns + self._config.collector.max_skew_s * _NS

        def remember(record: ConsumerRecord[bytes, bytes]) -> None:
            try:
                events = decode_usage_batch(record.value or b"")
            except SchemaError:
                return
            seen = restored[record.partition]
            for event in events:
                if event.start_time_unix_nano <= latest_ns:
                    seen.first_time(event.id, event.start_time_unix_nano // _NS)

        history = reader(self._config.kafka)
        await history.start()
        try:
            starts = await history.offsets_for_times({tp: since_ms for tp in tps})
            ranges = {tp: (found.offset if found is not None else first_offsets[p], first_offsets[p])
                      for tp, p in tps.items() for found in [starts.get(tp)]}
            await read_range(history, ranges, remember)
        finally:
            await history.stop()
        if self._data_dir is not None:  # what the files hold, should the broker have lost it (embedded restart)
            for key, usage_id, start_s in await asyncio.to_thread(recorded_usage, self._data_dir,
                                                                  since_ms // 1000):
                seen = restored.get(partition_for(key.encode(), self._partitions))
                if seen is not None and start_s * _NS <= latest_ns:
                    seen.first_time(usage_id, start_s)
        for seen in restored.values():
            seen.advance(wall_ns // _NS)
        if self._revocations != revocations:
            return  # the partitions moved meanwhile: rebuilt again when they are fetched next
        self._seen.update(restored)
        log.info("pricing: took over usage partitions %s, %d usage ids within the %d s dedupe horizon restored",
                 sorted(first_offsets), sum(len(s) for s in restored.values()), horizon_s)

    def _first_copies(self, events: list[Located], wall_ns: int) -> tuple[list[Located], list[Record]]:
        """The calls to price: each usage id once (a client retry or a redelivery is a repeat), none from the
        future. Returns them and the dead letters of the calls stamped past now + collector.max_skew_s."""
        latest_ns = wall_ns + self._config.collector.max_skew_s * _NS
        fresh, letters = [], []
        for event, partition, offset in events:
            start_ns = event.start_time_unix_nano
            if start_ns > latest_ns:
                letters.append((event.attribution_key.encode(), invalid_timestamp_letter(event, latest_ns)))
            elif self._seen[partition].first_time(event.id, start_ns // _NS):
                fresh.append((event, partition, offset))
        return fresh, letters

    async def _price(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
                     producer: BatchProducer, revocations: int) -> PricedBatch:
        """Price a fetched batch and send (acknowledged) its spend, dead letters and alerts; returns its rows'
        makings. `revocations`: the stage's when the batch was fetched."""
        decoded: list[Located] = []
        for records in batches.values():
            for record in records:
                try:
                    decoded.extend((event, record.partition, record.offset)
                                   for event in decode_usage_batch(record.value or b""))
                except SchemaError as exc:
                    self._rejections.add(record, "invalid_usage_message", exc,
                                         attribution_key=(record.key or b"").decode("utf-8", "replace"))
        wall_ns = time.time_ns()
        fresh, future = self._first_copies(decoded, wall_ns)
        duplicates = len(decoded) - len(fresh) - len(future)
        self.duplicates += duplicates
        metrics.USAGE_DUPLICATES.inc(duplicates)
        metrics.USAGE_UNPRICED.labels("invalid_timestamp").inc(len(future))
        fresh, out = self._cost(fresh, batches)
        events = [event for event, _, _ in fresh]
        if self._scopes.policy is not self._policy.policy:
            self._scopes = ScopeIndex(self._policy.policy)
        calls = [PricedCall(event, partition, offset, billed)
                 for (event, partition, offset), billed in zip(fresh, out.billed, strict=True) if billed is not None]
        if events:
            self._clock.saw(max(e.start_time_unix_nano for e in events), wall_ns)
            for seen in self._seen.values():
                seen.advance(self._clock.watermark_ns // _NS)
        spend = spend_records(calls, self._scopes, wall_ns + self._config.collector.max_skew_s * _NS)
        with metrics.PUBLISH_SECONDS.labels("pricing").time():
            await asyncio.gather(producer.send_all(self._names.spend, spend),
                                 producer.send_all(self._names.deadletter,
                                                   self._rejections.take() + future + out.dead_letters),
                                 producer.send_all(self._names.alerts, self._unpriced_alerts(out.unpriced_models)))
        metrics.SPEND_MESSAGES.inc(len(spend))
        self.priced += out.priced_events
        self.unpriced += sum(out.unpriced.values()) + len(future)
        metrics.USAGE_PRICED.inc(out.priced_events)
        for reason, count in out.unpriced.items():
            metrics.USAGE_UNPRICED.labels(reason).inc(count)
        self._counters.count(out)
        return PricedBatch(calls, out.priced, out.line_costs,
                           {tp: records[-1].offset + 1 for tp, records in batches.items()}, revocations)

    def _cost(self, fresh: list[Located], batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
              ) -> tuple[list[Located], CostOutput]:
        """Price the calls; returns those priced (or dead-lettered as unpriced) and their output. Should the pricing
        core raise, the batch is priced again message by message and the messages that raise are rejected: one
        call the core cannot handle must not stop the stage."""
        try:
            return fresh, price_calls([event for event, _, _ in fresh], self._catalog, self._billing)
        except Exception:  # isolated below, message by message
            log.warning("pricing: a batch failed to price; pricing it message by message", exc_info=True)
        by_message: dict[tuple[int, int], list[Located]] = {}
        for located in fresh:
            by_message.setdefault(located[1:], []).append(located)
        records = {(r.partition, r.offset): r for rs in batches.values() for r in rs}
        kept: list[Located] = []
        out = CostOutput()
        for where, calls in by_message.items():
            try:
                part = price_calls([event for event, _, _ in calls], self._catalog, self._billing)
            except Exception as exc:  # this message's calls only: dead-lettered, the stage goes on
                self._rejections.add(records[where], PROCESSING_FAILED, exc,
                                     attribution_key=calls[0][0].attribution_key)
                continue
            kept += calls
            out.extend(part)
        return kept, out

    def _unpriced_alerts(self, models: dict[tuple[str | None, str | None], UnpricedError]) -> list[Record]:
        """The first unpriced call of a model today (in this worker) raises an alert; the id dedupes the rest."""
        out = []
        now_s = self._clock.watermark_ns // _NS or int(time.time())
        for (provider, model), exc in models.items():
            alert = unpriced_alert(provider, model, (exc.reason, str(exc)), now_s=now_s, issued_s=time.time())
            if alert.alert_id not in self._alerted_models:
                self._alerted_models.add(alert.alert_id)
                metrics.ALERTS.labels(alert.kind).inc()
                out.append((alert.scope.encode(), alert.encode()))
        return out
