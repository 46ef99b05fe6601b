"""End to end: priced spans/s from OTLP/gRPC until every FOCUS row is in the Parquet files.

    .venv/bin/python bench/e2e.py [--spans 60000] [--workers 1] [--flush-seconds 1] [--compression zstd]
                                  [--profile DIR]

Starts `spendstream run` (embedded broker, collector, `--workers` workers, exporter) in a temp data
dir and warms it up: every role has joined its consumer groups (its lag gauges cover every
partition) and a first batch of spans has reached the files. Then 4 client threads send distinct
model-call spans (new ids, 8 teams, 4 models of 3 providers, cache reads on half of them) in
512-span OTLP/gRPC requests, resending a request the collector refused, as an SDK does. Meanwhile
probes (one call over its key's velocity ceiling each, as bench/detect.py) time span → breaker
command. The rate is spans / (last FOCUS row in the files - first request sent); the files are
checked with DuckDB to hold every span's rows. In the same run, before and after: the bare
protobuf decode-and-walk of the same payloads on one core (the baseline; the ratio is printed).
Also printed: the collector's accept rate, breaker p50/p99 under the load, each role's peak RSS, and
each role's CPU time per 1,000 spans, which does not depend on how much of a shared machine the run
got: their sum bounds what 2 cores of their own could carry.

With --profile DIR, py-spy samples every role during the load (py-spy must be installed: it is in
the `bench` extra) and the busiest functions of each are printed; the raw stacks stay in DIR.
The exporter flushes every --flush-seconds (the default config: 5 s, which alone would cap a
60,000-span run near 10,000 spans/s). The chart goes to bench/results/e2e.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import duckdb
import grpc
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.detect import policy, probe_payload
from bench.ingest import baseline as decode_and_walk
from bench.roles import cpu_seconds, role_pids, rss_mb
from collector.ingest import NestedCallFilter, ingest_request
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.config import Config
from schemas.focus import REQUEST_FILES, ROW_STRUCTS, request_files_glob, row_version
from tests.e2e.running import read_until
from tests.support import free_port, make_request, make_span

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RESULTS = Path(__file__).parent / "results"
SPANS_PER_REQUEST = 512
CLIENT_THREADS = 4
MODELS = (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"),
          ("gcp.gemini", "gemini-2.5-flash"))
TEAMS = 8
PROBE_KEYS = 500
PARTITIONS = 8  # kafka.partitions, the default
_CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # Kafka's record batch attribute codes
GROUPS_PER_ROLE = {"worker": ("spendstream-pricing", "spendstream-guardrails"), "exporter": ("spendstream-exporter",)}


def config(flush_seconds: float, compression: str) -> str:
    return (f"exporter: {{flush_seconds: {flush_seconds}}}\nkafka: {{compression: {compression}}}\n"
            + policy(PROBE_KEYS))


def build_payloads(spans: int, first: int) -> list[bytes]:
    """Distinct model calls, 512 a request; a request is one service of one team, as an SDK batches them."""
    out = []
    for r, start in enumerate(range(first, first + spans, SPANS_PER_REQUEST)):
        batch = []
        for i in range(start, min(start + SPANS_PER_REQUEST, first + spans)):
            provider, model = MODELS[i % len(MODELS)]
            batch.append(make_span({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model,
                "gen_ai.usage.input_tokens": 1_000 + i % 3_000, "gen_ai.usage.output_tokens": 50 + i % 700,
                **({"gen_ai.usage.cache_read.input_tokens": 512} if i % 2 else {}),
                "feature.name": f"use-case-{i % 7}", "gen_ai.virtual_key": f"key-{i % 11}"}))
        out.append(make_request(batch, {"service.name": f"app-{r % 5}", "team.name": f"team-{r % TEAMS}",
                                        "deployment.environment.name": "prod"}).SerializeToString())
    return out


def focus_rows(payloads: list[bytes]) -> list[bytes]:
    """The `genai.cost.focus` values the pipeline makes of these payloads, by its own ingest and pricing code."""
    catalog, billing, config, nested = PriceCatalog(), Billing(), Config(), NestedCallFilter()
    return [value for payload in payloads for _, value in cost_records(ingest_request(
        ExportTraceServiceRequest.FromString(payload), config, None, nested).events, catalog, billing).rows]


def row_format_cost(values: list[bytes], codec: str) -> float:
    """CPU seconds a row that any reader of the public topic pays, at the least, for its format alone: putting the
    value in a record batch and compressing it (aiokafka's C record builder, in batches of 1 MiB, larger than the
    producer's: a lower bound), reading it back out, and decoding it as the typed FOCUS row the files can hold.
    No pricing, no row encoding, no Kafka round trip, no Parquet: what the JSON row costs by itself."""
    decoder = ROW_STRUCTS[row_version(values[0])]
    began = time.process_time()
    batches, builder = [], None
    for offset, value in enumerate(values):
        if builder is None:
            builder = DefaultRecordBatchBuilder(2, _CODECS[codec], 0, -1, -1, -1, 1 << 20)
        if builder.append(offset, timestamp=None, key=b"team=team-0", value=value, headers=[]) is None:
            batches.append(bytes(builder.build()))
            builder = None
    if builder is not None:
        batches.append(bytes(builder.build()))
    for batch in batches:
        for record in DefaultRecordBatch(batch):
            decoder.decode(record.value)
    return (time.process_time() - began) / len(values)


def baseline_rate(payloads: list[bytes], seconds: float) -> float:
    """Spans/s of a bare decode-and-walk of the payloads, on one core."""
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for payload in payloads:
            decode_and_walk(payload)
            done += SPANS_PER_REQUEST
    return done / (time.perf_counter() - began)


def scrape(port: int) -> dict[str, float]:
    """Sample name (with its consumer group, for lag) -> value, summed over the other labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spendstream_consumer_lag":
                key = f"lag:{sample.labels['group']}:{sample.labels['topic']}"
                out[key] = out.get(key, 0.0) + 1  # partitions assigned
            else:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


class Pipeline:
    """`spendstream run` and the metrics endpoints of its roles."""

    def __init__(self, tmp: Path, workers: int, flush_seconds: float, compression: str) -> None:
        (tmp / "spendstream.yaml").write_text(config(flush_seconds, compression))
        self.grpc_port, self.broker_port = free_port(), free_port()
        metrics_port = free_port(workers + 2)  # the roles take consecutive ports
        self.ports = {"collector": metrics_port, "exporter": metrics_port + workers + 1,
                      **{f"worker-{n + 1}" if n else "worker": metrics_port + n + 1 for n in range(workers)}}
        authz_port = free_port(2)  # Envoy's gRPC port is the next one
        self.data_dir = tmp / "data"
        self.log = tmp / "run.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(tmp / "spendstream.yaml"), "--data-dir",
                 str(self.data_dir), "--workers", str(workers), "--grpc-port", str(self.grpc_port), "--http-port",
                 str(free_port()), "--broker-port", str(self.broker_port), "--metrics-port", str(metrics_port),
                 "--authz-port", str(authz_port), "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, text=True)

    def joined(self) -> bool:
        """Every role's consumers hold their partitions: each group's lag gauges cover every partition."""
        assigned: Counter[str] = Counter()  # group -> partitions held
        for role, port in self.ports.items():
            try:
                metrics = scrape(port)
            except OSError:
                return False  # not serving yet
            for group in GROUPS_PER_ROLE.get(role.split("-")[0], ()):
                assigned[group] += int(sum(v for k, v in metrics.items() if k.startswith(f"lag:{group}:")))
        return all(assigned[g] >= PARTITIONS for groups in GROUPS_PER_ROLE.values() for g in groups)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Load:
    """CLIENT_THREADS threads sending the payloads; a refused request is sent again, as an OTLP exporter does."""

    def __init__(self, endpoint: str, payloads: list[bytes]) -> None:
        self._call = grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 64 << 20)]).unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self._todo: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        for payload in payloads:
            self._todo.put(payload)
        self.accepted = self.retries = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(CLIENT_THREADS)]
        self.started = self.finished = self.wall_started = 0.0
        self._remaining = len(payloads)
        self.finished_all = False

    def _send(self) -> None:
        while True:
            try:
                payload = self._todo.get_nowait()
            except queue.Empty:
                return
            while True:
                try:
                    self._call(payload, timeout=60)
                    break
                except grpc.RpcError:
                    with self._lock:
                        self.retries += 1
                    time.sleep(0.1)
            with self._lock:
                self.accepted += SPANS_PER_REQUEST
                self.finished = time.perf_counter()
                self._remaining -= 1
                self.finished_all = not self._remaining

    def start(self) -> None:
        self.started, self.wall_started = time.perf_counter(), time.time()
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()


