"""The ingest step both OTLP transports share: authenticate, decode, normalise, publish, answer.

Transport-independent; `_grpc.py` and `_http.py` only move bytes and map errors to codes
(`_status.py`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from collector import metrics
from collector.decode import DecodedRequest, decode_json, decode_protobuf
from collector.ingest import IngestResult, NestedCallFilter, ingest_request
from collector.publisher import Publisher
from schemas.codec import Record
from schemas.config import Config
from schemas.errors import PermanentError
from schemas.topics import TopicNames
from schemas.usage import UsageEvent, encode_usage_batch

Encoding = Literal["protobuf", "json"]


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
    def __init__(self, config: Config, publisher: Publisher) -> None:
        self._config = config
        self._publisher = publisher
        self._topics = TopicNames(config.kafka.topic_prefix)
        self._nested = NestedCallFilter()

    def identity_for(self, authorization: str | None) -> Mapping[str, str] | None:
        """The identity a bearer token binds, None when no tokens are configured.

        Raises Unauthenticated when tokens are configured and this one is missing or unknown.
        """
        tokens = self._config.ingest_tokens
        if not tokens:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("this collector requires 'Authorization: Bearer <ingest token>'")
        identity = tokens.get(authorization[7:].strip())
        if identity is None:
            raise Unauthenticated("unknown ingest token")
        return identity

    async def export(self, payload: bytes, encoding: Encoding, authorization: str | None,
                     transport: str) -> ExportOutcome:
        """Ingest one OTLP request; return only after Kafka acknowledged everything it produced.

        Raises Unauthenticated, MalformedRequest (nothing decodable) or BrokerUnavailable
        (retry the whole request; ids are stable, so a retry cannot double-count).
        """
        identity = self.identity_for(authorization)
        decoded: DecodedRequest = decode_protobuf(payload) if encoding == "protobuf" else decode_json(payload)
        result: IngestResult = ingest_request(decoded.request, self._config, identity, self._nested,
                                              received_ns=time.time_ns())
        metrics.SPANS_RECEIVED.labels(transport).inc(
            sum(len(ss.spans) for rs in decoded.request.resource_spans for ss in rs.scope_spans)
            + decoded.broken_spans
        )
        records = _usage_records(result.events, self._config.collector.max_events_per_message)
        dead = [(d.attribution_key.encode("utf-8", "surrogatepass"), d.encode()) for d in result.dead_letters]
        started = time.perf_counter()
        await self._publisher.publish(self._topics.usage, records)
        await self._publisher.publish(self._topics.deadletter, dead)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        # count only once the broker has the data: a retried request is not counted twice
        for outcome, n in result.outcomes.items():
            metrics.SPANS_OUTCOME.labels(outcome).inc(n)
        if decoded.broken_spans:
            metrics.SPANS_OUTCOME.labels("rejected:undecodable").inc(decoded.broken_spans)
        metrics.EVENTS_PUBLISHED.inc(len(result.events))
        for letter in result.dead_letters:
            metrics.DEADLETTERS_PUBLISHED.labels(letter.reason).inc()
        messages = decoded.messages + ([result.error_message] if result.error_message else [])
        return ExportOutcome(result.rejected_spans + decoded.broken_spans, "; ".join(messages))
