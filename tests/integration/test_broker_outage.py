"""Broker stopped mid-stream: the SDK gets a retryable answer and retries; after the restart every span
is in the topic, and a span delivered twice carries the same id."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from schemas.config import KafkaConfig
from schemas.topics import TopicNames
from schemas.usage import UsageEvent
from tests.dialects import DIALECTS
from tests.support import CollectorThread, collector_config, free_port, read_usage

pytestmark = pytest.mark.integration


def test_broker_restart_loses_no_span(tmp_path: object) -> None:
    port = free_port()
    broker = EmbeddedBroker(port)
    names = TopicNames("outage.")
    broker.start()
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix=names.prefix, partitions=2)
    asyncio.run(ensure_topics(kafka, {}))
    collector = CollectorThread(collector_config(broker.bootstrap_servers, names.prefix)).start()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc", "team.name": "t"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, timeout=60),
        schedule_delay_millis=100, max_export_batch_size=50))
    tracer = provider.get_tracer("outage-test")
    sent: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes=DIALECTS[0].attrs) as span:
                ctx = span.get_span_context()
                sent.append(f"{ctx.trace_id:032x}-{ctx.span_id:016x}")
            time.sleep(0.002)

    unavailable_before = unavailable()
    seen: dict[str, UsageEvent] = {}
    duplicates = 0
    try:
        send(200)
        assert provider.force_flush(30_000)
        for event in read_usage(broker.bootstrap_servers, names.usage, min_events=200):
            seen[event.id] = event
        assert len(seen) == 200

        broker.stop()  # memory storage: what it held is gone, which is why we read it above

        def restart() -> None:
            # A producer that reaches the new broker before its topics exist makes Tansu create them on the
            # fly, and its memory storage then hands out offsets twice: produces fail with UnknownError and
            # some acknowledged records never show. `spendstream run` stops the roles and creates the topics
            # before they start again; here the collector keeps its producer (which must find the new
            # broker by itself) and is held while the topics are made.
            with collector.paused():
                broker.start()
                asyncio.run(ensure_topics(kafka, {}))

        # down for longer than the 3 s publish deadline, so a request that meets the outage is answered UNAVAILABLE
        restarter = threading.Timer(4.0, restart)
        restarter.start()
        send(300)  # the first of these meet a dead broker: UNAVAILABLE, the exporter backs off and retries
        restarter.join()
        assert provider.force_flush(60_000)
        after = read_usage(broker.bootstrap_servers, names.usage, min_events=300, timeout_s=20)
        for event in after:
            if event.id in seen:
                duplicates += 1
                assert seen[event.id] == event  # a redelivered span is the same event with the same id
            seen[event.id] = event
    finally:
        provider.shutdown()
        collector.stop()
        broker.stop()
    assert set(seen) == set(sent)
    assert len(sent) == 500
    assert unavailable() > unavailable_before, "the outage never reached the client"


def unavailable() -> float:
    labels = {"transport": "grpc", "code": "UNAVAILABLE"}
    return REGISTRY.get_sample_value("spendstream_collector_requests_total", labels) or 0.0
