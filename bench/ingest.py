"""Ingest throughput: spans/s through the collector to the broker, against a bare decode-and-walk baseline.

Both are measured in this run on this machine, on the same 512-span OTLP payload:
  baseline   ExportTraceServiceRequest.FromString + touch every attribute (one core, no I/O)
  core       the collector's pure ingest path (decode, normalise, attribute, encode), no I/O
  end-to-end OTLP/gRPC client process → `spendstream collector` process → embedded broker,
             answered only after the broker acknowledged (acks=all)
Prints the ratios and writes a bar chart to bench/results/ingest.svg.

    .venv/bin/python bench/ingest.py [--seconds 10] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from collector.ingest import NestedCallFilter, ingest_request
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from schemas.config import Config, KafkaConfig
from schemas.usage import encode_usage_batch
from tests.support import free_port, make_request, make_span

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
    return make_request(spans, {"service.name": "support-bot", "team.name": "customer-support",
                                "deployment.environment.name": "prod", "telemetry.sdk.language": "python",
                                "telemetry.sdk.name": "opentelemetry", "host.name": "pod-1"}).SerializeToString()


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


def core(payload: bytes, config: Config, nested: NestedCallFilter) -> None:
    result = ingest_request(ExportTraceServiceRequest.FromString(payload), config, None, nested,
                            user_key=BENCH_USER_KEY)
    encode_usage_batch(result.events)


def end_to_end(payload: bytes, seconds: float, concurrency: int) -> float:
    broker = EmbeddedBroker(free_port())
    broker.start()
    grpc_port, metrics_port = free_port(), free_port()
    asyncio.run(ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, partitions=4), {}))
    collector = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "collector", "--kafka", broker.bootstrap_servers, "--grpc-port",
         str(grpc_port), "--http-port", str(free_port()), "--metrics-port", str(metrics_port),
         "--log-level", "warning"], env={**os.environ, "SPENDSTREAM_USER_ID_KEY": BENCH_USER_KEY.decode()})
    try:
        with tempfile.NamedTemporaryFile(suffix=".pb", delete=False) as f:
            f.write(payload)
        time.sleep(2.0)
        load = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "otlp_load.py"), f"localhost:{grpc_port}", f.name,
             str(seconds), str(concurrency)], capture_output=True, text=True, check=True)
        os.unlink(f.name)
        stats = json.loads(load.stdout)
    finally:
        collector.terminate()
        collector.wait(timeout=20)
        broker.stop()
    rate = stats["spans"] / stats["seconds"]
    print(f"  {'end-to-end (gRPC → Kafka, acked)':<32} {rate:>10,.0f} spans/s  "
          f"({stats['requests']} requests, {stats['errors']} errors, concurrency {concurrency})", flush=True)
    return rate


def measure(payload: bytes, label: str, seconds: float, concurrency: int) -> dict[str, float]:
    print(f"{label}: {SPANS_PER_REQUEST} spans, {len(payload):,} bytes", flush=True)
    config = Config()
    rates = {
        "bare decode + walk (baseline)": timed(lambda: baseline(payload), seconds / 2, "baseline decode+walk"),
        "collector core (no I/O)": timed(lambda: core(payload, config, NestedCallFilter()), seconds / 2,
                                         "collector core"),
        "end to end to Kafka": end_to_end(payload, seconds, concurrency),
    }
    base = rates["bare decode + walk (baseline)"]
    print(f"  ratio core / baseline:        {rates['collector core (no I/O)'] / base:.2f}")
    print(f"  ratio end-to-end / baseline:  {rates['end to end to Kafka'] / base:.2f}   (DESIGN target: >= 0.5)",
          flush=True)
    return {f"{name} [{label}]": rate for name, rate in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; each figure is measured in this run", flush=True)
    rates = measure(build_payload(), "metadata only", args.seconds, args.concurrency)
    rates |= measure(build_payload(content=True), "with prompt text", args.seconds, args.concurrency)
    RESULTS.mkdir(exist_ok=True)
    chart = RESULTS / "ingest.svg"
    chart.write_text(bar_chart("OTLP ingest, 512-span requests (spans/s)", rates))
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
