"""TLS and mutual TLS on both OTLP receivers, with the real OpenTelemetry SDK exporters."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pipeline.kafka.broker import EmbeddedBroker
from schemas.config import TlsConfig
from schemas.errors import ConfigError
from schemas.topics import TopicNames
from tests.dialects import DIALECTS
from tests.support import CollectorThread, collector_config, read_usage
from tests.tls_certs import Authority, Pair

pytestmark = pytest.mark.e2e
RESOURCE = {"service.name": "support-bot", "team.name": "customer-support", "deployment.environment.name": "prod",
            "feature.name": "support-rag"}


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory, "spendstream")
        self.server = self.ca.issue("server", server=True)
        self.client = self.ca.issue("app", server=False)
        self.rogue = Authority(directory, "rogue").issue("app", server=False)  # right name, wrong CA


@pytest.fixture(autouse=True)
def no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests prefers $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE over the session's CA file the SDK's HTTP
    exporter sets from certificate_file; machines that set them would make that exporter ignore our CA."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def start(broker: EmbeddedBroker, topics: TopicNames, tls: TlsConfig) -> CollectorThread:
    config = collector_config(broker.bootstrap_servers, topics.prefix)
    return CollectorThread(replace(config, collector=replace(config.collector, tls=tls))).start()


@pytest.fixture
def tls_collector(broker: EmbeddedBroker, topics: TopicNames, pki: Pki) -> Iterator[CollectorThread]:
    running = start(broker, topics, TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    yield running
    running.stop()


@pytest.fixture
def mtls_collector(broker: EmbeddedBroker, topics: TopicNames, pki: Pki) -> Iterator[CollectorThread]:
    running = start(broker, topics, TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                                              client_ca_file=str(pki.ca.cert_file)))
    yield running
    running.stop()


def model_call() -> ReadableSpan:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tls-test").start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT,
                                                               attributes=DIALECTS[0].attrs):
        pass
    provider.shutdown()
    [span] = memory.get_finished_spans()
    return span


def grpc_exporter(collector: CollectorThread, pki: Pki, client: Pair | None) -> GrpcExporter:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    return GrpcExporter(endpoint=collector.grpc_endpoint, credentials=credentials, timeout=3)


def http_exporter(collector: CollectorThread, pki: Pki, client: Pair | None) -> HttpExporter:
    assert collector.endpoints
    return HttpExporter(endpoint=f"https://localhost:{collector.endpoints.http_port}/v1/traces",
                        certificate_file=str(pki.ca.cert_file),
                        client_certificate_file=str(client.cert) if client else None,
                        client_key_file=str(client.key) if client else None, timeout=3)


def exporter_for(transport: str, collector: CollectorThread, pki: Pki, client: Pair | None) -> SpanExporter:
    return grpc_exporter(collector, pki, client) if transport == "grpc" else http_exporter(collector, pki, client)


def usage_ids(broker: EmbeddedBroker, topics: TopicNames, min_events: int) -> set[str]:
    return {e.id for e in read_usage(broker.bootstrap_servers, topics.usage, min_events=min_events, timeout_s=4)}


def span_id(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}-{ctx.span_id:016x}"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_tls_with_the_sdk_exporter(tls_collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames,
                                   pki: Pki, transport: str) -> None:
    span = model_call()
    exporter = exporter_for(transport, tls_collector, pki, None)
    assert exporter.export([span]) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert span_id(span) in usage_ids(broker, topics, 1)


def test_plaintext_client_is_refused_by_a_tls_collector(tls_collector: CollectorThread) -> None:
    insecure = GrpcExporter(endpoint=tls_collector.grpc_endpoint, insecure=True, timeout=2)
    assert insecure.export([model_call()]) == SpanExportResult.FAILURE
    insecure.shutdown()
    assert tls_collector.endpoints
    # typed as the SDK interface: the HTTP exporter's own shutdown has no annotations
    plain: SpanExporter = HttpExporter(endpoint=f"http://localhost:{tls_collector.endpoints.http_port}/v1/traces",
                                       timeout=2)
    assert plain.export([model_call()]) == SpanExportResult.FAILURE
    plain.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_collector: CollectorThread, broker: EmbeddedBroker,
                                                       topics: TopicNames, pki: Pki, transport: str) -> None:
    span = model_call()
    exporter = exporter_for(transport, mtls_collector, pki, pki.client)
    assert exporter.export([span]) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert span_id(span) in usage_ids(broker, topics, 1)


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_a_client_without_a_valid_certificate(
    mtls_collector: CollectorThread, broker: EmbeddedBroker, topics: TopicNames, pki: Pki, transport: str, who: str,
) -> None:
    span = model_call()
    exporter = exporter_for(transport, mtls_collector, pki, None if who == "no certificate" else pki.rogue)
    assert exporter.export([span]) == SpanExportResult.FAILURE
    exporter.shutdown()
    assert span_id(span) not in usage_ids(broker, topics, 0)


def test_mtls_handshake_itself_fails_without_a_certificate(mtls_collector: CollectorThread, pki: Pki) -> None:
    """Refused by TLS, before any HTTP: no request is ever read from such a client."""
    assert mtls_collector.endpoints
    context = ssl.create_default_context(cafile=str(pki.ca.cert_file))
    answer = b""
    with socket.create_connection(("127.0.0.1", mtls_collector.endpoints.http_port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3 reports a missing client certificate after the handshake, on the first read
                tls.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
                answer = tls.recv(1024)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass
    assert answer == b"", "the collector answered a client without a certificate"


def test_min_version_13_refuses_a_tls_12_client(broker: EmbeddedBroker, topics: TopicNames, pki: Pki) -> None:
    running = start(broker, topics, TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                                              min_version="1.3"))
    try:
        assert running.endpoints
        context = ssl.create_default_context(cafile=str(pki.ca.cert_file))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", running.endpoints.http_port), timeout=5) as raw, \
                pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")
    finally:
        running.stop()


def test_a_missing_certificate_file_is_named_at_start(broker: EmbeddedBroker, topics: TopicNames, pki: Pki,
                                                      tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"collector\.tls\.key_file: cannot read"):
        start(broker, topics, TlsConfig(cert_file=str(pki.server.cert), key_file=str(tmp_path / "missing.key")))


def test_min_version_13_on_grpc_is_checked_per_call() -> None:
    """grpc's Python API cannot refuse TLS 1.2 in the handshake: the handler refuses such calls."""
    from collector._tls import tls_version_refusal  # noqa: PLC0415

    assert tls_version_refusal({"ssl_tls_version": [b"TLSv1.3"]}, "1.3") is None
    assert "negotiated TLSv1.2" in (tls_version_refusal({"ssl_tls_version": [b"TLSv1.2"]}, "1.3") or "")
    assert tls_version_refusal({}, "1.3") is not None
    assert tls_version_refusal({"ssl_tls_version": [b"TLSv1.2"]}, "1.2") is None


def test_min_version_13_lets_a_tls_13_sdk_client_through_on_both(broker: EmbeddedBroker, topics: TopicNames,
                                                                  pki: Pki) -> None:
    running = start(broker, topics, TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                                              min_version="1.3"))
    try:
        for transport in ("grpc", "http"):
            exporter = exporter_for(transport, running, pki, None)
            assert exporter.export([model_call()]) == SpanExportResult.SUCCESS, transport
            exporter.shutdown()
    finally:
        running.stop()
