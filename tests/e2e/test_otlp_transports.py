"""Real OpenTelemetry SDK clients → collector → real broker, for every dialect and every OTLP encoding."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from pipeline.kafka.broker import EmbeddedBroker
from schemas.usage import UsageEvent
from tests.conftest import new_topics
from tests.dialects import DIALECTS, Dialect, assert_matches
from tests.support import CollectorThread, collector_config, read_usage, to_otlp_json

pytestmark = pytest.mark.e2e

RESOURCE = {"service.name": "support-bot", "team.name": "customer-support", "deployment.environment.name": "prod",
            "feature.name": "support-rag"}


class OtlpJsonExporter(SpanExporter):
    """OTLP/HTTP with the JSON encoding: the SDK's own encoder, written out as OTLP/JSON."""

    def __init__(self, url: str) -> None:
        self.url = url

    def export(self, spans: Any) -> SpanExportResult:
        body = to_otlp_json(encode_spans(spans))
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return SpanExportResult.SUCCESS if response.status == 200 else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def running(broker: EmbeddedBroker) -> Iterator[tuple[CollectorThread, str]]:
    names = new_topics(broker.bootstrap_servers)
    collector = CollectorThread(collector_config(broker.bootstrap_servers, names.prefix)).start()
    yield collector, names.usage
    collector.stop()


def exporter_for(transport: str, collector: CollectorThread) -> SpanExporter:
    if transport == "grpc":
        return GrpcExporter(endpoint=collector.grpc_endpoint, insecure=True)
    if transport == "http-protobuf":
        return HttpExporter(endpoint=collector.http_url)
    return OtlpJsonExporter(collector.http_url)


def send_span(exporter: SpanExporter, attrs: dict[str, Any], scope: str) -> Span:
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer(scope).start_as_current_span("llm call", kind=SpanKind.CLIENT,
                                                          attributes=attrs) as span:
        pass
    provider.shutdown()
    assert isinstance(span, Span)  # the SDK's span: ended, so its times are set
    return span


def find(bootstrap: str, topic: str, span: Span) -> UsageEvent:
    ctx = span.get_span_context()
    wanted = f"{ctx.trace_id:032x}-{ctx.span_id:016x}"
    for _ in range(5):
        matches = [e for e in read_usage(bootstrap, topic) if e.id == wanted]
        if matches:
            assert len(matches) == 1
            return matches[0]
    raise AssertionError(f"usage event {wanted} not in {topic}")


@pytest.mark.parametrize("transport", ["grpc", "http-protobuf", "http-json"])
@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_dialect_arrives_normalised(running: tuple[CollectorThread, str], broker: EmbeddedBroker,
                                    dialect: Dialect, transport: str) -> None:
    collector, topic = running
    span = send_span(exporter_for(transport, collector), dialect.attrs, dialect.scope)
    event = find(broker.bootstrap_servers, topic, span)
    assert_matches(event.to_dict(), dialect.expected)
    # the resource's team, unless the span names its own (LiteLLM: the virtual key's team)
    assert event.attribution["team"] == dialect.attrs.get("metadata.user_api_key_team_alias", "customer-support")
    assert event.attribution["use_case"] == "support-rag"
    assert event.start_time_unix_nano == span.start_time
    assert event.end_time_unix_nano == span.end_time
