"""Processor mode with real OpenTelemetry SDK clients and a real OTLP receiver downstream (a plain gRPC or HTTP
server built here from grpcio / http.server and opentelemetry-proto; nothing of spendstream).

Every span received reaches the downstream receiver, model calls with the cost the FOCUS rows bill (a real worker
prices them), no content left; a downstream outage neither blocks nor changes cost accounting, and the queue's
retries and drops are counted.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, TraceState
from prometheus_client import REGISTRY

from collector.enrich import ATTRIBUTION_PREFIX, COST_AMOUNT, COST_CURRENCY, COST_SOURCE, is_content
from pipeline.kafka.broker import EmbeddedBroker
from schemas.config import ForwardConfig
from tests.conftest import new_topics
from tests.dialects import DIALECTS
from tests.support import CollectorThread, collector_config, free_port, read_topic, read_usage, usage_counted
from tests.tls_certs import Authority

pytestmark = pytest.mark.e2e

SECRET = "PROMPT-TEXT-7c1f"
RESOURCE = {"service.name": "support-bot", "team.name": "customer-support", "deployment.environment.name": "prod",
            "feature.name": "support-rag"}
#: how long the downstream receiver is down in the outage test (the acceptance figure is 30 s; any outage that
#: fills the queue and makes the sender retry exercises the same code)
OUTAGE_S = float(os.environ.get("SPENDSTREAM_TEST_OUTAGE_S", "6"))


class OtlpGrpcSink:
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self, port: int, credentials: grpc.ServerCredentials | None = None) -> None:
        self.port = port
        self.credentials = credentials
        self.spans: dict[tuple[str, str], Span] = {}
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def _export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        with self._lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans[(span.trace_id.hex(), span.span_id.hex())] = span
        return ExportTraceServiceResponse()

    def start(self) -> OtlpGrpcSink:
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": grpc.unary_unary_rpc_method_handler(
                self._export, request_deserializer=ExportTraceServiceRequest.FromString,
                response_serializer=ExportTraceServiceResponse.SerializeToString)})])
        address = f"127.0.0.1:{self.port}"
        bound = (server.add_secure_port(address, self.credentials) if self.credentials
                 else server.add_insecure_port(address))
        assert bound == self.port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()

    def wait_for(self, count: int, timeout_s: float = 60) -> dict[tuple[str, str], Span]:
        deadline = time.monotonic() + timeout_s
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        with self._lock:
            return dict(self.spans)


class FixedThreshold(Sampler):
    """Records every span with `ot=th:<threshold>`, as an OTel probability sampler that kept it writes."""

    def __init__(self, threshold: str) -> None:
        self.threshold = threshold

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes,
                              TraceState([("ot", f"th:{self.threshold}")]))

    def get_description(self) -> str:
        return f"FixedThreshold({self.threshold})"


def mixed_attributes(i: int) -> tuple[str, str, dict[str, Any]]:
    """(kind, scope, attributes) of the i-th span: model calls of every dialect, agent, tool, HTTP and DB spans,
    content on several of them."""
    slot = i % 10
    if slot < 6:
        dialect = DIALECTS[(i // 10 * 6 + slot) % len(DIALECTS)]
        return "model", dialect.scope, {**dialect.attrs, "gen_ai.input.messages": f'[{{"content": "{SECRET}"}}]',
                                        "gen_ai.prompt.0.content": SECRET}
    others: dict[int, tuple[str, str, dict[str, Any]]] = {
        6: ("agent", "agents", {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
                                "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5000,
                                "gen_ai.usage.output_tokens": 900, "gen_ai.output.messages": SECRET}),
        7: ("tool", "agents", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                               "gen_ai.tool.call.arguments": SECRET}),
        8: ("http", "http", {"http.request.method": "GET", "url.full": "https://example.com/x",
                             "http.response.status_code": 200}),
        9: ("db", "db", {"db.system.name": "postgresql", "db.query.text": "select 1"}),
    }
    return others[slot]


def send_spans(endpoint: str, n: int, sampler: Sampler = ALWAYS_ON, first: int = 0,
               ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """n spans through the real SDK (BatchSpanProcessor, OTLP/gRPC exporter); (trace, span) -> (kind, attrs)."""
    provider = TracerProvider(resource=Resource.create(RESOURCE), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   max_export_batch_size=100, schedule_delay_millis=50))
    sent = {}
    for i in range(first, first + n):
        kind, scope, attrs = mixed_attributes(i)
        span = provider.get_tracer(scope).start_span("call", kind=SpanKind.CLIENT, attributes=attrs)
        span.add_event("gen_ai.user.message", {"content": SECRET})
        span.end()
        ctx = span.get_span_context()
        sent[(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")] = (kind, attrs)
    assert provider.force_flush(60_000)
    provider.shutdown()
    return sent


def attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return out


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def worker(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Fresh topics and a real worker pricing them: (topic prefix, its metrics port)."""
    names = new_topics(broker.bootstrap_servers)
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{names.prefix}'\n  partitions: 2\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--kafka", broker.bootstrap_servers, "--config", str(config),
         "--metrics-port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield names.prefix, port
    finally:
        process.terminate()
        process.wait(timeout=30)


