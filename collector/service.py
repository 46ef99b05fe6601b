"""The ingest step both OTLP transports share: authenticate, decode, normalise, publish, answer.

Transport-independent; `_grpc.py` and `_http.py` only move bytes and map errors to codes
(`_status.py`).

Decoding and normalising are CPU work in Python. A large request (OTLP/JSON above
`OFFLOAD_JSON_BYTES`, protobuf above `OFFLOAD_PROTOBUF_BYTES`) is decoded on one worker
thread, so the event loop keeps serving the other clients while it runs: a 13 MB JSON body
no longer holds every other client for seconds. Small requests, the common case, stay on the
loop (a thread hop would cost more than their decode). Only the nested-call check, which
shares memory across requests, runs on the loop for every request.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector import metrics
from collector.attribution import SettledAttributions, TokenIdentity, token_identities
from collector.decode import DecodedRequest, decode_json, decode_protobuf
from collector.ingest import NestedCallFilter, PreparedRequest, finish_request, prepare_request
from collector.publisher import Publisher
from schemas.codec import Record
from schemas.config import Config
from schemas.errors import PermanentError
from schemas.topics import TopicNames
from schemas.usage import UsageEvent, encode_usage_batch

if TYPE_CHECKING:  # processor mode's module, loaded only when forwarding (collector/app.py)
    from collector.forward import SpanForwarder

Encoding = Literal["protobuf", "json"]

#: Requests above these sizes are decoded off the event loop (JSON decodes ~20x slower than protobuf).
OFFLOAD_JSON_BYTES: Final = 64 * 1024
OFFLOAD_PROTOBUF_BYTES: Final = 2 * 1024 * 1024


class Unauthenticated(PermanentError):
    """Ingest tokens are configured and the request's bearer token is missing or unknown."""


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """What the OTLP answer says: how many spans were refused, and why (first few)."""

    rejected_spans: int
    error_message: str


def _usage_records(events: list[UsageEvent], max_per_message: int) -> list[Record]:
    by_key: defaultdict[str, list[UsageEvent]] = defaultdict(list)
    for event in events:
        by_key[event.attribution_key].append(event)
    records: list[Record] = []
    for key, group in by_key.items():
        key_bytes = key.encode("utf-8", "surrogatepass")
        for start in range(0, len(group), max_per_message):
            records.append((key_bytes, encode_usage_batch(group[start:start + max_per_message])))
    return records


class TraceIngestService:
    def __init__(self, config: Config, publisher: Publisher, *, user_key: bytes | None = None,
                 forwarder: SpanForwarder | None = None) -> None:
        self._config = config
        self._publisher = publisher
        self._forwarder = forwarder
        self._user_key = user_key
        self._topics = TopicNames(config.kafka.topic_prefix)
        self._nested = NestedCallFilter()
        self._settled = SettledAttributions()
        self._identities = token_identities(config.ingest_tokens, config.collector.max_value_chars)
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otlp-decode")

    def close(self) -> None:
        """Stop the decode thread (after the receivers stopped; idempotent)."""
        self._decoder.shutdown(wait=True, cancel_futures=True)

    def authenticate(self, authorization: str | None) -> TokenIdentity | None:
        """The identity a bearer token binds, None when no tokens are configured.

        Raises Unauthenticated when tokens are configured and this one is missing or unknown.
        """
        if not self._identities:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("this collector requires 'Authorization: Bearer <ingest token>'")
        identity = self._identities.get(authorization[7:].strip())
        if identity is None:
            raise Unauthenticated("unknown ingest token")
        return identity

    def _prepare(self, payload: bytes, encoding: Encoding, identity: TokenIdentity | None,
                 received_ns: int) -> tuple[PreparedRequest, int, ExportTraceServiceRequest]:
        decoded: DecodedRequest = decode_protobuf(payload) if encoding == "protobuf" else decode_json(payload)
        prepared = prepare_request(decoded.request, self._config, identity, received_ns,
                                   rejected=decoded.rejected, user_key=self._user_key, settled=self._settled)
        return prepared, decoded.span_count, decoded.request

    async def export(self, payload: bytes, encoding: Encoding, identity: TokenIdentity | None,
                     transport: str) -> ExportOutcome:
        """Ingest one OTLP request; return only after Kafka acknowledged everything it produced.

        `identity` is what `authenticate` returned. Raises MalformedRequest (nothing decodable)
        or BrokerUnavailable (retry the whole request; ids are stable, so a retry cannot double-count).
        """
        received_ns = time.time_ns()
        offload = len(payload) > (OFFLOAD_JSON_BYTES if encoding == "json" else OFFLOAD_PROTOBUF_BYTES)
        if offload:
            loop = asyncio.get_running_loop()
            prepared, spans, request = await loop.run_in_executor(self._decoder, self._prepare, payload, encoding,
                                                                  identity, received_ns)
        else:
            prepared, spans, request = self._prepare(payload, encoding, identity, received_ns)
        result = finish_request(prepared, self._nested)
        metrics.SPANS_RECEIVED.labels(transport).inc(spans)
        records = _usage_records(result.events, self._config.collector.max_events_per_message)
        dead = [(d.attribution_key.encode("utf-8", "surrogatepass"), d.encode()) for d in result.dead_letters]
        started = time.perf_counter()
        await self._publisher.publish(self._topics.usage, records)
        await self._publisher.publish(self._topics.deadletter, dead)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        # count only once the broker has the data: a retried request is not counted twice
        for outcome, n in result.outcomes.items():
            metrics.SPANS_OUTCOME.labels(outcome).inc(n)
        metrics.EVENTS_PUBLISHED.inc(len(result.events))
        for letter in result.dead_letters:
            metrics.DEADLETTERS_PUBLISHED.labels(letter.reason).inc()
        if self._forwarder is not None:  # only once accounted: a retried request is not forwarded twice
            self._forwarder.submit(request, result.events)
        return ExportOutcome(result.rejected_spans, result.error_message)
