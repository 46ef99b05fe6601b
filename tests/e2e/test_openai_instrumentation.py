"""The official OpenAI instrumentation wrapping the real `openai` client, against a local fake model server."""

from __future__ import annotations

import openai
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from pipeline.kafka.broker import EmbeddedBroker
from schemas.topics import TopicNames
from tests.e2e.conftest import COMPLETION_MARKER, USAGE
from tests.support import CollectorThread, collector_config, read_topic, read_usage

pytestmark = pytest.mark.e2e

PROMPT_MARKER = "PROMPT-MARKER-7f3a9c"


@pytest.mark.parametrize("content_capture", ["true", "false"])
def test_openai_client_call_becomes_usage_event_without_content(
    broker: EmbeddedBroker, topics: TopicNames, model_server: str, content_capture: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", content_capture)
    collector = CollectorThread(collector_config(broker.bootstrap_servers, topics.prefix)).start()
    provider = TracerProvider(resource=Resource.create({
        "service.name": "support-bot", "team.name": "customer-support", "feature.name": "faq",
        "deployment.environment.name": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.grpc_endpoint,
                                                                     insecure=True)))
    instrumentor = OpenAIInstrumentor()  # type: ignore[no-untyped-call]  # its __init__ has no annotations
    instrumentor.instrument(tracer_provider=provider)
    try:
        client = openai.OpenAI(base_url=model_server, api_key="sk-test")
        reply = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"hello {PROMPT_MARKER}"}])
        assert reply.usage is not None and reply.usage.prompt_tokens == 1234
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    try:
        [event] = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
        assert event.provider == "openai"
        assert event.operation == "chat"
        assert event.request_model == "gpt-4o"
        assert event.response_model == "gpt-4o-2024-08-06"
        # openai-v2 reports the total input; it does not report cached tokens on chat (reference §5.5)
        assert event.tokens.input_total == USAGE["prompt_tokens"]
        assert event.tokens.output == USAGE["completion_tokens"]
        assert event.attribution["team"] == "customer-support"
        for topic in topics.all():
            for record in read_topic(broker.bootstrap_servers, topic):
                assert PROMPT_MARKER.encode() not in record.value
                assert COMPLETION_MARKER.encode() not in record.value
    finally:
        collector.stop()
