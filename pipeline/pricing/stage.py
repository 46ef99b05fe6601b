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
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.guardrails.decide import unpriced_alert
from pipeline.guardrails.history import recorded_usage
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.kafka.consumer import commit_processed, group_consumer, read_range, reader
from pipeline.kafka.producer import BatchProducer, partition_for
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.observability.rejections import PROCESSING_FAILED, Rejections
from pipeline.pricing import PriceCatalog, UnpricedError
from pipeline.pricing.cost_records import CostOutput, cost_records
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
BATCH_MAX_MESSAGES = 2_000
PROGRESS_EVERY_S = 10.0
TICK_EVERY_S = 1.0
#: with no calls for this long, ticks follow the wall clock (a quiet pipeline still cools breakers down)
IDLE_AFTER_S = 5.0
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
        producer = BatchProducer.of(self._config.kafka, os.environ)
        await producer.start()
        await consumer.start()
        self._partitions = len(await producer.partitions_of(self._names.usage))
        observed = ConsumerMetrics(consumer, PRICING_GROUP, "pricing")
        reported, at = 0, time.monotonic()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=BATCH_MAX_MESSAGES)
                await observed.after_fetch(batches)
                if batches:
                    await self._restore_seen({tp.partition: records[0].offset for tp, records in batches.items()
                                              if tp.partition not in self._seen})
                    # a rebalance during the restore may have taken partitions away: their records are not ours
                    batches = {tp: records for tp, records in batches.items() if tp.partition in self._seen}
                    await self._price(batches, producer)
                    # a rebalance during the publish may have taken partitions away: their new owner commits them
                    await commit_processed(consumer, {tp: records[-1].offset + 1 for tp, records in batches.items()
                                                      if tp.partition in self._seen}, "pricing", log)
                tick = self._clock.tick_due(time.time_ns())
                if tick is not None:
                    await producer.send_everywhere(self._names.spend, encode_tick(tick))
                if time.monotonic() - at >= PROGRESS_EVERY_S and self.priced != reported:
                    log.info("pricing: %d usage events priced, %d unpriced (dead-lettered), %d messages rejected, "
                             "%d duplicates skipped", self.priced, self.unpriced, self._rejections.total,
                             self.duplicates)
                    reported, at = self.priced, time.monotonic()
        finally:
            await consumer.stop()
            await producer.stop()

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
                     producer: BatchProducer) -> None:
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
        # acknowledged by the broker before the offsets are committed: at-least-once
        with metrics.PUBLISH_SECONDS.labels("pricing").time():
            await asyncio.gather(producer.send_all(self._names.cost_focus, out.rows),
                                 producer.send_all(self._names.deadletter,
                                                   self._rejections.take() + future + out.dead_letters),
                                 producer.send_all(self._names.spend, spend),
                                 producer.send_all(self._names.alerts, self._unpriced_alerts(out.unpriced_models)))
        metrics.SPEND_MESSAGES.inc(len(spend))
        self.priced += out.priced_events
        self.unpriced += sum(out.unpriced.values()) + len(future)
        metrics.USAGE_PRICED.inc(out.priced_events)
        metrics.FOCUS_ROWS.inc(len(out.rows))
        for reason, count in out.unpriced.items():
            metrics.USAGE_UNPRICED.labels(reason).inc(count)
        self._counters.count(out)

    def _cost(self, fresh: list[Located], batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
              ) -> tuple[list[Located], CostOutput]:
        """Price the calls; returns those priced (or dead-lettered as unpriced) and their output. Should the pricing
        core raise, the batch is priced again message by message and the messages that raise are rejected: one
        call the core cannot handle must not stop the stage."""
        try:
            return fresh, cost_records([event for event, _, _ in fresh], self._catalog, self._billing)
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
                part = cost_records([event for event, _, _ in calls], self._catalog, self._billing)
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
