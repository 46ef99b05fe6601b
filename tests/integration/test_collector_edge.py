"""The OTLP edge against hostile and oversized requests: each answer's status and retryability.

OTLP's retry rules: HTTP 429/502/503/504 are retryable (honouring Retry-After), every other
4xx/5xx is not; gRPC UNAVAILABLE is retryable, RESOURCE_EXHAUSTED only with RetryInfo. Only
broker trouble and a busy collector may be answered as retryable here.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cache
from typing import Any

import grpc
import orjson
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from pipeline.kafka.broker import EmbeddedBroker
from schemas.codec import Record
from schemas.topics import TopicNames
from tests import otlp_wire as wire
from tests.dialects import DIALECTS
from tests.support import (
    CollectorThread,
    collector_config,
    make_request,
    make_span,
    read_deadletters,
    read_usage,
    to_otlp_json,
)

pytestmark = pytest.mark.integration
GOOD = DIALECTS[0].attrs
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRY_INFO = "google.rpc.retryinfo-bin"
MiB = 1 << 20


@cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB."""
    return wire.gzip_bomb(1 << 30)


@cache
def deflate_bomb() -> bytes:
    return wire.deflate_bomb(1 << 30)


@pytest.fixture
def collector(broker: EmbeddedBroker, topics: TopicNames) -> Iterator[CollectorThread]:
    running = CollectorThread(collector_config(broker.bootstrap_servers, topics.prefix)).start()
    yield running
    running.stop()


def http_post(collector: CollectorThread, body: bytes | Iterator[bytes], content_type: str = "application/x-protobuf",
              headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """POST with http.client (a generator body goes out chunked); the answer even when the server answers early."""
    assert collector.endpoints
    conn = http.client.HTTPConnection("127.0.0.1", collector.endpoints.http_port, timeout=60)
    try:
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if isinstance(body, bytes):
            conn.request("POST", "/v1/traces", body=body, headers=all_headers)
        else:
            conn.request("POST", "/v1/traces", body=body, headers=all_headers, encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def grpc_export(collector: CollectorThread, payload: bytes, compression: grpc.Compression | None = None,
                metadata: Sequence[tuple[str, str]] = ()) -> ExportTraceServiceResponse:
    options = [("grpc.max_send_message_length", 64 * MiB)]
    with grpc.insecure_channel(collector.grpc_endpoint, options=options) as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        response: ExportTraceServiceResponse = call(payload, timeout=60, compression=compression, metadata=metadata)
        return response


def grpc_error(collector: CollectorThread, payload: bytes, compression: grpc.Compression | None = None
               ) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        grpc_export(collector, payload, compression)
    return info.value


def assert_not_retryable_http(status: int, headers: dict[str, str], expected: int) -> None:
    assert status == expected
    assert status not in (429, 502, 503, 504), "OTLP clients retry these"
    assert "Retry-After" not in headers


def assert_still_serving(collector: CollectorThread) -> None:
    status, body, _ = http_post(collector, make_request([make_span(GOOD)]).SerializeToString())
    assert status == 200, body
    response = grpc_export(collector, make_request([make_span(GOOD)]).SerializeToString())
    assert response.partial_success.rejected_spans == 0


# --- too large, bombs, invalid streams -------------------------------------------------------------

@pytest.mark.parametrize(("encoding", "bomb"), [("gzip", gzip_bomb), ("deflate", deflate_bomb)])
def test_decompression_bomb_is_413_and_never_inflated_whole(collector: CollectorThread, encoding: str,
                                                             bomb: Any) -> None:
    payload = bomb()
    assert len(payload) < 2 * MiB
    status, body, headers = http_post(collector, payload, headers={"Content-Encoding": encoding})
    assert_not_retryable_http(status, headers, 413)
    assert "max_request_bytes" in Status.FromString(body).message
    assert collector.inflight_bytes == 0
    assert_still_serving(collector)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_100_mb_body_is_413(collector: CollectorThread, chunked: bool) -> None:
    block = bytes(MiB)
    body: bytes | Iterator[bytes] = (block for _ in range(100)) if chunked else block * 100
    status, _, headers = http_post(collector, body)
    assert_not_retryable_http(status, headers, 413)
    assert_still_serving(collector)


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", b"\x1f\x8b\x08\x00 this is not deflate data"),
    ("gzip", gzip.compress(make_request([make_span(GOOD)]).SerializeToString())[:-10]),
    ("deflate", b"\x78\x9c\xff\xff\xff"),
])
def test_invalid_compressed_stream_is_400(collector: CollectorThread, encoding: str, body: bytes) -> None:
    status, answer, headers = http_post(collector, body, headers={"Content-Encoding": encoding})
    assert_not_retryable_http(status, headers, 400)
    assert encoding in Status.FromString(answer).message
    assert_still_serving(collector)


