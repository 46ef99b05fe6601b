"""The one place that maps ingest errors to OTLP answers (gRPC status codes and HTTP statuses).

Follows the OTLP spec's retry rules: only what a later retry can fix is retryable (HTTP 429/503,
gRPC UNAVAILABLE): the broker not acknowledging and the collector being busy. Everything else is
permanent: a client must not send it again. Only "busy" names a delay (Retry-After, RetryInfo):
it clears as soon as requests in flight are answered. A broker outage lasts as long as it lasts,
and a delay named by the server replaces the client's exponential backoff: the OTel SDKs then
retry every second and give up after 6 attempts (~5 s), where their backoff (1, 2, 4, 8 s...)
rides out a broker restart within their timeout.
A too-large request is RESOURCE_EXHAUSTED *without* RetryInfo, which the spec makes
non-retryable; an internal error is INTERNAL / 500, logged with its traceback the first time.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Final

import grpc

from collector import metrics
from collector.decode import MalformedRequest
from collector.inflate import RequestTooLarge, UnsupportedEncoding
from collector.inflight import CollectorBusy
from collector.publisher import BrokerUnavailable
from collector.service import Unauthenticated

log = logging.getLogger(__name__)

#: What a client is told to wait before retrying when the collector is busy.
RETRY_AFTER_S: Final = 1
_MAX_SIGNATURES: Final = 256


@dataclass(frozen=True, slots=True)
class Answer:
    grpc_code: grpc.StatusCode
    http_status: int
    #: the delay a retry should wait, when the answer names one (retryable answers only)
    retry_after_s: int | None
    message: str


def answer_for(exc: Exception) -> Answer:
    """Map an error from receiving or ingesting a request to its OTLP answer."""
    if isinstance(exc, MalformedRequest):
        return Answer(grpc.StatusCode.INVALID_ARGUMENT, 400, None, str(exc))
    if isinstance(exc, RequestTooLarge):
        return Answer(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, None, str(exc))
    if isinstance(exc, UnsupportedEncoding):
        return Answer(grpc.StatusCode.INVALID_ARGUMENT, 415, None, str(exc))
    if isinstance(exc, Unauthenticated):
        return Answer(grpc.StatusCode.UNAUTHENTICATED, 401, None, str(exc))
    if isinstance(exc, CollectorBusy):
        return Answer(grpc.StatusCode.UNAVAILABLE, 429, RETRY_AFTER_S, str(exc))
    if isinstance(exc, BrokerUnavailable):
        return Answer(grpc.StatusCode.UNAVAILABLE, 503, None, str(exc))  # retryable by its code: backoff
    report_internal(exc)
    return Answer(grpc.StatusCode.INTERNAL, 500, None,
                  f"internal error ({type(exc).__name__}); the collector log has the details")


_seen: set[tuple[str, str, int]] = set()


def report_internal(exc: Exception) -> None:
    """Count an unexpected error; log it with its traceback the first time it is seen (type and raising line)."""
    metrics.INTERNAL_ERRORS.labels(type(exc).__name__).inc()
    frames = traceback.extract_tb(exc.__traceback__)
    where = frames[-1] if frames else None
    signature = (type(exc).__name__, where.filename if where else "", where.lineno or 0 if where else 0)
    if signature in _seen:
        return
    if len(_seen) < _MAX_SIGNATURES:
        _seen.add(signature)
    log.error("internal error answering an OTLP request (answered INTERNAL / 500; repeats are counted in "
              "spendstream_collector_internal_errors_total, not logged)", exc_info=exc)
