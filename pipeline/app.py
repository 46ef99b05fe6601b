"""The faust worker, stage 1: `genai.usage` batches -> priced FOCUS rows on `genai.cost.focus`.

A thin shell around pure parts: the tally (which messages are new, exactly once per key) and
`cost_records` (price, map to FOCUS, dead-letter what cannot be priced). Rows and dead letters
are acknowledged by the broker before the tally moves past their source offsets, so a crash
re-prices at most the last batch, with the same row ids, which the exporter keeps once.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faust
from faust.streams import _current_event
from faust.types import EventT
from faust.types.auth import CredentialsT

from pipeline import metrics
from pipeline.cost_records import cost_records
from pipeline.focus import Billing
from pipeline.pricing import PriceCatalog, overrides_from_config
from pipeline.produce import BatchProducer
from pipeline.tally import KeyTally, newest, tally_messages
from schemas.config import Config, KafkaConfig
from schemas.deadletter import DeadLetter
from schemas.errors import SchemaError
from schemas.topics import TopicNames
from schemas.usage import UsageEvent, decode_usage_batch

log = logging.getLogger(__name__)

#: faust's app id: the consumer group and the prefix of its changelog topics (after the topic prefix)
APP_ID = "spendstream"
#: Consumer-group timeouts: a dead worker's partitions move after ~session timeout, not faust's 60 s.
SESSION_TIMEOUT_S = 6.0  # Apache Kafka's group.min.session.timeout.ms default: the lowest it accepts
REBALANCE_TIMEOUT_S = 6.0
HEARTBEAT_INTERVAL_S = 1.0
BATCH_MAX_EVENTS = 2000
BATCH_WITHIN_S = 0.5
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    data_dir: Path
    store: str = "memory://"


def _in_event_context(event: EventT[bytes]) -> None:
    """Make `event` the current one, so a table write goes to its partition's changelog.

    faust only sets this inside per-event iteration; with `take_events` we write once per
    key per batch, so we point it at the last event of that key ourselves.
    """
    _current_event.set(weakref.ref(event))


def invalid_usage_letter(key: str, event: EventT[bytes], exc: SchemaError) -> bytes:
    """A `genai.usage` message that is not a UsageBatch, kept with where it came from."""
    message = event.message
    return DeadLetter(
        reason="invalid_usage_message", detail=str(exc), stage="pricing", attribution_key=key,
        # where to find it, not what it says: the value could hold anything a foreign producer wrote
        fields={"topic": message.topic, "partition": message.partition, "offset": message.offset},
    ).encode()


def broker_credentials(kafka: KafkaConfig, environ: Mapping[str, str]) -> CredentialsT | None:
    """The same connection security the collector's aiokafka clients use, in faust's terms."""
    options = kafka.client_options(environ)
    if kafka.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=options["sasl_plain_username"],
                                     password=options["sasl_plain_password"],
                                     mechanism=options["sasl_mechanism"], ssl_context=options.get("ssl_context"))
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return None


def catalog_from_config(config: Config) -> PriceCatalog:
    overrides = overrides_from_config(config.pricing.get("overrides", ()), config.billing_currency)
    return PriceCatalog(overrides, billing_currency=config.billing_currency, usd_rate=config.usd_rate)


def billing_from_config(config: Config) -> Billing:
    return Billing(currency=config.billing_currency, usd_rate=config.usd_rate,
                   account_id=config.focus.billing_account_id, account_name=config.focus.billing_account_name)


def build_app(config: Config, settings: WorkerSettings) -> faust.App:
    names = TopicNames(config.kafka.topic_prefix)
    catalog = catalog_from_config(config)
    billing = billing_from_config(config)
    metrics.CATALOG_INFO.labels(catalog.version).set(1)
    producer = BatchProducer(config.kafka.client_options(os.environ), compression=config.kafka.compression)
    partitions = config.kafka.partitions
    app = faust.App(
        # one deployment's prefix isolates its group and changelogs from another's on the same cluster
        f"{config.kafka.topic_prefix}{APP_ID}",
        broker=f"kafka://{config.kafka.bootstrap_servers}",
        broker_credentials=broker_credentials(config.kafka, os.environ),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=partitions,
        topic_replication_factor=config.kafka.replication_factor,
        topic_disable_leader=True,
        web_enabled=False,
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_rebalance_timeout=REBALANCE_TIMEOUT_S,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
        consumer_auto_offset_reset="earliest",
    )
    usage_topic = app.topic(names.usage, key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw", partitions=partitions)
    # values are plain JSON [events, offset]: a typed value_type breaks faust's changelog recovery
    tallies = app.Table("usage-tally", default=None, partitions=partitions, key_type=str)
    written: dict[str, KeyTally] = {}  # what this worker last wrote per key
    progress = {"events": 0, "skipped": 0, "invalid": 0, "unpriced": 0, "at": time.monotonic(), "reported": 0}

    @app.agent(usage_topic)  # type: ignore[arg-type]  # faust types agents over StreamT, take_events is on Stream
    async def price_usage(stream: faust.Stream[bytes]) -> None:
        await producer.start()
        try:
            async for batch in stream.take_events(BATCH_MAX_EVENTS, within=BATCH_WITHIN_S):
                await _price_batch(batch)
        finally:
            await producer.stop()

    async def _price_batch(batch: Sequence[EventT[bytes]]) -> None:
        messages: list[tuple[str, int, int]] = []
        decoded: list[tuple[str, int, list[UsageEvent]]] = []
        invalid: list[tuple[bytes, bytes]] = []
        last_event: dict[str, EventT[bytes]] = {}
        for event in batch:
            key = (event.key or b"").decode("utf-8", "replace")
            try:
                usage = decode_usage_batch(event.value)
            except SchemaError as exc:
                progress["invalid"] += 1
                metrics.USAGE_MESSAGES_INVALID.inc()
                invalid.append((event.key or b"", invalid_usage_letter(key, event, exc)))
                continue
            messages.append((key, event.message.offset, len(usage)))
            decoded.append((key, event.message.offset, usage))
            last_event[key] = event
        # the table may hand back an older value than this worker last wrote (faust re-applies the
        # changelog on rebalance); the newest of the two is the truth
        current = {k: newest(KeyTally.from_json(tallies.get(k)), written.get(k)) for k in last_event}
        update = tally_messages(current, messages)
        fresh = [e for key, offset, usage in decoded if (key, offset) in update.counted for e in usage]
        out = cost_records(fresh, catalog, billing)
        # acknowledged before the tally (and faust's commit) moves past these offsets: at-least-once
        await producer.send_all(names.cost_focus, out.rows)
        await producer.send_all(names.deadletter, invalid + out.dead_letters)
        written.update(update.tallies)
        for key, tally in update.tallies.items():
            _in_event_context(last_event[key])
            tallies[key] = tally.to_json()
        progress["events"] += update.counted_events
        progress["skipped"] += update.skipped_messages
        progress["unpriced"] += sum(out.unpriced.values())
        metrics.USAGE_EVENTS_COUNTED.inc(update.counted_events)
        metrics.USAGE_MESSAGES_REPLAYED.inc(update.skipped_messages)
        metrics.USAGE_PRICED.inc(out.priced_events)
        metrics.FOCUS_ROWS.inc(len(out.rows))
        for reason, count in out.unpriced.items():
            metrics.USAGE_UNPRICED.labels(reason).inc(count)
        for (team, provider, model, meter), cost in out.cost_by_meter.items():
            metrics.COST_BILLED.labels(billing.currency, team, provider, model, meter).inc(float(cost))

    @app.timer(PROGRESS_EVERY_S)
    async def report_progress() -> None:
        now = time.monotonic()
        rate = (progress["events"] - progress["reported"]) / max(now - progress["at"], 1e-9)
        if progress["events"] != progress["reported"]:
            log.info("worker: %d usage events priced (%.0f/s), %d attribution keys here, "
                     "%d replayed messages skipped, %d invalid, %d unpriced", progress["events"], rate,
                     len(tallies), progress["skipped"], progress["invalid"], progress["unpriced"])
        progress["reported"], progress["at"] = progress["events"], now

    return app


def run_worker(config: Config, settings: WorkerSettings, loglevel: str = "info") -> None:
    """Run one worker of the consumer group until SIGINT/SIGTERM."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(config, settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
