"""The worker alone: its CPU time per 1,000 spans, from their usage messages to their FOCUS rows acknowledged.

    .venv/bin/python bench/worker.py [--spans 30000] [--rounds 1]

Starts an embedded broker and `spendstream worker` (the pricing and guardrail stages, bench/e2e.py's policy),
warms it up with 2,048 spans, then publishes the usage messages of --spans distinct model calls (bench/e2e.py's
traffic, made into `genai.usage` messages by the collector's own code) and waits until the pricing group has
committed every one (so every row and spend is acknowledged). Printed: the worker's CPU time (user and system,
from /proc) per 1,000 spans over that window, its peak RSS and the rows made. CPU time, not wall time: it does
not depend on how much of a shared machine the run got, so two checkouts can be compared back to back
(run it from each). No collector and no exporter: bench/e2e.py measures the whole pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import PARTITIONS, build_payloads, config
from collector.ingest import NestedCallFilter, ingest_request
from collector.service import _usage_records
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.producer import BatchProducer
from pipeline.kafka.topics import ensure_topics
from pipeline.pricing.stage import PRICING_GROUP
from schemas.codec import Record
from schemas.config import Config, KafkaConfig
from schemas.topics import TopicNames
from tests.support import free_port

WARM_UP_SPANS = 2_048
_TICKS = os.sysconf("SC_CLK_TCK")


def usage_messages(spans: int, first: int) -> list[list[Record]]:
    """The `genai.usage` records of each request of bench/e2e.py's traffic, as the collector publishes them."""
    defaults, nested = Config(), NestedCallFilter()
    return [_usage_records(ingest_request(ExportTraceServiceRequest.FromString(payload), defaults, None,
                                          nested).events, defaults.collector.max_events_per_message)
            for payload in build_payloads(spans, first)]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def peak_rss_mb(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) // 1024


async def _sum_offsets(bootstrap: str, topic: str, *, committed_by: str | None = None) -> int:
    """The end offsets of `topic`'s partitions summed, or those `committed_by` that group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=committed_by, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        if committed_by is None:
            return sum((await consumer.end_offsets(tps)).values())
        return sum([await consumer.committed(tp) or 0 for tp in tps])
    finally:
        await consumer.stop()


async def _drained(bootstrap: str, names: TopicNames, timeout_s: float = 600) -> int:
    """Wait until the pricing group committed every usage message; returns the rows on the FOCUS topic then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _sum_offsets(bootstrap, names.usage, committed_by=PRICING_GROUP) >= await _sum_offsets(
                bootstrap, names.usage):
            return await _sum_offsets(bootstrap, names.cost_focus)
        await asyncio.sleep(0.2)
    raise SystemExit(f"the worker did not price every usage message within {timeout_s:.0f} s")


async def measure(spans: int, tmp: Path) -> None:
    broker = EmbeddedBroker(free_port(), log_file=tmp / "broker.log")
    broker.start()
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers)
    names = TopicNames(kafka.topic_prefix)
    await ensure_topics(kafka, os.environ)
    (tmp / "spendstream.yaml").write_text(config(1.0, kafka.compression))
    with (tmp / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "--kafka", broker.bootstrap_servers, "--config",
             str(tmp / "spendstream.yaml"), "--metrics-port", str(free_port()), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT)
    producer = BatchProducer.of(kafka, os.environ)
    await producer.start()
    try:
        warm_up, load = usage_messages(WARM_UP_SPANS, 10_000_000), usage_messages(spans, 0)
        for records in warm_up:
            await producer.send_all(names.usage, records)
        rows_before = await _drained(broker.bootstrap_servers, names)
        user_before, system_before = cpu_seconds(worker.pid)
        for records in load:  # as the collector publishes them: request by request
            await producer.send_all(names.usage, records)
        rows = await _drained(broker.bootstrap_servers, names) - rows_before
        user, system = (after - before for after, before in zip(cpu_seconds(worker.pid),
                                                                (user_before, system_before), strict=True))
        print(f"worker: {(user + system) / spans * 1e6:.1f} ms of CPU per 1,000 spans (user {user:.2f} s, "
              f"system {system:.2f} s for {spans:,} spans, {rows:,} rows); peak RSS {peak_rss_mb(worker.pid)} MB")
    finally:
        await producer.stop()
        worker.terminate()
        worker.wait(timeout=30)
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=30_000, help="spans in the measured load (default 30,000)")
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times, each on a new broker")
    args = parser.parse_args()
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="spendstream-worker-bench-") as tmp:
            asyncio.run(measure(args.spans, Path(tmp)))


if __name__ == "__main__":
    main()
