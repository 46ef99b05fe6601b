"""Detection latency: from a span's arrival at the collector to the breaker command it causes.

    .venv/bin/python bench/detect.py [--probes N] [--loads 0,1000,4000]

Starts `spendstream run` (embedded broker, collector, one worker, exporter), keeps a steady
background load of realistic model-call spans at each load level, and sends probes: one
expensive call on a key whose ceiling it exceeds at once. A probe's latency is from sending its
OTLP export (the collector answers after Kafka acknowledged it) to reading the `open` command for
that key on `genai.breaker.commands`. Prints p50/p99 per load level and their ratio to the idle
run (the baseline, measured in the same run); draws bench/results/detect.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.ingest import SPANS_PER_REQUEST, build_payload
from tests.e2e.running import read_until
from tests.support import free_port, make_request, make_span

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RESULTS = Path(__file__).parent / "results"
CALL_SPANS = SPANS_PER_REQUEST * 3 // 4  # build_payload: three in four spans are model calls


def policy(probes: int) -> str:
    keys = "\n".join(f"  - {{key: probe-{i}, circuit_breaker: {{cost_velocity_per_min: 1}}}}" for i in range(probes))
    return f"velocity: {{scopes: [], rate_window: 10s}}\nkeys:\n{keys}\n"


def probe_payload(key: str) -> bytes:
    now = time.time_ns()
    span = make_span({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                      "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1_000_000,
                      "gen_ai.usage.output_tokens": 1000, "gen_ai.virtual_key": key, "feature.name": "probe"})
    span.start_time_unix_nano, span.end_time_unix_nano = now - 10**9, now
    return make_request([span], {"service.name": "probe", "team.name": "bench",
                                 "deployment.environment.name": "prod"}).SerializeToString()


class BackgroundLoad:
    """`spans_per_s` model-call spans per second (in 512-span requests, as an SDK batches them)."""

    def __init__(self, endpoint: str, spans_per_s: float) -> None:
        self._call = grpc.insecure_channel(endpoint).unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self._interval = CALL_SPANS / spans_per_s if spans_per_s else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        payload = build_payload()
        next_at = time.monotonic()
        while self._interval and not self._stop.is_set():
            self._call(payload, timeout=30)
            self.sent += CALL_SPANS
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


async def measure(endpoint: str, bootstrap: str, keys: list[str], spans_per_s: float) -> list[float]:
    call = grpc.aio.insecure_channel(endpoint).unary_unary(
        EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    latencies = []
    try:
        await consumer.topics()
        tps = [TopicPartition("genai.breaker.commands", p)
               for p in consumer.partitions_for_topic("genai.breaker.commands") or ()]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        with BackgroundLoad(endpoint, spans_per_s):
            await asyncio.sleep(3)  # let the load settle
            for key in keys:
                sent = time.perf_counter()
                await call(probe_payload(key), timeout=30)
                while True:
                    batch = await consumer.getmany(timeout_ms=50)
                    seen = [orjson.loads(r.value) for rs in batch.values() for r in rs]
                    if any(c["breaker_id"] == f"rate|key={key}" and c["state"] == "open" for c in seen):
                        latencies.append(time.perf_counter() - sent)
                        break
                if sys.stdout.isatty():
                    print(f"\r  load {spans_per_s:>6,.0f} spans/s: probe {len(latencies)}/{len(keys)} "
                          f"{latencies[-1] * 1000:6.0f} ms", end="", flush=True)
                await asyncio.sleep(0.3)
    finally:
        await consumer.stop()
    print(f"\r  load {spans_per_s:>6,.0f} spans/s: {len(latencies)} probes done", flush=True)
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=30, help="probes per load level (default 30)")
    parser.add_argument("--loads", default="0,1000,4000", help="background spans/s per level (default 0,1000,4000)")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="spendstream-detect-"))
    (tmp / "spendstream.yaml").write_text(policy(args.probes * len(loads)))
    grpc_port, broker_port, metrics_port = free_port(), free_port(), free_port()
    output = tmp / "run.log"
    with output.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--config", str(tmp / "spendstream.yaml"), "--data-dir",
             str(tmp / "data"), "--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--broker-port",
             str(broker_port), "--metrics-port", str(metrics_port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        read_until(run, output, "try it:", timeout_s=60)
        time.sleep(5)  # the worker joins its groups
        print(f"detection latency, span sent → breaker command read ({args.probes} probes per load level)")
        results: dict[float, list[float]] = {}
        for level, load in enumerate(loads):
            keys = [f"probe-{level * args.probes + i}" for i in range(args.probes)]
            results[load] = asyncio.run(measure(f"localhost:{grpc_port}", f"127.0.0.1:{broker_port}", keys, load))
    finally:
        run.terminate()
        run.wait(timeout=30)
    base = percentile(results[loads[0]], 50)
    chart: dict[str, float] = {}
    for load, values in results.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        print(f"  background load {load:>6,.0f} spans/s:  p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms  "
              f"(p50 {p50 / base:.2f}x the idle p50)")
        chart[f"p50 at {load:,.0f} spans/s"] = p50 * 1000
        chart[f"p99 at {load:,.0f} spans/s"] = p99 * 1000
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "detect.svg").write_text(bar_chart("span → breaker command latency (ms; ratio to idle p50)",
                                                  chart, baseline=base * 1000, unit=" ms"))
    print(f"chart: {RESULTS / 'detect.svg'}")


if __name__ == "__main__":
    main()
