"""Test support: OTLP request builders, a collector on its own event loop, and topic readers."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector.app import Collector, Endpoints
from collector.publisher import Publisher
from schemas.config import CollectorConfig, Config, KafkaConfig
from schemas.usage import UsageEvent, decode_usage_batch


class OwnPorts:
    """This test process's share of the ports below the kernel's ephemeral range, handed out in turn from a random
    start (apart from other test runs on the machine).

    A port the kernel picks (bind to port 0) can be picked again, by another pytest-xdist worker or for an outgoing
    connection, before the test's server binds it; ports below the ephemeral range are never picked for outgoing
    connections, and each worker has a slice of its own.
    """

    LOWEST = 10_000  # above the well-known ports of services a developer's machine may run

    def __init__(self) -> None:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
        size = (first_ephemeral - self.LOWEST) // workers
        self._ports = range(self.LOWEST + worker * size, self.LOWEST + (worker + 1) * size)
        self._next = self._ports.start + int.from_bytes(os.urandom(4), "big") % size

    def take(self, count: int) -> int:
        for _ in self._ports:
            first = self._next if self._next + count <= self._ports.stop else self._ports.start
            self._next = first + count
            if all(_bindable(port) for port in range(first, first + count)):
                return first
        raise RuntimeError(f"no {count} free ports in a row in {self._ports}")


def _bindable(port: int) -> bool:
    """Nothing listens on `port` on any address, and no connection of it lingers (bound without SO_REUSEADDR)."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


_own_ports = OwnPorts()


def free_port(count: int = 1) -> int:
    """The first of `count` ports in a row that nothing listens on and that no other worker of this test run, no
    later call and no outgoing connection is handed."""
    return _own_ports.take(count)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process at a time: pytest-xdist workers that would each install or download the same thing into
    the work tree on first use take turns, and the later ones find it done."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    return AnyValue(string_value=str(value))


def key_values(attrs: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


_span_counter = iter(range(1, 1 << 62))


def make_span(attrs: Mapping[str, Any], *, trace_id: bytes | None = None, span_id: bytes | None = None,
              parent: bytes = b"", name: str = "chat", start_ns: int | None = None) -> Span:
    """A client span with these attributes, started a second ago (the collector accepts no span far from now)."""
    n = next(_span_counter)
    start_ns = time.time_ns() - 2 * 10**9 + n if start_ns is None else start_ns
    return Span(
        trace_id=trace_id or os.urandom(16), span_id=span_id or n.to_bytes(8, "big"), parent_span_id=parent,
        name=name, kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=start_ns,
        end_time_unix_nano=min(start_ns + 10**9, 2**64 - 1), attributes=key_values(attrs),
    )


def make_request(spans: Iterable[Span], resource: Mapping[str, Any] | None = None,
                 scope: str = "test") -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.extend(key_values(resource or {"service.name": "svc", "team.name": "t",
                                                          "feature.name": "uc", "deployment.environment.name": "prod"}))
    ss = rs.scope_spans.add()
    ss.scope.name = scope
    ss.spans.extend(spans)
    return request


def to_otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the spec writes it: lowerCamelCase, ids as hex, int64 as strings."""
    data = json_format.MessageToDict(request)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return orjson.dumps(data)


class CollectorThread:
    """A real Collector serving on ephemeral ports, on an event loop of its own thread.

    The OTel SDK exporters block, so the collector cannot share the test's thread.
    """

    def __init__(self, config: Config, publisher: Publisher | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._collector = Collector(config, publisher, environ)
        self.endpoints: Endpoints | None = None

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=30)

    def start(self) -> CollectorThread:
        self._thread.start()
        self.endpoints = self._run(self._collector.start())
        return self

    @property
    def grpc_endpoint(self) -> str:
        assert self.endpoints
        return f"localhost:{self.endpoints.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.endpoints
        return f"http://127.0.0.1:{self.endpoints.http_port}/v1/traces"

    @property
    def inflight_bytes(self) -> int:
        """Request bytes the collector holds right now."""
        return self._collector.inflight.held

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the collector's event loop for the block: nothing of it runs, its Kafka producer included
        (calls wait on their sockets), as `spendstream run` keeps every role away from a new broker until
        its topics exist."""
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait()

        self._loop.call_soon_threadsafe(hold)
        try:
            assert held.wait(timeout=30), "the collector's loop did not pause"
            yield
        finally:
            release.set()

    def stop(self) -> None:
        self._run(self._collector.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def collector_config(bootstrap: str, prefix: str, **overrides: Any) -> Config:
    base = Config(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=2),
        collector=CollectorConfig(host="127.0.0.1", grpc_port=0, http_port=0, publish_timeout_s=3.0),
    )
    return replace(base, **overrides)


async def _read_all(bootstrap: str, topic: str, min_messages: int, timeout_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # loads cluster metadata, so partitions_for_topic knows the topic
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        done = False
        while loop.time() < deadline:
            # the fetch's high watermark: the embedded broker's ListOffsets ends at the last batch's first record
            ends = await consumer.end_offsets(partitions)
            done = all([await consumer.position(tp) >= max(ends[tp], consumer.highwater(tp) or 0)
                        for tp in partitions])
            if done and len(records) >= min_messages:
                break
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                records.extend(msgs)
        # a partial read would pass for the topic's state (the latest value of a key missing): never return one
        assert done, f"did not read {topic} to its end within {timeout_s} s"
        return records
    finally:
        await consumer.stop()


def read_topic(bootstrap: str, topic: str, *, min_messages: int = 0, timeout_s: float = 30.0) -> list[Any]:
    """Every record in `topic` from the beginning (waits for at least `min_messages`)."""
    return asyncio.run(_read_all(bootstrap, topic, min_messages, timeout_s))


def read_usage(bootstrap: str, topic: str, *, min_events: int = 0, timeout_s: float = 10.0) -> list[UsageEvent]:
    """All usage events in the topic, waiting until at least `min_events` arrived."""
    loop_deadline = timeout_s
    events: list[UsageEvent] = []
    while True:
        records = read_topic(bootstrap, topic, timeout_s=max(min(loop_deadline, 10.0), 2.0))
        events = [e for r in records for e in decode_usage_batch(r.value)]
        loop_deadline -= 2.0
        if len(events) >= min_events or loop_deadline <= 0:
            return events


def read_deadletters(bootstrap: str, topic: str, *, min_messages: int = 0) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_topic(bootstrap, topic, min_messages=min_messages)]


def metrics_text(port: int) -> str:
    """A local Prometheus endpoint's exposition text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: bytes = response.read()
    return text.decode()


def usage_counted(port: int) -> float:
    """Usage events a worker's pricing stage handled: priced, or unpriced and dead-lettered."""
    text = metrics_text(port)
    return sum(float(m.group(1)) for m in re.finditer(
        r"^spendstream_worker_usage_(?:priced|unpriced)_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.MULTILINE))


def metric(port: int, name: str) -> float:
    """The value of a sample on a local Prometheus endpoint (0 when absent); `name` with its labels as exported,
    e.g. `spendstream_messages_rejected_total{reason="invalid_usage_message",stage="pricing"}` (labels sorted)."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", metrics_text(port), re.MULTILINE)
    return float(match.group(1)) if match else 0.0