def test_unknown_content_encoding_is_415(collector: CollectorThread) -> None:
    status, _, headers = http_post(collector, b"\x00" * 10, headers={"Content-Encoding": "br"})
    assert_not_retryable_http(status, headers, 415)


@pytest.mark.parametrize(("body", "content_type"), [(b"\x0a\x05oops", "application/x-protobuf"),
                                                     (b"{not json", "application/json")])
def test_invalid_protobuf_or_json_is_400(collector: CollectorThread, body: bytes, content_type: str) -> None:
    status, _, headers = http_post(collector, body, content_type)
    assert_not_retryable_http(status, headers, 400)


def test_17_mb_grpc_message_is_resource_exhausted_without_retry_info(collector: CollectorThread) -> None:
    span = make_span({**GOOD, "padding": "p" * (17 * MiB)})
    error = grpc_error(collector, make_request([span]).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert RETRY_INFO not in dict(error.trailing_metadata() or ())
    assert_still_serving(collector)


def test_grpc_gzip_message_that_inflates_past_the_limit_is_resource_exhausted(collector: CollectorThread) -> None:
    span = make_span({**GOOD, "padding": "\x00" * (40 * MiB)})  # 40 MiB of zeros: a few tens of KB on the wire
    error = grpc_error(collector, make_request([span]).SerializeToString(), grpc.Compression.Gzip)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert RETRY_INFO not in dict(error.trailing_metadata() or ())
    assert_still_serving(collector)


def test_invalid_protobuf_over_grpc_is_invalid_argument(collector: CollectorThread) -> None:
    error = grpc_error(collector, b"\xff\xff\xff\xff garbage")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert RETRY_INFO not in dict(error.trailing_metadata() or ())


# --- spans that cannot be decoded: refused with a reason, dead-lettered --------------------------------

def _call(n: int, extra: Sequence[bytes] = ()) -> tuple[bytes, str]:
    trace, span_id = os.urandom(16), os.urandom(8)
    return wire.span(trace, span_id, wire.model_call_attributes(list(extra)), time.time_ns() - 10**9), \
        f"{trace.hex()}-{span_id.hex()}"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_10000_deep_attribute_rejects_only_its_span_with_a_dead_letter(
    collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames, transport: str,
) -> None:
    good, good_id = _call(1)
    deep, deep_id = _call(2, [wire.key_value(b"deep.attr", wire.nested_value(10_000))])
    payload = wire.request([good, deep])
    if transport == "grpc":
        response = grpc_export(collector, payload)
    else:
        status, body, headers = http_post(collector, payload)
        assert status == 200 and "Retry-After" not in headers
        response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 1
    assert "nested deeper than 32 levels" in response.partial_success.error_message
    assert [e.id for e in read_usage(broker.bootstrap_servers, topics.usage, min_events=1)] == [good_id]
    [letter] = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=1)
    assert letter["reason"] == "attribute_too_deep" and letter["usage_id"] == deep_id


def test_10000_deep_json_is_400(collector: CollectorThread) -> None:
    value = '{"stringValue": "leaf"}'
    for _ in range(10_000):
        value = '{"kvlistValue": {"values": [{"key": "k", "value": ' + value + "}]}}"
    body = to_otlp_json(make_request([make_span(GOOD)])).replace(
        b'"attributes":[', b'"attributes":[{"key":"deep","value":' + value.encode() + b"},", 1)
    status, answer, headers = http_post(collector, body, "application/json")
    assert_not_retryable_http(status, headers, 400)
    assert "nested deeper than 1024" in orjson.loads(answer)["message"]


def test_invalid_utf8_in_a_span_is_dead_lettered_as_such(collector: CollectorThread, broker: EmbeddedBroker,
                                                          topics: TopicNames) -> None:
    good, good_id = _call(1)
    bad, bad_id = _call(2, [wire.key_value(b"gen_ai.request.model", wire.string_value(b"gpt\xff-4o"))])
    response = grpc_export(collector, wire.request([good, bad]))
    assert response.partial_success.rejected_spans == 1
    assert [e.id for e in read_usage(broker.bootstrap_servers, topics.usage, min_events=1)] == [good_id]
    [letter] = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=1)
    assert letter["reason"] == "invalid_utf8" and letter["usage_id"] == bad_id
    assert "gen_ai.request.model" in letter["detail"]