class Probes:
    """One call over a key's ceiling at a time, timed from its export to the `open` command for that key."""

    def __init__(self, endpoint: str, bootstrap: str) -> None:
        self._endpoint, self._bootstrap = endpoint, bootstrap
        self.latencies: list[float] = []
        self.sent = 0  # spans
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        call = grpc.aio.insecure_channel(self._endpoint).unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            tps = [TopicPartition("genai.breaker.commands", p)
                   for p in consumer.partitions_for_topic("genai.breaker.commands") or ()]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            self._ready.set()
            for n in range(PROBE_KEYS):
                if self._stop.is_set():
                    return
                breaker, sent = f"key=probe-{n}", time.perf_counter()
                await call(probe_payload(breaker), timeout=60)
                self.sent += 1
                while not any(c["breaker_id"] == f"rate|{breaker}" and c["state"] == "open" for c in
                              [orjson.loads(r.value) for rs in (await consumer.getmany(timeout_ms=50)).values()
                               for r in rs]):
                    if self._stop.is_set():
                        return
                self.latencies.append(time.perf_counter() - sent)
                await asyncio.sleep(0.2)
        finally:
            await consumer.stop()

    def __enter__(self) -> Probes:
        self._thread.start()
        self._ready.wait(timeout=60)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __exit__(self, *_: object) -> None:
        self.stop()


