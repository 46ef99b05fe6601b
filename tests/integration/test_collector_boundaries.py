"""The OTLP boundary against bad input: each gets its documented answer, the collector keeps serving,
and the good spans of the same request are kept."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pipeline.kafka.broker import EmbeddedBroker
from schemas.topics import TopicNames
from tests.dialects import DIALECTS
from tests.support import (
    CollectorThread,
    collector_config,
    key_values,
    make_request,
    make_span,
    read_deadletters,
    read_topic,
    read_usage,
    to_otlp_json,
)

pytestmark = pytest.mark.integration
GOOD = DIALECTS[0].attrs
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture
def collector(broker: EmbeddedBroker, topics: TopicNames) -> Iterator[CollectorThread]:
    running = CollectorThread(collector_config(broker.bootstrap_servers, topics.prefix)).start()
    yield running
    running.stop()


def grpc_export(collector: CollectorThread, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
                ) -> ExportTraceServiceResponse:
    with grpc.insecure_channel(collector.grpc_endpoint) as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        response: ExportTraceServiceResponse = call(payload, timeout=10, metadata=metadata)
        return response


def http_post(collector: CollectorThread, body: bytes, content_type: str, headers: dict[str, str] | None = None
              ) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(collector.http_url, data=body,
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_malformed_protobuf_is_invalid_argument_and_collector_keeps_serving(collector: CollectorThread) -> None:
    with pytest.raises(grpc.RpcError) as info:
        grpc_export(collector, b"\xff\xff\xff\xff garbage")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ExportTraceServiceRequest" in (info.value.details() or "")
    response = grpc_export(collector, make_request([make_span(GOOD)]).SerializeToString())
    assert response.partial_success.rejected_spans == 0


def test_http_wrong_content_type_is_415(collector: CollectorThread) -> None:
    status, body, _ = http_post(collector, b"hello", "text/plain")
    assert status == 415
    assert b"application/x-protobuf" in body


@pytest.mark.parametrize(("body", "content_type"), [(b"\x0a\x05oops", "application/x-protobuf"),
                                                     (b"{not json", "application/json"),
                                                     (b"[1, 2]", "application/json")])
def test_http_malformed_body_is_400(collector: CollectorThread, body: bytes, content_type: str) -> None:
    status, _, _ = http_post(collector, body, content_type)
    assert status == 400


def test_http_gzip_body_is_accepted(collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames) -> None:
    span = make_span(GOOD)
    payload = gzip.compress(make_request([span]).SerializeToString())
    status, body, _ = http_post(collector, payload, "application/x-protobuf", {"Content-Encoding": "gzip"})
    assert status == 200
    assert ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 0
    assert [e.span_id for e in read_usage(broker.bootstrap_servers, topics.usage, min_events=1)] == [span.span_id.hex()]


def _with_invalid_utf8(request: ExportTraceServiceRequest, marker: str) -> bytes:
    payload: bytes = request.SerializeToString()
    assert payload.count(marker.encode()) == 1
    return payload.replace(marker.encode(), b"\xc3\x28" + b"x" * (len(marker) - 2))


def test_non_utf8_attribute_rejects_only_that_span(collector: CollectorThread, broker: EmbeddedBroker,
                                                   topics: TopicNames) -> None:
    good, bad = make_span(GOOD), make_span({**GOOD, "team.name": "MARKER-BAD-UTF8"})
    payload = _with_invalid_utf8(make_request([good, bad]), "MARKER-BAD-UTF8")
    response = grpc_export(collector, payload)
    assert response.partial_success.rejected_spans == 1
    assert "UTF-8" in response.partial_success.error_message
    events = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
    assert [e.span_id for e in events] == [good.span_id.hex()]


def test_non_utf8_in_otlp_json_is_replaced_not_refused(collector: CollectorThread, broker: EmbeddedBroker,
                                                       topics: TopicNames) -> None:
    span = make_span({**GOOD, "feature.name": "MARKER-JSON"})
    body = to_otlp_json(make_request([span])).replace(b"MARKER-JSON", b"MARK\xff-JSON")
    status, _, _ = http_post(collector, body, "application/json")
    assert status == 200
    [event] = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
    assert event.attribution["use_case"] == "MARK\ufffd-JSON"


def test_megabyte_attributes_are_accepted_and_cut(collector: CollectorThread, broker: EmbeddedBroker,
                                                  topics: TopicNames) -> None:
    huge = "m" * (1 << 20)
    span = make_span({**GOOD, "gen_ai.input.messages": huge, "team.name": huge})
    response = grpc_export(collector, make_request([span]).SerializeToString())
    assert response.partial_success.rejected_spans == 0
    [event] = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
    assert len(event.attribution["team"]) == 256
    assert all(len(r.value) < 10_000 for r in read_topic(broker.bootstrap_servers, topics.usage))


@pytest.mark.parametrize(("attrs", "reason"), [
    ({**GOOD, "gen_ai.usage.input_tokens": -5}, "invalid_token_count"),
    ({**GOOD, "gen_ai.usage.output_tokens": 5_000_000_000}, "invalid_token_count"),
    ({k: v for k, v in GOOD.items() if "model" not in k}, "missing_model"),
])
def test_invalid_usage_is_partially_rejected_and_dead_lettered(
    collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames, attrs: dict[str, object], reason: str,
) -> None:
    good, bad = make_span(GOOD), make_span(attrs)
    response = grpc_export(collector, make_request([good, bad]).SerializeToString())
    assert response.partial_success.rejected_spans == 1
    assert response.partial_success.error_message
    assert [e.span_id for e in read_usage(broker.bootstrap_servers, topics.usage, min_events=1)] == [
        good.span_id.hex()]
    [letter] = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=1)
    assert letter["reason"] == reason
    assert letter["usage_id"] == f"{bad.trace_id.hex()}-{bad.span_id.hex()}"
    assert letter["stage"] == "collector"


def test_no_content_leaves_the_collector(collector: CollectorThread, broker: EmbeddedBroker,
                                         topics: TopicNames) -> None:
    marker = "SECRET-CONTENT-MARKER"
    content_attrs = {name: f"{marker} {name}" for name in (
        "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.prompt",
        "gen_ai.completion", "gen_ai.prompt.0.content", "gen_ai.completion.0.content", "llm.input_messages",
        "input.value", "output.value", "gen_ai.tool.definitions")}
    span = make_span({**GOOD, **content_attrs})
    span.events.add(name="gen_ai.content.prompt", attributes=key_values({"gen_ai.prompt": marker}))
    bad = make_span({**content_attrs, "gen_ai.usage.input_tokens": -1, "gen_ai.request.model": "m"})
    grpc_export(collector, make_request([span, bad]).SerializeToString())
    assert read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
    for topic in topics.all():
        for record in read_topic(broker.bootstrap_servers, topic):
            assert marker.encode() not in record.value, topic


class TestIngestTokens:
    @pytest.fixture
    def collector(self, broker: EmbeddedBroker, topics: TopicNames) -> Iterator[CollectorThread]:
        config = collector_config(broker.bootstrap_servers, topics.prefix)
        config = replace(config, ingest_tokens={
            "tok_support_rag_123": {"team": "customer-support", "key": "support-rag"},
            "tok_team_a_secret": {"team": "a"},
            "tok_team_b_secret": {"team": "b", "key": "key-b", "cost_center": "cc-b"},
        })
        running = CollectorThread(config).start()
        yield running
        running.stop()

    def test_unknown_or_missing_token_is_unauthenticated(self, collector: CollectorThread) -> None:
        payload = make_request([make_span(GOOD)]).SerializeToString()
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as info:
                grpc_export(collector, payload, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status, _, _ = http_post(collector, payload, "application/x-protobuf", {"Authorization": "Bearer nope"})
        assert status == 401

    def test_token_binds_identity_over_claims(self, collector: CollectorThread, broker: EmbeddedBroker,
                                              topics: TopicNames) -> None:
        span = make_span({**GOOD, "team.name": "finance"})
        status, _, _ = http_post(collector, make_request([span]).SerializeToString(), "application/x-protobuf",
                                 {"Authorization": "Bearer tok_support_rag_123"})
        assert status == 200
        [event] = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
        assert event.attribution["team"] == "customer-support"
        assert event.attribution["key"] == "support-rag"


    def test_a_token_cannot_charge_values_another_token_binds(self, collector: CollectorThread,
                                                              broker: EmbeddedBroker, topics: TopicNames) -> None:
        """Token A binds only team=a; its span claims B's team, key and cost center: none is charged."""
        span = make_span({**GOOD, "team.name": "b", "gen_ai.virtual_key": "key-b", "cost_center": "cc-b",
                          "feature.name": "search"})
        own = make_span({**GOOD, "gen_ai.virtual_key": "key-a-own"})
        for transport in ("grpc", "http"):
            payload = make_request([span, own]).SerializeToString()
            if transport == "grpc":
                grpc_export(collector, payload, (("authorization", "Bearer tok_team_a_secret"),))
            else:
                status, _, _ = http_post(collector, payload, "application/x-protobuf",
                                         {"Authorization": "Bearer tok_team_a_secret"})
                assert status == 200
        events = read_usage(broker.bootstrap_servers, topics.usage, min_events=4)
        claimed = [e for e in events if e.span_id == span.span_id.hex()]
        assert len(claimed) == 2
        for event in claimed:
            assert event.attribution["team"] == "a"
            assert event.attribution.get("key") != "key-b"
            assert event.attribution.get("cost_center") != "cc-b"
            assert event.attribution["use_case"] == "search"  # bound by no token: free to claim
            assert "key-b" not in event.attribution_key
        assert {e.attribution["key"] for e in events if e.span_id == own.span_id.hex()} == {"key-a-own"}