def billed_by_call(bootstrap: str, prefix: str, port: int, calls: int) -> dict[str, Decimal]:
    """Once the worker handled `calls` usage events: each priced call's FOCUS BilledCost sum, by usage id."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if usage_counted(port) >= calls:
                break
        except OSError:
            pass
        time.sleep(0.5)
    billed: defaultdict[str, Decimal] = defaultdict(Decimal)
    for record in read_topic(bootstrap, f"{prefix}genai.cost.focus"):
        row = orjson.loads(record.value)
        billed[row["x_UsageId"]] += Decimal(row["BilledCost"])
    return dict(billed)


def test_every_span_is_forwarded_and_model_calls_carry_their_billed_cost(
        broker: EmbeddedBroker, worker: tuple[str, int]) -> None:
    prefix, worker_port = worker
    sink = OtlpGrpcSink(free_port()).start()
    config = collector_config(broker.bootstrap_servers, prefix)
    config = replace(config, collector=replace(config.collector, forward=ForwardConfig(
        endpoint=f"127.0.0.1:{sink.port}", max_batch_spans=256)))
    collector = CollectorThread(config).start()
    try:
        sent = send_spans(collector.grpc_endpoint, 1000)
        sampled = send_spans(collector.grpc_endpoint, 10, FixedThreshold("e"))  # kept at 1/8: 8 calls each
        received = sink.wait_for(len(sent) + len(sampled))
        events = read_usage(broker.bootstrap_servers, f"{prefix}genai.usage", min_events=600 + 6)
        billed = billed_by_call(broker.bootstrap_servers, prefix, worker_port, len(events))
    finally:
        collector.stop()
        sink.stop()

    assert set(received) == set(sent) | set(sampled)  # the same spans out, nothing more, nothing less
    assert len(events) == 606 and len(billed) > 300  # the model calls, and most of them priced
    teams = {event.id: event.attribution["team"] for event in events}
    costs = {}
    for ids, span in received.items():
        attrs = attributes(span)
        assert not any(is_content(key) for key in attrs), span.name
        assert SECRET not in str(span)  # not in attributes, events or anywhere else
        usage_id = "-".join(ids)
        if usage_id in billed:
            assert attrs[COST_AMOUNT] == float(billed[usage_id])
            assert attrs[COST_CURRENCY] == "USD" and attrs[COST_SOURCE] == "local"
            assert attrs[ATTRIBUTION_PREFIX + "team"] == teams[usage_id]  # as the pipeline attributed it
            costs[ids] = Decimal(str(attrs[COST_AMOUNT]))
        else:
            assert COST_AMOUNT not in attrs  # not a model call, or no price: never a cost of 0
        kind = (sent.get(ids) or sampled[ids])[0]
        if kind != "model":
            assert COST_AMOUNT not in attrs and not any(k.startswith(ATTRIBUTION_PREFIX) for k in attrs)
    # the sampled calls cost 8 times the same calls measured
    measured_cost = {orjson.dumps(sent[ids][1]): cost for ids, cost in costs.items() if ids in sent}
    for ids, cost in costs.items():
        if ids in sampled:
            assert cost == 8 * measured_cost[orjson.dumps(sampled[ids][1])]


def test_a_downstream_outage_blocks_nothing_and_drops_and_retries_are_counted(
        broker: EmbeddedBroker, worker: tuple[str, int]) -> None:
    prefix, worker_port = worker
    sink = OtlpGrpcSink(free_port())  # not listening yet: the downstream endpoint is down
    config = collector_config(broker.bootstrap_servers, prefix)
    config = replace(config, collector=replace(config.collector, forward=ForwardConfig(
        endpoint=f"127.0.0.1:{sink.port}", queue_spans=300, max_batch_spans=100, retry_initial_s=0.2,
        retry_max_s=1.0, max_elapsed_s=OUTAGE_S + 60)))
    before = {reason: sample("spendstream_collector_forward_spans_dropped_total", {"reason": reason})
              for reason in ("queue_full", "retries_exhausted")}
    retries_before = sample("spendstream_collector_forward_retries_total")
    collector = CollectorThread(config).start()
    try:
        started = time.monotonic()
        sent = send_spans(collector.grpc_endpoint, 1000)
        # cost accounting went on during the outage: every call is on Kafka and priced before the sink is up
        events = read_usage(broker.bootstrap_servers, f"{prefix}genai.usage", min_events=600)
        billed = billed_by_call(broker.bootstrap_servers, prefix, worker_port, len(events))
        assert len(events) == 600 and len(billed) > 300
        while time.monotonic() - started < OUTAGE_S:
            time.sleep(0.2)
        dropped = {reason: sample("spendstream_collector_forward_spans_dropped_total", {"reason": reason}) - n
                   for reason, n in before.items()}
        assert dropped["queue_full"] > 0  # the queue is bounded: 1,000 spans do not fit in 300
        assert sample("spendstream_collector_forward_retries_total") > retries_before
        sink.start()
        deadline = time.monotonic() + 60
        while len(sink.spans) + dropped["queue_full"] < len(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        collector.stop()
        sink.stop()
    # what was queued arrived once the endpoint was back, and every span is either there or counted as dropped
    assert len(sink.spans) + dropped["queue_full"] == len(sent)
    assert set(sink.spans) <= set(sent)
    assert sample("spendstream_collector_forward_spans_dropped_total",
                  {"reason": "retries_exhausted"}) == before["retries_exhausted"]


def test_forwarding_over_grpc_with_mutual_tls(broker: EmbeddedBroker, tmp_path: Path) -> None:
    ca = Authority(tmp_path, "backend")
    server, client = ca.issue("localhost", server=True), ca.issue("spendstream", server=False)
    credentials = grpc.ssl_server_credentials([(server.key.read_bytes(), server.cert.read_bytes())],
                                              root_certificates=ca.cert_file.read_bytes(), require_client_auth=True)
    sink = OtlpGrpcSink(free_port(), credentials).start()
    names = new_topics(broker.bootstrap_servers)
    config = collector_config(broker.bootstrap_servers, names.prefix)
    config = replace(config, collector=replace(config.collector, forward=ForwardConfig(
        endpoint=f"localhost:{sink.port}", ca_file=str(ca.cert_file), cert_file=str(client.cert),
        key_file=str(client.key))))
    collector = CollectorThread(config).start()
    try:
        sent = send_spans(collector.grpc_endpoint, 20)
        received = sink.wait_for(len(sent), timeout_s=30)
    finally:
        collector.stop()
        sink.stop()
    assert set(received) == set(sent)


class OtlpHttpSink(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], ExportTraceServiceRequest]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        type(self).received.append((dict(self.headers), ExportTraceServiceRequest.FromString(body)))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_forwarding_over_otlp_http_sends_headers_and_gzip(broker: EmbeddedBroker) -> None:
    names = new_topics(broker.bootstrap_servers)
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpHttpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = collector_config(broker.bootstrap_servers, names.prefix)
    config = replace(config, collector=replace(config.collector, forward=ForwardConfig(
        endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1/traces", protocol="http/protobuf",
        headers={"x-api-key": "k-123"})))
    collector = CollectorThread(config).start()
    try:
        sent = send_spans(collector.grpc_endpoint, 20)
        deadline = time.monotonic() + 30
        while sum(len(ss.spans) for _, r in OtlpHttpSink.received for rs in r.resource_spans
                  for ss in rs.scope_spans) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        collector.stop()
        server.shutdown()
    spans = {(s.trace_id.hex(), s.span_id.hex()): s for _, r in OtlpHttpSink.received for rs in r.resource_spans
             for ss in rs.scope_spans for s in ss.spans}
    assert set(spans) == set(sent)
    assert all(h.get("x-api-key") == "k-123" and h.get("Content-Encoding") == "gzip" for h, _ in OtlpHttpSink.received)
    assert any(COST_AMOUNT in attributes(s) for s in spans.values())
