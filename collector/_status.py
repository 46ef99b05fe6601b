"""The one place that maps ingest errors to OTLP answers (gRPC status codes and HTTP statuses)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from collector.decode import MalformedRequest
from collector.publisher import BrokerUnavailable
from collector.service import Unauthenticated

#: What a client is told to wait before retrying when the broker is down.
RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Answer:
    grpc_code: grpc.StatusCode
    http_status: int
    retryable: bool
    message: str


def answer_for(exc: Exception) -> Answer:
    """Map an error from TraceIngestService.export to the OTLP answer. Unknown errors are retryable 503s:
    the client keeps its data and we keep serving."""
    if isinstance(exc, MalformedRequest):
        return Answer(grpc.StatusCode.INVALID_ARGUMENT, 400, False, str(exc))
    if isinstance(exc, Unauthenticated):
        return Answer(grpc.StatusCode.UNAUTHENTICATED, 401, False, str(exc))
    if isinstance(exc, BrokerUnavailable):
        return Answer(grpc.StatusCode.UNAVAILABLE, 503, True, str(exc))
    return Answer(grpc.StatusCode.UNAVAILABLE, 503, True, f"internal error: {type(exc).__name__}")
