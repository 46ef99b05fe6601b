"""Ingest throughput: spans/s through the collector to the broker, against a bare decode-and-walk baseline.

Both are measured in this run on this machine, on the same 512-span OTLP payload:
  baseline   ExportTraceServiceRequest.FromString + touch every attribute (one core, no I/O)
  core       the collector's pure ingest path (decode, normalise, attribute, encode), no I/O
  end-to-end OTLP/gRPC client process → `spendstream collector` process → embedded broker,
             answered only after the broker acknowledged (acks=all)
  forwarding the same, with processor mode on (`collector.forward`): every span also priced, enriched and
             sent to a downstream OTLP/gRPC receiver (a bare counting server in this process); the two
             collectors take turns on one broker, so the machine's load falls on both alike
  forward core  what processor mode adds per request, no I/O: price the calls, enrich, serialise
Prints the ratios (forwarding / not forwarding is the cost of processor mode), each collector process's CPU time
per 1,000 spans it received (what it costs however much of a shared machine it got: compare changes by this),
and writes a bar chart to bench/results/ingest.svg. With `--compare CHECKOUT`, the collector of another checkout
of the project (e.g. `git worktree add /tmp/main main`) takes turns with these on the same broker, and the ratio
of their CPU per span is printed: a before/after that the machine's changing load does not skew.

    .venv/bin/python bench/ingest.py [--seconds 10] [--concurrency 4] [--compare CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.roles import cpu_seconds
from collector.attribution import SettledAttributions
from collector.enrich import enrich_request, span_costs
from collector.ingest import NestedCallFilter, ingest_request
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from pipeline.pricing import PriceCatalog
from pipeline.pricing.focus import Billing
from schemas.config import Config, KafkaConfig
from schemas.usage import UsageEvent, encode_usage_batch
from tests.support import free_port, make_request, make_span, metric

SPANS_PER_REQUEST = 512
RESULTS = Path(__file__).parent / "results"


PROMPT = "You are a support assistant. Answer from the context only. " * 12  # ~700 chars
COMPLETION = "Based on the documentation, you can reset the password from the account page. " * 4


def build_payload(*, content: bool = False) -> bytes:
    """512 spans as an instrumented service sends them: model calls plus the HTTP spans around them.

    With `content`, the model-call spans also carry prompt and completion text, as OpenLLMetry and
    OpenLIT record by default (the collector drops it; the baseline still has to decode it).
    """
    spans = []
    for i in range(SPANS_PER_REQUEST):
        if i % 4 == 3:
            spans.append(make_span({"http.request.method": "POST", "url.full": "https://api.openai.com/v1/chat",
                                    "http.response.status_code": 200, "server.address": "api.openai.com"}))
            continue
        spans.append(make_span({
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.response.id": f"chatcmpl-{i}", "gen_ai.response.finish_reasons": "stop",
            "gen_ai.usage.input_tokens": 1200 + i, "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read.input_tokens": 512, "gen_ai.request.temperature": 0.2,
            "gen_ai.request.max_tokens": 1024, "server.address": "api.openai.com", "server.port": 443,
            "feature.name": f"use-case-{i % 7}", "gen_ai.virtual_key": f"key-{i % 5}",
            "enduser.id": f"user-{i % 50}",
            **({"gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": PROMPT,
                "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": f"question {i}: how do I reset it?",
                "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": COMPLETION}
               if content else {}),
        }))
    request = make_request(spans, {"service.name": "support-bot", "team.name": "customer-support",
                                   "deployment.environment.name": "prod", "telemetry.sdk.language": "python",
                                   "telemetry.sdk.name": "opentelemetry", "host.name": "pod-1"})
    payload: bytes = request.SerializeToString()
    return payload


def timed(fn: object, seconds: float, label: str) -> float:
    """Calls of fn per second over `seconds`, after a warm-up."""
    for _ in range(20):
        fn()  # type: ignore[operator]
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(10):
            fn()  # type: ignore[operator]
        calls += 10
    print(f"  {label:<32} {calls / elapsed * SPANS_PER_REQUEST:>10,.0f} spans/s", flush=True)
    return calls / elapsed * SPANS_PER_REQUEST


def baseline(payload: bytes) -> None:
    """Decode and read every attribute's key and scalar value: the least any consumer of the data does."""
    request = ExportTraceServiceRequest.FromString(payload)
    for rs in request.resource_spans:
        for kv in rs.resource.attributes:
            _ = (kv.key, getattr(kv.value, kv.value.WhichOneof("value") or "string_value"))
        for ss in rs.scope_spans:
            for span in ss.spans:
                for kv in span.attributes:
                    _ = (kv.key, getattr(kv.value, kv.value.WhichOneof("value") or "string_value"))