class Profiles:
    """py-spy sampling each role (busy threads only) until stopped; raw stacks in `folder`."""

    RATE = 100

    def __init__(self, folder: Path | None, pids: dict[str, int]) -> None:
        self._folder, self._spies, self.began = folder, {}, time.perf_counter()
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # the venv's
        for role, pid in pids.items():
            if role == "broker":
                continue  # native: nothing for py-spy to see
            self._spies[role] = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(self.RATE), "--nonblocking", "--format", "raw",
                 "--output", str(folder / f"{role}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def report(self) -> None:
        seconds = time.perf_counter() - self.began
        for spy in self._spies.values():
            spy.send_signal(signal.SIGINT)
        for role, spy in self._spies.items():
            spy.wait(timeout=60)
            assert self._folder is not None
            own: Counter[str] = Counter()
            for line in (self._folder / f"{role}.txt").read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                own[stack.rsplit(";", 1)[-1]] += int(count)
            busy = sum(own.values())
            print(f"  {role}: busy {busy / (self.RATE * seconds):.0%} of one core; where (own time):")
            for frame, samples in own.most_common(8):
                print(f"    {samples / busy:5.1%}  {frame}")


def rows_in_files(data_dir: Path) -> tuple[int, int]:
    """(rows, distinct usage ids) in the request-level files."""
    files = request_files_glob(data_dir)
    found = duckdb.execute(f"SELECT count(*), count(DISTINCT x_UsageId) FROM read_parquet('{files}', "
                           "union_by_name = true)").fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def wait_for(what: str, done: object, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout_s:g} s")
        time.sleep(0.5)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def floor(cpu: dict[str, float], client_cpu: float, spans: int, *, rows: int, size: int, row_cost: float) -> None:
    """What 20,000 spans/s on these 2 cores would leave the pricing stage and the files, from this run's CPU costs:
    the clients and the ingest edge (collector, broker) take their share first, whatever the workers do; and what
    the public row format alone (`row_format_cost`) takes of what is left."""
    target, cores = 20_000, 2
    ingest = client_cpu + cpu.get("collector", 0.0) + cpu.get("broker", 0.0)
    rest = sum(s for role, s in cpu.items() if role.startswith(("worker", "exporter")))
    left_us = max(0.0, cores - ingest / spans * target) / target * 1e6
    print(f"  floor: at {target:,} spans/s the clients ({client_cpu / spans * 1e6:,.0f} ms per 1,000 spans), collector "
          f"and broker alone take {ingest / spans * target:.2f} of {cores} cores, leaving {left_us:,.0f} µs of CPU per "
          f"span for pricing, {rows / spans:.1f} FOCUS rows of {size / rows:,.0f} bytes of JSON each "
          f"({size / spans * target / 1e6:,.0f} MB/s to encode, compress, send, parse and write) and the files; "
          f"the workers and exporter used {rest / spans * 1e6:,.0f} µs per span here")
    format_us = row_cost * rows / spans * 1e6
    print(f"  of those {left_us:,.0f} µs, the row format alone (batching, compressing, reading back and decoding "
          f"{rows / spans:.1f} JSON rows, nothing else) takes {format_us:,.0f} µs: {format_us / left_us:.0%}"
          if left_us else "  nothing is left for the workers and exporter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=60_000, help="spans in the measured load (default 60,000)")
    parser.add_argument("--workers", type=int, default=1, help="pipeline workers (default 1)")
    parser.add_argument("--flush-seconds", type=float, default=1.0, help="exporter.flush_seconds (default 1)")
    parser.add_argument("--compression", default=Config().kafka.compression,
                        help=f"kafka.compression (default {Config().kafka.compression}, the config's)")
    parser.add_argument("--profile", type=Path, help="sample every role with py-spy; raw stacks go here")
    args = parser.parse_args()
    warmup_spans = 2 * SPANS_PER_REQUEST
    print(f"{os.cpu_count()} cores; building {args.spans:,} distinct spans in {SPANS_PER_REQUEST}-span requests",
          flush=True)
    warmup, payloads = build_payloads(warmup_spans, 0), build_payloads(args.spans, warmup_spans)
    warmup_rows, load_values = len(focus_rows(warmup)), focus_rows(payloads)
    load_rows, load_bytes = len(load_values), sum(map(len, load_values))
    row_cost = row_format_cost(load_values[:30_000], args.compression)
    del load_values
    base_before = baseline_rate(payloads, 3.0)
    print(f"  baseline: bare decode-and-walk {base_before:,.0f} spans/s on one core", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="spendstream-e2e-"))
    pipeline = Pipeline(tmp, args.workers, args.flush_seconds, args.compression)
    endpoint = f"localhost:{pipeline.grpc_port}"
    try:
        read_until(pipeline.process, pipeline.log, "try it:", timeout_s=120)
        print(f"spendstream run --workers {args.workers} (exporter.flush_seconds {args.flush_seconds:g}, "
              f"kafka.compression {args.compression}); "
              "warming up until every role has joined its groups", flush=True)
        wait_for("the consumer groups", pipeline.joined, 180)
        Load(endpoint, warmup).start()
        wait_for("the warm-up rows", lambda: scrape(pipeline.ports["exporter"]).get(
            "spendstream_exporter_rows_total", 0.0) >= warmup_rows)
        pids = role_pids(pipeline.process.pid)
        peak_rss: dict[str, float] = {}
        print(f"load: {args.spans:,} spans from {CLIENT_THREADS} threads; probes time span → breaker command",
              flush=True)
        with Probes(endpoint, f"127.0.0.1:{pipeline.broker_port}") as probes:
            profiles = Profiles(args.profile, pids)
            load = Load(endpoint, payloads)
            cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            client_before = time.process_time()
            load.start()
            while True:
                time.sleep(1.0)
                written = scrape(pipeline.ports["exporter"]).get("spendstream_exporter_rows_total", 0.0)
                for role, pid in pids.items():
                    peak_rss[role] = max(peak_rss.get(role, 0.0), rss_mb(pid))
                elapsed = time.perf_counter() - load.started
                # only the exporter's /metrics: a worker's takes it ~2 s of CPU to render under this load
                print(f"  {elapsed:5.1f} s  accepted {load.accepted:>8,} spans  "
                      f"rows in files {written - warmup_rows:>9,.0f} of {load_rows:,}", flush=True)
                if load.finished_all and written >= warmup_rows + load_rows:  # a few may be probes' rows: checked below
                    break
                if elapsed > 900:
                    raise SystemExit("not done after 15 minutes")
            probes.stop()
            calls = warmup_spans + args.spans
            wait_for("every call in the files", lambda: rows_in_files(pipeline.data_dir)[1] >= calls)
            cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
            client_cpu = time.process_time() - client_before  # the 4 senders, the probes and this loop
            # the last rows landed when the newest file was written (the polling above is coarser); a probe sent
            # just before the load's last rows may land in one flush more (exporter.flush_seconds)
            ended = max(f.stat().st_mtime for f in pipeline.data_dir.glob(REQUEST_FILES)) - load.wall_started
            load.join()
            if args.profile:
                profiles.report()
        rows, usage_ids = rows_in_files(pipeline.data_dir)
    finally:
        pipeline.stop()
    base_after = baseline_rate(payloads, 3.0)
    base = (base_before + base_after) / 2
    assert usage_ids >= warmup_spans + args.spans, f"{usage_ids:,} usage ids in the files"
    rate = args.spans / ended
    accept = args.spans / (load.finished - load.started)
    print(f"every FOCUS row is in the files: {rows:,} rows of {usage_ids:,} calls "
          f"(DuckDB over {request_files_glob(pipeline.data_dir)})")
    print(f"  end to end       {rate:>9,.0f} spans/s  ({args.spans:,} spans in {ended:.1f} s; "
          f"{load.retries} requests resent)")
    print(f"  collector accept {accept:>9,.0f} spans/s")
    print(f"  baseline         {base:>9,.0f} spans/s  bare decode-and-walk, one core (before {base_before:,.0f}, "
          f"after {base_after:,.0f})")
    print(f"  ratio end to end / baseline: {rate / base:.3f}   (target: 20,000 spans/s end to end)")
    if probes.latencies:
        print(f"  span → breaker command under the load: p50 {percentile(probes.latencies, 50) * 1000:,.0f} ms  "
              f"p99 {percentile(probes.latencies, 99) * 1000:,.0f} ms  ({len(probes.latencies)} probes)")
    print("  peak RSS: " + "  ".join(f"{role} {mb:,.0f} MB" for role, mb in sorted(peak_rss.items())))
    # CPU time per span does not depend on how much of a shared machine the roles were given
    print("  CPU per 1,000 spans: " + "  ".join(f"{role} {seconds / args.spans * 1e6:,.0f} ms"
                                                for role, seconds in sorted(cpu.items())))
    total_cpu = sum(cpu.values())
    print(f"  all roles: {total_cpu / args.spans * 1e6:,.0f} ms per 1,000 spans, so 2 cores of their own would "
          f"carry at most {2 * args.spans / total_cpu:,.0f} spans/s (the busiest role alone: "
          f"{args.spans / max(cpu.values()):,.0f} spans/s on one core)")
    floor(cpu, client_cpu, args.spans, rows=load_rows, size=load_bytes, row_cost=row_cost)
    RESULTS.mkdir(exist_ok=True)
    chart = RESULTS / "e2e.svg"
    chart.write_text(bar_chart(f"spans/s, spendstream run --workers {args.workers}, 2-core machine", {
        "bare decode-and-walk (baseline, one core)": base, "collector accept": accept,
        "end to end (every FOCUS row in the files)": rate}, baseline=base))
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
