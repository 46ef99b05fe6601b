"""The worker process: the faust app (usage tally) and the pricing stage, in one event loop.

- the faust agent counts usage events per attribution key, exactly once across redeliveries
  (the pure `tally`), into a changelog-backed table;
- the pricing stage (`pricing_stage.PricingStage`, a plain aiokafka consumer group) turns
  `genai.usage` into FOCUS rows on `genai.cost.focus` and partial spend per scope on `genai.spend`;
- the guardrail stage (`guardrails.stage.GuardrailStage`, its own group on `genai.spend`) keeps
  budgets, velocity and breakers per scope and publishes alerts and breaker commands.
Both stages run as faust tasks but do not use faust's stream delivery, which can drop a
message during a rebalance or recovery. The policy reloads on SIGHUP or when its file changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import faust
from faust.streams import _current_event
from faust.types import EventT
from faust.types.auth import CredentialsT

from pipeline import metrics
from pipeline.focus import Billing
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.stage import GuardrailStage
from pipeline.pricing import PriceCatalog, overrides_from_config
from pipeline.pricing_stage import PricingStage
from pipeline.tally import KeyTally, newest, tally_messages
from schemas.config import Config, KafkaConfig
from schemas.errors import SchemaError
from schemas.topics import TopicNames
from schemas.usage import decode_usage_batch

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
POLICY_CHECK_EVERY_S = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    data_dir: Path
    store: str = "memory://"
    #: the config file, watched for policy changes (None: built-in defaults, nothing to reload)
    config_path: Path | None = None


def _in_event_context(event: EventT[bytes]) -> None:
    """Make `event` the current one, so a table write goes to its partition's changelog.

    faust only sets this inside per-event iteration; with `take_events` we write once per
    key per batch, so we point it at the last event of that key ourselves.
    """
    _current_event.set(weakref.ref(event))


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
    policy = PolicyFile(settings.config_path, config.policy)
    metrics.CATALOG_INFO.labels(catalog.version).set(1)
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
    progress = {"events": 0, "skipped": 0, "at": time.monotonic(), "reported": 0}

    @app.agent(usage_topic)  # type: ignore[arg-type]  # faust types agents over StreamT, take_events is on Stream
    async def tally_usage(stream: faust.Stream[bytes]) -> None:
        async for batch in stream.take_events(BATCH_MAX_EVENTS, within=BATCH_WITHIN_S):
            messages: list[tuple[str, int, int]] = []
            last_event: dict[str, EventT[bytes]] = {}
            for event in batch:
                key = (event.key or b"").decode("utf-8", "replace")
                try:
                    n_events = len(decode_usage_batch(event.value))
                except SchemaError:
                    continue  # the pricing stage dead-letters it
                messages.append((key, event.message.offset, n_events))
                last_event[key] = event
            # the table may hand back an older value than this worker last wrote (faust re-applies the
            # changelog on rebalance); the newest of the two is the truth
            current = {k: newest(KeyTally.from_json(tallies.get(k)), written.get(k)) for k in last_event}
            update = tally_messages(current, messages)
            written.update(update.tallies)
            for key, tally in update.tallies.items():
                _in_event_context(last_event[key])
                tallies[key] = tally.to_json()
            progress["events"] += update.counted_events
            progress["skipped"] += update.skipped_messages
            metrics.USAGE_EVENTS_COUNTED.inc(update.counted_events)
            metrics.USAGE_MESSAGES_REPLAYED.inc(update.skipped_messages)

    @app.task
    async def price_usage() -> None:
        await PricingStage(config, catalog, billing, policy).run()

    @app.task
    async def guard_spend() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, policy.request_reload)
        await GuardrailStage(config, policy).run()

    @app.timer(POLICY_CHECK_EVERY_S)
    async def reload_policy() -> None:
        policy.check()

    @app.timer(PROGRESS_EVERY_S)
    async def report_progress() -> None:
        now = time.monotonic()
        rate = (progress["events"] - progress["reported"]) / max(now - progress["at"], 1e-9)
        if progress["events"] != progress["reported"]:
            log.info("worker: %d usage events counted (%.0f/s), %d attribution keys here, "
                     "%d replayed messages skipped", progress["events"], rate, len(tallies), progress["skipped"])
        progress["reported"], progress["at"] = progress["events"], now

    return app


def run_worker(config: Config, settings: WorkerSettings, loglevel: str = "info") -> None:
    """Run one worker of the consumer group until SIGINT/SIGTERM."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(config, settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