def test_invalid_utf8_in_the_resource_dead_letters_its_spans_not_unallocated(
    collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames,
) -> None:
    resource = [wire.key_value(b"team.name", wire.string_value(b"sea\xffrch")),
                wire.key_value(b"service.name", wire.string_value(b"svc"))]
    calls = [_call(i) for i in range(3)]
    status, body, headers = http_post(collector, wire.request([c for c, _ in calls], resource_attributes=resource))
    assert status == 200 and "Retry-After" not in headers
    assert ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 3
    letters = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=3)
    assert {(d["reason"], d["usage_id"]) for d in letters} == {("invalid_resource", i) for _, i in calls}
    assert read_usage(broker.bootstrap_servers, topics.usage, timeout_s=2.0) == []  # none charged to unallocated


# --- busy, broker trouble and internal errors --------------------------------------------------------

class HeldPublisher:
    """Acknowledges only when released (a slow broker); or fails every publish with `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.release = threading.Event()
        self.published: list[tuple[str, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.release.set()

    async def publish(self, topic: str, records: Sequence[Record]) -> None:
        if self.error is not None:
            raise self.error
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.published.append((topic, len(records)))


def test_past_the_inflight_limit_the_answer_is_retryable_busy() -> None:
    config = collector_config("127.0.0.1:1", "busy.")
    config = replace(config, collector=replace(config.collector, max_request_bytes=2 * MiB,
                                               max_inflight_bytes=3 * MiB))
    publisher = HeldPublisher()
    running = CollectorThread(config, publisher).start()
    try:
        big = make_request([make_span({**GOOD, "padding": "p" * (int(1.8 * MiB))})]).SerializeToString()
        holder = threading.Thread(target=http_post, args=(running, big))
        holder.start()
        deadline = time.monotonic() + 30
        while running.inflight_bytes < len(big) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.inflight_bytes >= len(big), "the first request should be held"
        # a second request of the same size does not fit: both transports say "later"
        status, body, headers = http_post(running, big)
        assert status == 429 and headers.get("Retry-After") == "1"
        assert "collector.max_inflight_bytes" in Status.FromString(body).message
        error = grpc_error(running, big)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert RETRY_INFO in dict(error.trailing_metadata() or ())
        # a gzip bomb while busy is still too large, not "later"
        status, _, headers = http_post(running, gzip_bomb(), headers={"Content-Encoding": "gzip"})
        assert_not_retryable_http(status, headers, 413)
        publisher.release.set()
        holder.join(timeout=30)
        assert running.inflight_bytes == 0
        status, _, _ = http_post(running, big)
        assert status == 200
    finally:
        publisher.release.set()
        running.stop()


def test_internal_error_is_500_not_retryable_and_logged_once_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    publisher = HeldPublisher(error=RuntimeError("a bug in the publish path"))
    running = CollectorThread(collector_config("127.0.0.1:1", "bug."), publisher).start()
    caplog.set_level(logging.ERROR, logger="collector")
    try:
        payload = make_request([make_span(GOOD)]).SerializeToString()
        for _ in range(3):
            status, body, headers = http_post(running, payload)
            assert_not_retryable_http(status, headers, 500)
            assert "RuntimeError" in Status.FromString(body).message
        error = grpc_error(running, payload)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert RETRY_INFO not in dict(error.trailing_metadata() or ())
    finally:
        running.stop()
    logged = [r for r in caplog.records if r.name.startswith("collector") and r.exc_info]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "a bug in the publish path" in caplog.text


# --- one big JSON request does not stall the other clients -------------------------------------------

def test_big_json_request_does_not_stall_small_ones(collector: CollectorThread) -> None:
    spans = [make_span({"http.request.method": "GET", "url.full": f"https://example.com/item/{i}",
                        "http.response.status_code": 200, "server.address": "example.com",
                        "app.note": "n" * 200}) for i in range(19_000)]
    big = to_otlp_json(make_request(spans))
    assert 10 * MiB < len(big) < 16 * MiB
    finished: list[str] = []
    answers: list[int] = []

    def send_big() -> None:
        status, _, _ = http_post(collector, big, "application/json")
        answers.append(status)
        finished.append("big")

    sender = threading.Thread(target=send_big)
    sender.start()
    deadline = time.monotonic() + 60
    while collector.inflight_bytes < len(big) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert collector.inflight_bytes >= len(big), "the big request should have been read"
    small = make_request([make_span({"http.request.method": "GET"})]).SerializeToString()
    for _ in range(10):  # while the big one is being decoded, small ones are answered
        status, _, _ = http_post(collector, small)
        assert status == 200
    finished.append("small")
    sender.join(timeout=120)
    assert answers == [200]
    assert finished == ["small", "big"]
