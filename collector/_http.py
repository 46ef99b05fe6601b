"""OTLP/HTTP `POST /v1/traces`: protobuf or JSON bodies, optionally gzip- or deflate-encoded.

The body is read as a stream and inflated here, a piece at a time (`collector/inflate.py`),
never by aiohttp: a request is refused (413) as soon as it passes `collector.max_request_bytes`
as sent or once inflated, so a gzip bomb costs at most that much. Every byte held counts
against `collector.max_inflight_bytes` (`collector/inflight.py`); past it the answer is 429 +
Retry-After.
"""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import web
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from collector import metrics
from collector._status import answer_for
from collector.decode import MalformedRequest
from collector.inflate import Inflater, RequestTooLarge, inflater_for
from collector.inflight import InflightBytes, Reservation
from collector.service import Encoding, TraceIngestService

_CONTENT_TYPES: dict[str, Encoding] = {"application/x-protobuf": "protobuf", "application/json": "json"}


def _respond(encoding: Encoding, response: ExportTraceServiceResponse, status: int = 200,
             headers: dict[str, str] | None = None) -> web.Response:
    if encoding == "json":
        body = orjson.dumps(json_format.MessageToDict(response))
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)
    return web.Response(body=response.SerializeToString(), status=status,
                        content_type="application/x-protobuf", headers=headers)


def _error(encoding: Encoding, status: int, message: str, headers: dict[str, str] | None = None
           ) -> web.Response:
    # OTLP/HTTP: error bodies are a google.rpc.Status; its message is what people read
    if encoding == "json":
        return web.Response(body=orjson.dumps({"code": status, "message": message}), status=status,
                            content_type="application/json", headers=headers)
    return web.Response(body=Status(code=status, message=message).SerializeToString(), status=status,
                        content_type="application/x-protobuf", headers=headers)


async def read_body(request: web.Request, max_bytes: int, reservation: Reservation) -> bytes:
    """The request body with its Content-Encoding undone, held against `reservation`.

    Raises RequestTooLarge as soon as the body passes `max_bytes` (as sent or inflated),
    MalformedRequest (invalid gzip/deflate, body cut short), UnsupportedEncoding, or
    CollectorBusy when the in-flight limit is reached by a body that is not too large.
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    inflater = inflater_for(request.headers.get("Content-Encoding"))
    pieces: list[bytes] = []
    try:
        over_budget = await _inflate_into(request, inflater, max_bytes, reservation, pieces)
        if over_budget:
            raise reservation.busy()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
    finally:
        # no traceback may keep a refused body alive until the garbage collector runs
        pieces.clear()


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body larger than collector.max_request_bytes = {max_bytes} bytes")


async def _inflate_into(request: web.Request, inflater: Inflater, max_bytes: int, reservation: Reservation,
                        pieces: list[bytes]) -> bool:
    """Read and inflate the body into `pieces`; True when the in-flight limit refused it (it was only counted)."""
    received = inflated = 0
    over_budget = False  # past the in-flight limit: keep inflating only to tell "too large" from "busy"
    try:
        async for chunk in request.content.iter_any():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            for piece in inflater.feed(chunk):
                inflated += len(piece)
                if inflated > max_bytes:
                    raise _too_large(max_bytes)
                if not over_budget and reservation.grow(len(piece)):
                    pieces.append(piece)
                else:
                    over_budget = True
                    pieces.clear()
                    reservation.release()
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise MalformedRequest(f"the request body could not be read: {exc}") from exc
    inflater.finish()
    return over_budget


def build_http_app(service: TraceIngestService, max_request_bytes: int, inflight: InflightBytes) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        content_type = request.content_type
        encoding = _CONTENT_TYPES.get(content_type)
        if encoding is None:
            metrics.REQUESTS.labels("http", "415").inc()
            return _error("json", 415, f"unsupported Content-Type {content_type!r}; "
                                       "use application/x-protobuf or application/json")
        try:
            with inflight.reservation() as reservation:
                identity = service.authenticate(request.headers.get("Authorization"))  # before reading the body
                body = await read_body(request, max_request_bytes, reservation)
                outcome = await service.export(body, encoding, identity, "http")
        except Exception as exc:  # every failure becomes an OTLP answer; the server keeps serving
            answer = answer_for(exc)
            metrics.REQUESTS.labels("http", str(answer.http_status)).inc()
            headers = {"Retry-After": str(answer.retry_after_s)} if answer.retry_after_s is not None else None
            return _error(encoding, answer.http_status, answer.message, headers)
        metrics.REQUESTS.labels("http", "200").inc()
        response = ExportTraceServiceResponse()
        if outcome.rejected_spans:
            response.partial_success.CopyFrom(ExportTracePartialSuccess(
                rejected_spans=outcome.rejected_spans, error_message=outcome.error_message))
        return _respond(encoding, response)

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_post("/v1/traces", traces)
    return app