BENCH_USER_KEY = b"bench-user-id-key-0123456789abcdef"  # user ids are HMAC-hashed, as in production


def core(payload: bytes, config: Config, nested: NestedCallFilter, settled: SettledAttributions) -> None:
    result = ingest_request(ExportTraceServiceRequest.FromString(payload), config, None, nested,
                            user_key=BENCH_USER_KEY, settled=settled)
    encode_usage_batch(result.events)


def forward_core(payload: bytes, events: list[UsageEvent], catalog: PriceCatalog, billing: Billing) -> None:
    """What processor mode adds to a request: price its calls, enrich and strip its spans, serialise it (the
    decode is only here because enriching changes the request; it is a few % of the rest)."""
    request = ExportTraceServiceRequest.FromString(payload)
    enrich_request(request, span_costs(events, catalog, billing), keep_content=False)
    request.SerializeToString()


_EMPTY_ANSWER: bytes = ExportTraceServiceResponse().SerializeToString()


class CountingReceiver:
    """A bare OTLP/gRPC receiver: counts the bytes and requests it is sent, decodes nothing."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": grpc.unary_unary_rpc_method_handler(
                self._export, request_deserializer=None, response_serializer=None)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: bytes, context: object) -> bytes:
        with self._lock:
            self.requests += 1
        return _EMPTY_ANSWER


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the collector listens (a fixed sleep is too short on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the collector did not listen on {port} within {timeout_s:g} s")


def start_collector(bootstrap: str, config_args: list[str], checkout: Path | None = None
                    ) -> tuple[subprocess.Popen[bytes], int, int]:
    """A `spendstream collector` process, of this code or of another `checkout` (its root): (process, its gRPC
    port, its metrics port), once it listens."""
    grpc_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "collector", "--kafka", bootstrap, "--grpc-port", str(grpc_port),
         "--http-port", str(free_port()), "--metrics-port", str(metrics_port), "--log-level", "warning",
         *config_args], cwd=checkout or Path(__file__).resolve().parent.parent,
        env={**os.environ, "SPENDSTREAM_USER_ID_KEY": BENCH_USER_KEY.decode()})
    wait_for_port(grpc_port, process)
    return process, grpc_port, metrics_port


def load(port: int, payload_file: str, seconds: float, concurrency: int) -> dict[str, int | float]:
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "otlp_load.py"), f"localhost:{port}",
                           payload_file, str(seconds), str(concurrency)], capture_output=True, text=True, check=True)
    stats: dict[str, int | float] = json.loads(done.stdout)
    return stats


def forward_counts(metrics_port: int) -> tuple[float, float, float]:
    """A forwarding collector's spans received, forwarded and dropped so far."""
    dropped = sum(metric(metrics_port, f'spendstream_collector_forward_spans_dropped_total{{reason="{r}"}}')
                  for r in ("queue_full", "retries_exhausted", "refused", "failed", "shutdown"))
    return (received(metrics_port), metric(metrics_port, "spendstream_collector_forward_spans_sent_total"), dropped)


def received(metrics_port: int) -> float:
    """Spans a collector received over OTLP/gRPC so far (clients' warm-up requests included)."""
    return metric(metrics_port, 'spendstream_collector_spans_received_total{transport="grpc"}')


@dataclass
class Turns:
    """One collector process of the end-to-end run and what its turns added up to."""

    label: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    forwarding: bool
    spans: float = 0.0  # sent and answered, as the clients count them
    seconds: float = 0.0
    errors: int = 0
    cpu_seconds: float = 0.0
    received: float = 0.0  # as the collector counts them (warm-ups included): what its CPU time is divided by

    def take(self, payload_file: str, seconds: float, concurrency: int) -> None:
        """Load it for `seconds`; a forwarding collector's queue is then left to drain, within its turn."""
        cpu_before, received_before = cpu_seconds(self.process.pid), received(self.metrics_port)
        stats = load(self.port, payload_file, seconds, concurrency)
        self.spans += stats["spans"]
        self.seconds += stats["seconds"]
        self.errors += int(stats["errors"])
        deadline = time.monotonic() + 60  # until every span received is forwarded or dropped
        while self.forwarding and time.monotonic() < deadline:
            spans_in, forwarded, dropped = forward_counts(self.metrics_port)
            if forwarded + dropped >= spans_in:
                break
            time.sleep(0.2)
        self.cpu_seconds += cpu_seconds(self.process.pid) - cpu_before
        self.received += received(self.metrics_port) - received_before

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_seconds / self.received * 1e6


