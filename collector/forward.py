"""Processor mode's exporter: every received span, enriched (collector/enrich.py), sent on to a downstream OTLP
endpoint over gRPC or HTTP. The shell around the pure enrichment.

Like the OpenTelemetry Collector's `sending_queue` with `retry_on_failure`: `submit` only appends to a bounded
queue and never waits, so cost accounting (the OTLP answer after Kafka acknowledged) is never held up by the
downstream endpoint. One task takes batches from the queue, prices, enriches and sends them, retrying what
may succeed later (gRPC UNAVAILABLE and the other retryable codes, HTTP 429/502/503/504, connection errors)
with capped exponential backoff and jitter. Spans are dropped, and counted, when the queue is full, when a
batch is still refused after `max_elapsed_s`, when the endpoint refuses them for good, when a bug stops a batch
(`failed`, logged) and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, Protocol

import aiohttp
import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collector import metrics
from collector.enrich import enrich_request, span_costs
from pipeline.pricing import PriceCatalog
from pipeline.pricing.focus import Billing
from schemas.config import ForwardConfig
from schemas.errors import PermanentError, TransientError
from schemas.usage import UsageEvent

log = logging.getLogger(__name__)

_EXPORT: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: OTLP/gRPC: the codes a retry may cure (the OTLP specification's "retryable" list)
_RETRYABLE_GRPC: Final = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED})
#: OTLP/HTTP: the same, as statuses
_RETRYABLE_HTTP: Final = frozenset({429, 502, 503, 504})


class DownstreamBusy(TransientError):
    """The downstream endpoint did not take the batch this time; it may later."""


class DownstreamRefused(PermanentError):
    """The downstream endpoint refused the batch for good (bad request, unauthenticated, ...)."""


class _Sender(Protocol):
    async def send(self, payload: bytes) -> int:
        """Export one request; the spans the endpoint refused in a partial success. Raises DownstreamBusy or
        DownstreamRefused."""

    async def close(self) -> None: ...


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _GrpcSender:
    def __init__(self, config: ForwardConfig) -> None:
        # grpc's own reconnect backoff grows to 2 minutes; keep it within our retry interval, so an endpoint
        # that is back is used at the next retry, not minutes later
        options = [("grpc.initial_reconnect_backoff_ms", int(config.retry_initial_s * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(config.retry_initial_s * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(config.retry_max_s * 1000))]
        if config.ca_file or config.cert_file:
            credentials = grpc.ssl_channel_credentials(_read(config.ca_file), _read(config.key_file),
                                                       _read(config.cert_file))
            self._channel = grpc.aio.secure_channel(config.endpoint, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(config.endpoint, options=options)
        self._export = self._channel.unary_unary(_EXPORT, request_serializer=None,
                                                 response_deserializer=ExportTraceServiceResponse.FromString)
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        self._timeout_s = config.timeout_s

    async def send(self, payload: bytes) -> int:
        try:
            response: ExportTraceServiceResponse = await self._export(
                payload, timeout=self._timeout_s, metadata=self._metadata, compression=self._compression)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _RETRYABLE_GRPC:
                raise DownstreamBusy(f"{exc.code().name}: {exc.details()}") from exc
            raise DownstreamRefused(f"{exc.code().name}: {exc.details()}") from exc
        return response.partial_success.rejected_spans

    async def close(self) -> None:
        await self._channel.close()


class _HttpSender:
    def __init__(self, config: ForwardConfig) -> None:
        self._url = config.endpoint
        self._gzip = config.compression == "gzip"
        self._headers = {**config.headers, "Content-Type": "application/x-protobuf",
                         **({"Content-Encoding": "gzip"} if self._gzip else {})}
        self._ssl: ssl.SSLContext | bool = True
        if config.ca_file or config.cert_file:
            context = ssl.create_default_context(cafile=config.ca_file)
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
            self._ssl = context
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, payload: bytes) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = gzip.compress(payload, compresslevel=1) if self._gzip else payload
        try:
            async with self._session.post(self._url, data=body, headers=self._headers, ssl=self._ssl) as response:
                answer = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownstreamBusy(f"{type(exc).__name__}: {exc}") from exc
        if response.status in _RETRYABLE_HTTP:
            raise DownstreamBusy(f"HTTP {response.status}")
        if response.status >= 300:
            raise DownstreamRefused(f"HTTP {response.status}: {answer[:200]!r}")
        if not answer:
            return 0
        refused: int = ExportTraceServiceResponse.FromString(answer).partial_success.rejected_spans
        return refused

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


#: a queued request: itself, its accepted calls, its span count
_Queued = tuple[ExportTraceServiceRequest, Sequence[UsageEvent], int]


def _spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


class SpanForwarder:
    """The bounded sending queue and the task that empties it. `stop()` is safe twice and flushes for at most
    `timeout_s`."""

    def __init__(self, config: ForwardConfig, catalog: PriceCatalog, billing: Billing) -> None:
        self._config = config
        self._catalog = catalog
        self._billing = billing
        self._queue: deque[_Queued] = deque()
        self._queued_spans = 0
        self._ready = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sender: _Sender | None = None
        self._in_flight_spans = 0
        # pricing and enriching a batch is CPU work: done on a thread of its own, the event loop keeps answering
        # OTLP requests meanwhile (the GIL is shared, but not held for a whole batch)
        self._enricher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otlp-forward")

    @property
    def queued_spans(self) -> int:
        return self._queued_spans

    async def start(self) -> None:
        self._sender = _GrpcSender(self._config) if self._config.protocol == "grpc" else _HttpSender(self._config)
        self._task = asyncio.create_task(self._run(), name="otlp-forward")
        metrics.FORWARD_QUEUE_SPANS.set_function(lambda: self._queued_spans)
        log.info("forwarding every span to %s (%s, compression %s)", self._config.endpoint, self._config.protocol,
                 self._config.compression)

    def submit(self, request: ExportTraceServiceRequest, events: Sequence[UsageEvent]) -> None:
        """Queue a received request (handed over: it is changed later) and its accepted calls. Never waits."""
        spans = _spans(request)
        if not spans:
            return
        if self._stopping or self._queued_spans + spans > self._config.queue_spans:
            metrics.FORWARD_SPANS_DROPPED.labels("shutdown" if self._stopping else "queue_full").inc(spans)
            return
        self._queue.append((request, events, spans))
        self._queued_spans += spans
        self._ready.set()

    def _take(self) -> list[_Queued]:
        """Up to max_batch_spans of queued requests (at least one), out of the queue."""
        items: list[_Queued] = []
        spans = 0
        while self._queue and (not spans or spans + self._queue[0][2] <= self._config.max_batch_spans):
            item = self._queue.popleft()
            self._queued_spans -= item[2]
            spans += item[2]
            items.append(item)
        return items

    def _build(self, items: list[_Queued]) -> tuple[bytes, int, int]:
        """The requests priced, enriched and merged into one: (payload, spans, priced spans). Runs on a thread."""
        batch = ExportTraceServiceRequest()
        spans = priced = 0
        for request, events, n in items:
            try:
                costs = span_costs(events, self._catalog, self._billing) if events else {}
                enrich_request(request, costs, keep_content=self._config.keep_content)
            except Exception:  # one request that cannot be enriched (a bug) must not sink the others: counted
                log.exception("could not enrich %d spans for forwarding", n)
                metrics.FORWARD_SPANS_DROPPED.labels("failed").inc(n)
                continue
            batch.resource_spans.extend(request.resource_spans)
            spans += n
            priced += len(costs)
        return batch.SerializeToString(), spans, priced

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            items = self._take()
            self._in_flight_spans = sum(n for *_, n in items)
            try:
                payload, spans, priced = await loop.run_in_executor(self._enricher, self._build, items)
                self._in_flight_spans = spans
                if spans:
                    await self._send(payload, spans, priced)
            except Exception:  # the forwarder must outlive a bug: the batch is lost, and counted
                log.exception("could not forward %d spans", self._in_flight_spans)
                metrics.FORWARD_SPANS_DROPPED.labels("failed").inc(self._in_flight_spans)
            self._in_flight_spans = 0

    async def _send(self, payload: bytes, spans: int, priced: int) -> None:
        assert self._sender is not None
        started = time.monotonic()
        delay = self._config.retry_initial_s
        while True:
            try:
                refused = await self._sender.send(payload)
            except DownstreamRefused as exc:
                log.warning("downstream %s refused %d spans: %s", self._config.endpoint, spans, exc)
                metrics.FORWARD_SPANS_DROPPED.labels("refused").inc(spans)
                return
            except DownstreamBusy as exc:
                waited = time.monotonic() - started
                if self._stopping or waited + delay > self._config.max_elapsed_s:
                    reason = "shutdown" if self._stopping else "retries_exhausted"
                    log.warning("dropping %d spans for %s after %.1f s: %s", spans, self._config.endpoint, waited,
                                exc)
                    metrics.FORWARD_SPANS_DROPPED.labels(reason).inc(spans)
                    return
                metrics.FORWARD_RETRIES.inc()
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # jitter: senders do not retry in step
                delay = min(delay * 2, self._config.retry_max_s)
                continue
            metrics.FORWARD_SPANS_SENT.inc(spans - refused)
            metrics.FORWARD_SPANS_PRICED.inc(priced)
            if refused:
                metrics.FORWARD_SPANS_DROPPED.labels("refused").inc(refused)
            return

    async def stop(self) -> None:
        """Send what is queued for up to timeout_s, then drop the rest (counted) and close."""
        self._stopping = True
        self._ready.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._config.timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        dropped, self._in_flight_spans = self._queued_spans + self._in_flight_spans, 0
        if dropped:
            metrics.FORWARD_SPANS_DROPPED.labels("shutdown").inc(dropped)
            self._queue.clear()
            self._queued_spans = 0
        await asyncio.to_thread(self._enricher.shutdown, wait=True)
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender.close()


__all__ = ["DownstreamBusy", "DownstreamRefused", "SpanForwarder"]
