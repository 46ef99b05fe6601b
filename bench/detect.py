"""Detection latency: from a span's arrival at the collector to the breaker command it causes.

    .venv/bin/python bench/detect.py [--probes N] [--loads 0,1000,4000]

Starts `spendstream run` (embedded broker, collector, one worker, exporter), keeps a steady
background load of realistic model-call spans (distinct calls: every request has new ids) at each
load level, and sends probes: one expensive call on a key whose ceiling it exceeds at once. A
probe's latency is from sending its OTLP export (the collector answers after Kafka acknowledged
it) to reading the `open` command for that key on `genai.breaker.commands`. Two more scenarios,
at the middle load level:

- new scope: a team never seen before makes a run of three expensive calls after the pipeline has
  watched for over a minute; its known baseline is zero, so it trips;
- retry storm: every background request is sent twice, as OTLP exporters do after a timeout.

Prints p50/p99 per scenario and their ratio to the idle run (the baseline, measured in the same
run), and the dedupe state's memory per usage id next to a plain set of the same ids (the
baseline); draws bench/results/detect.svg.
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
import tracemalloc
from pathlib import Path

import grpc
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.ingest import SPANS_PER_REQUEST, build_payload
from pipeline.pricing.dedupe import SeenUsage
from tests.e2e.running import read_until
from tests.support import free_port, make_request, make_span

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RESULTS = Path(__file__).parent / "results"
CALL_SPANS = SPANS_PER_REQUEST * 3 // 4  # build_payload: three in four spans are model calls
#: a probe whose command has not come by then is a failure of detection, not a slow one
PROBE_TIMEOUT_S = 60.0


def policy(probes: int) -> str:
    keys = "\n".join(f"  - {{key: probe-{i}, circuit_breaker: {{cost_velocity_per_min: 1}}}}" for i in range(probes))
    return f"velocity: {{scopes: [team], rate_window: 10s}}\nkeys:\n{keys}\n"


def probe_payload(breaker: str) -> bytes:
    """`key=probe-N`: one call over the key's ceiling; `team=new-N`: a new team's run of three calls."""
    dimension, value = breaker.split("=")
    calls = 3 if dimension == "team" else 1
    spans = [make_span({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                        "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1_000_000,
                        "gen_ai.usage.output_tokens": 1000, "feature.name": "probe",
                        **({"gen_ai.virtual_key": value} if dimension == "key" else {})}) for _ in range(calls)]
    wire: bytes = make_request(spans, {"service.name": "probe", "team.name": value if dimension == "team" else "bench",
                                       "deployment.environment.name": "prod"}).SerializeToString()
    return wire


class BackgroundLoad:
    """`spans_per_s` model-call spans per second (in 512-span requests, as an SDK batches them)."""

    def __init__(self, endpoint: str, spans_per_s: float, *, retries: bool = False) -> None:
        self._call = grpc.insecure_channel(endpoint).unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self._interval = CALL_SPANS / spans_per_s if spans_per_s else 0.0
        self._sends = 2 if retries else 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        next_at = time.monotonic()
        while self._interval and not self._stop.is_set():
            payload = build_payload()  # new calls: a repeat would be skipped as a retry
            for _ in range(self._sends):
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


async def measure(endpoint: str, bootstrap: str, breakers: list[str], spans_per_s: float, *,
                  retries: bool = False) -> list[float]:
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
        with BackgroundLoad(endpoint, spans_per_s, retries=retries):
            await asyncio.sleep(3)  # let the load settle
            for breaker in breakers:
                sent = time.perf_counter()
                await call(probe_payload(breaker), timeout=30)
                while True:
                    if time.perf_counter() - sent > PROBE_TIMEOUT_S:
                        raise SystemExit(f"no open command for {breaker} within {PROBE_TIMEOUT_S:g} s")
                    batch = await consumer.getmany(timeout_ms=50)
                    seen = [orjson.loads(r.value) for rs in batch.values() for r in rs]
                    if any(c["breaker_id"] == f"rate|{breaker}" and c["state"] == "open" for c in seen):
                        latencies.append(time.perf_counter() - sent)
                        break
                if sys.stdout.isatty():
                    print(f"\r  load {spans_per_s:>6,.0f} spans/s: probe {len(latencies)}/{len(breakers)} "
                          f"{latencies[-1] * 1000:6.0f} ms", end="", flush=True)
                await asyncio.sleep(0.3)
    finally:
        await consumer.stop()
    print(f"\r  load {spans_per_s:>6,.0f} spans/s: {len(latencies)} probes done", flush=True)
    return latencies


def dedupe_bytes_per_id(ids: int = 1_000_000) -> tuple[float, float]:
    """Memory per remembered usage id: SeenUsage (sealed minutes) and, as the baseline, a set of the same ids
    (the table alone: the id strings exist anyway)."""
    usage_ids = [f"{i:032x}-{i * 7919 % 2**64:016x}" for i in range(ids)]
    start_s = int(time.time()) - 600
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    seen = SeenUsage(horizon_s=3600)
    for i, usage_id in enumerate(usage_ids):
        seen.first_time(usage_id, start_s + i * 300 // ids)
    seen.advance(start_s + 600)
    ours = tracemalloc.get_traced_memory()[0] - before
    del seen
    before = tracemalloc.get_traced_memory()[0]
    plain = set(usage_ids)
    baseline = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del plain
    return ours / ids, baseline / ids


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=30, help="probes per load level (default 30)")
    parser.add_argument("--loads", default="0,1000,4000", help="background spans/s per level (default 0,1000,4000)")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="spendstream-detect-"))
    (tmp / "spendstream.yaml").write_text(policy(args.probes * (len(loads) + 1)))  # + the retry storm's probes
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
        started = time.monotonic()
        endpoint, bootstrap = f"localhost:{grpc_port}", f"127.0.0.1:{broker_port}"
        results: dict[str, list[float]] = {}
        for level, load in enumerate(loads):
            keys = [f"key=probe-{level * args.probes + i}" for i in range(args.probes)]
            results[f"{load:,.0f} spans/s"] = asyncio.run(measure(endpoint, bootstrap, keys, load))
        middle = loads[len(loads) // 2]
        retry_keys = [f"key=probe-{len(loads) * args.probes + i}" for i in range(args.probes)]
        results[f"{middle:,.0f} spans/s, each sent twice"] = asyncio.run(
            measure(endpoint, bootstrap, retry_keys, middle, retries=True))
        time.sleep(max(0.0, 65 - (time.monotonic() - started)))  # new scopes: the pipeline has watched a minute
        new_teams = [f"team=new-{i}" for i in range(args.probes)]
        results[f"new team at {middle:,.0f} spans/s"] = asyncio.run(measure(endpoint, bootstrap, new_teams, middle))
    finally:
        run.terminate()
        run.wait(timeout=30)
    base = percentile(next(iter(results.values())), 50)
    chart: dict[str, float] = {}
    for scenario, values in results.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        print(f"  {scenario:>32}:  p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms  "
              f"(p50 {p50 / base:.2f}x the idle p50)")
        chart[f"p50, {scenario}"] = p50 * 1000
        chart[f"p99, {scenario}"] = p99 * 1000
    ours, plain = dedupe_bytes_per_id()
    print(f"  dedupe state: {ours:.1f} bytes per remembered usage id; a set of the same ids, its table alone: "
          f"{plain:.1f} ({ours / plain:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "detect.svg").write_text(bar_chart("span → breaker command latency (ms; ratio to idle p50)",
                                                  chart, baseline=base * 1000, unit=" ms"))
    print(f"chart: {RESULTS / 'detect.svg'}")


if __name__ == "__main__":
    main()