def end_to_end(payload: bytes, seconds: float, concurrency: int, rounds: int = 4,
               compare: Path | None = None) -> tuple[float, float]:
    """Spans/s of a plain collector and of one that forwards every span (to a counting receiver), both on one
    broker; with `compare`, also a plain collector of that checkout. They take turns, `rounds` times, so that a
    change in the machine's load (other processes) falls on all alike; after each forwarding turn its queue is
    left to drain, so none of its work overlaps the others'. Also prints each one's CPU time per 1,000 spans."""
    broker = EmbeddedBroker(free_port())
    broker.start()
    asyncio.run(ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, partitions=4), {}))
    receiver = CountingReceiver()
    config_file = Path(tempfile.mkdtemp()) / "spendstream.yaml"
    config_file.write_text(f"collector:\n  forward: {{endpoint: '127.0.0.1:{receiver.port}'}}\n")
    with tempfile.NamedTemporaryFile(suffix=".pb", delete=False) as f:
        f.write(payload)
    collectors: list[Turns] = []
    try:
        collectors.append(Turns("end-to-end (gRPC → Kafka, acked)",
                                *start_collector(broker.bootstrap_servers, []), forwarding=False))
        collectors.append(Turns("end-to-end + forwarding",
                                *start_collector(broker.bootstrap_servers, ["--config", str(config_file)]),
                                forwarding=True))
        if compare is not None:
            collectors.append(Turns(f"end-to-end, {compare.name}",
                                    *start_collector(broker.bootstrap_servers, [], compare), forwarding=False))
        for _ in range(rounds):
            for turns in collectors:
                turns.take(f.name, max(seconds / rounds, 2.0), concurrency)
        spans_in, forwarded, dropped = forward_counts(collectors[1].metrics_port)
    finally:
        for turns in collectors:
            turns.process.terminate()
            turns.process.wait(timeout=20)
        broker.stop()
        receiver.server.stop(grace=None)
        os.unlink(f.name)
    for turns in collectors:
        print(f"  {turns.label:<32} {turns.spans / turns.seconds:>10,.0f} spans/s  ({turns.errors} errors, "
              f"concurrency {concurrency}, {rounds} turns), CPU {turns.cpu_ms_per_1000:.1f} ms per 1,000 spans",
              flush=True)
    print(f"  {'':<32} forwarded {forwarded:,.0f} of the {spans_in:,.0f} spans received (warm-ups included), "
          f"dropped {dropped:,.0f}", flush=True)
    if compare is not None:
        print(f"  collector CPU per span, this / {compare.name}: "
              f"{collectors[0].cpu_ms_per_1000 / collectors[2].cpu_ms_per_1000:.2f}", flush=True)
    plain, forwarding = collectors[0], collectors[1]
    return plain.spans / plain.seconds, forwarding.spans / forwarding.seconds


def measure(payload: bytes, label: str, seconds: float, concurrency: int,
            compare: Path | None = None) -> dict[str, float]:
    print(f"{label}: {SPANS_PER_REQUEST} spans, {len(payload):,} bytes", flush=True)
    config = Config()
    catalog, billing = PriceCatalog.from_config(config), Billing.from_config(config)
    events = ingest_request(ExportTraceServiceRequest.FromString(payload), config, None, NestedCallFilter(),
                            user_key=BENCH_USER_KEY).events
    settled = SettledAttributions()
    rates = {
        "bare decode + walk (baseline)": timed(lambda: baseline(payload), seconds / 2, "baseline decode+walk"),
        # a collector keeps its attributions from one request to the next: so does the core, over its calls
        "collector core (no I/O)": timed(lambda: core(payload, config, NestedCallFilter(), settled), seconds / 2,
                                         "collector core"),
        "forward core (no I/O)": timed(lambda: forward_core(payload, events, catalog, billing), seconds / 2,
                                       "forward core (price+enrich)"),
    }
    rates["end to end to Kafka"], rates["end to end, forwarding"] = end_to_end(payload, seconds, concurrency,
                                                                                compare=compare)
    base = rates["bare decode + walk (baseline)"]
    print(f"  ratio core / baseline:        {rates['collector core (no I/O)'] / base:.2f}")
    print(f"  ratio end-to-end / baseline:  {rates['end to end to Kafka'] / base:.2f}   (DESIGN target: >= 0.5)")
    print(f"  ratio forwarding / not:       {rates['end to end, forwarding'] / rates['end to end to Kafka']:.2f}   "
          "(the cost of processor mode, same run)", flush=True)
    return {f"{name} [{label}]": rate for name, rate in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run the collector of this checkout (e.g. a worktree of main), taking turns")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; each figure is measured in this run", flush=True)
    rates = measure(build_payload(), "metadata only", args.seconds, args.concurrency, args.compare)
    rates |= measure(build_payload(content=True), "with prompt text", args.seconds, args.concurrency, args.compare)
    RESULTS.mkdir(exist_ok=True)
    chart = RESULTS / "ingest.svg"
    chart.write_text(bar_chart("OTLP ingest, 512-span requests (spans/s)", rates))
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