def test_user_ids_are_keyed_hmac_pseudonyms_from_the_environment(broker: EmbeddedBroker, topics: TopicNames) -> None:
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    key = "a-secret-user-id-key-of-32-bytes"
    running = CollectorThread(collector_config(broker.bootstrap_servers, topics.prefix),
                              environ={"SPENDSTREAM_USER_ID_KEY": key}).start()
    try:
        grpc_export(running, make_request([make_span({**GOOD, "enduser.id": "alice@example.com"})]
                                          ).SerializeToString())
    finally:
        running.stop()
    [event] = read_usage(broker.bootstrap_servers, topics.usage, min_events=1)
    expected = hmac.new(key.encode(), b"alice@example.com", hashlib.sha256).hexdigest()[:32]
    assert event.attribution["user"] == f"uh_{expected}"
    for record in read_topic(broker.bootstrap_servers, topics.usage):
        assert b"alice" not in record.value


def test_broker_unreachable_is_retryable(tmp_path: object) -> None:
    from tests.support import free_port  # noqa: PLC0415

    config = collector_config(f"127.0.0.1:{free_port()}", "x.")
    config = replace(config, collector=replace(config.collector, publish_timeout_s=1.0))
    broker = EmbeddedBroker(int(config.kafka.bootstrap_servers.rsplit(":", 1)[1]))
    broker.start()
    running = CollectorThread(config).start()
    broker.stop()  # topics never existed and the broker is gone: nothing can be acknowledged
    try:
        payload = make_request([make_span(GOOD)]).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            grpc_export(running, payload)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # no delay named: a fixed one would replace the SDK's exponential backoff, which rides out a restart
        retry = dict(info.value.trailing_metadata() or ())
        assert "google.rpc.retryinfo-bin" not in retry
        status, body, headers = http_post(running, payload, "application/x-protobuf")
        assert status == 503 and "Retry-After" not in headers
        assert "Kafka" in Status.FromString(body).message  # a body that explains itself
    finally:
        running.stop()


def test_span_without_ids_is_rejected(collector: CollectorThread) -> None:
    span = Span(name="chat", attributes=key_values(GOOD))
    response = grpc_export(collector, make_request([span]).SerializeToString())
    assert response.partial_success.rejected_spans == 1
