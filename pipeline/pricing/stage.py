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

from aiokafka import ConsumerRecord, TopicPartition

from pipeline.guardrails.decide import unpriced_alert
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.kafka.consumer import commit_processed, group_consumer
from pipeline.kafka.producer import BatchProducer
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.pricing import PriceCatalog, UnpricedError
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.counters import UsageCounters
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


def invalid_usage_letter(key: str, topic: str, partition: int, offset: int, exc: SchemaError) -> bytes:
    """A `genai.usage` message that is not a UsageBatch, kept with where it came from."""
    return DeadLetter(
        reason="invalid_usage_message", detail=str(exc), stage="pricing", attribution_key=key,
        # where to find it, not what it says: the value could hold anything a foreign producer wrote
        fields={"topic": topic, "partition": partition, "offset": offset},
    ).encode()


class EventClock:
    """Stage 1's event-time watermark: the latest call start seen, following the wall clock when idle."""

    def __init__(self) -> None:
        self.watermark_ns = 0
        self._last_call = self._last_tick = time.monotonic()

    def saw(self, start_ns: int) -> None:
        self._last_call = time.monotonic()
        self.watermark_ns = max(self.watermark_ns, start_ns)

    def tick_due(self) -> int | None:
        """The tick to send now, or None (not yet due, or nothing seen yet)."""
        now = time.monotonic()
        if not self.watermark_ns or now - self._last_tick < TICK_EVERY_S:
            return None
        if now - self._last_call >= IDLE_AFTER_S:
            self.watermark_ns += int((now - self._last_tick) * _NS)
        self._last_tick = now
        return self.watermark_ns


class PricingStage:
    def __init__(self, config: Config, catalog: PriceCatalog, billing: Billing, policy: PolicyFile) -> None:
        self._config = config
        self._catalog = catalog
        self._billing = billing
        self._policy = policy
        self._scopes = ScopeIndex(policy.policy)
        self._names = TopicNames(config.kafka.topic_prefix)
        self._clock = EventClock()
        self._alerted_models: set[str] = set()
        self._counters = UsageCounters(config.metrics, billing.currency)
        self.priced = self.unpriced = self.invalid = 0

    async def run(self) -> None:
        """Price until cancelled."""
        consumer = group_consumer(self._config.kafka, PRICING_GROUP, self._names.usage,
                                  max_poll_records=BATCH_MAX_MESSAGES)
        producer = BatchProducer.of(self._config.kafka, os.environ)
        await producer.start()
        await consumer.start()
        observed = ConsumerMetrics(consumer, PRICING_GROUP, "pricing")
        reported, at = 0, time.monotonic()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=BATCH_MAX_MESSAGES)
                await observed.after_fetch(batches)
                if batches:
                    await self._price(batches, producer)
                    await commit_processed(consumer, {tp: records[-1].offset + 1 for tp, records in batches.items()},
                                           "pricing", log)
                tick = self._clock.tick_due()
                if tick is not None:
                    await producer.send_everywhere(self._names.spend, encode_tick(tick))
                if time.monotonic() - at >= PROGRESS_EVERY_S and self.priced != reported:
                    log.info("pricing: %d usage events priced, %d unpriced (dead-lettered), %d invalid messages",
                             self.priced, self.unpriced, self.invalid)
                    reported, at = self.priced, time.monotonic()
        finally:
            await consumer.stop()
            await producer.stop()

    async def _price(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
                     producer: BatchProducer) -> None:
        events: list[UsageEvent] = []
        positions: list[tuple[int, int]] = []
        invalid: list[Record] = []
        for records in batches.values():
            for record in records:
                key = (record.key or b"").decode("utf-8", "replace")
                try:
                    decoded = decode_usage_batch(record.value or b"")
                    events.extend(decoded)
                    positions.extend([(record.partition, record.offset)] * len(decoded))
                except SchemaError as exc:
                    self.invalid += 1
                    metrics.USAGE_MESSAGES_INVALID.inc()
                    invalid.append((record.key or b"", invalid_usage_letter(key, record.topic, record.partition,
                                                                            record.offset, exc)))
        out = cost_records(events, self._catalog, self._billing)
        if self._scopes.policy is not self._policy.policy:
            self._scopes = ScopeIndex(self._policy.policy)
        calls = [PricedCall(event, partition, offset, billed)
                 for event, (partition, offset), billed in zip(events, positions, out.billed, strict=True)
                 if billed is not None]
        if events:
            self._clock.saw(max(e.start_time_unix_nano for e in events))
        spend = spend_records(calls, self._scopes)
        # acknowledged by the broker before the offsets are committed: at-least-once
        with metrics.PUBLISH_SECONDS.labels("pricing").time():
            await asyncio.gather(producer.send_all(self._names.cost_focus, out.rows),
                                 producer.send_all(self._names.deadletter, invalid + out.dead_letters),
                                 producer.send_all(self._names.spend, spend),
                                 producer.send_all(self._names.alerts, self._unpriced_alerts(out.unpriced_models)))
        metrics.SPEND_MESSAGES.inc(len(spend))
        self.priced += out.priced_events
        self.unpriced += sum(out.unpriced.values())
        metrics.USAGE_PRICED.inc(out.priced_events)
        metrics.FOCUS_ROWS.inc(len(out.rows))
        for reason, count in out.unpriced.items():
            metrics.USAGE_UNPRICED.labels(reason).inc(count)
        self._counters.count(out)

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
