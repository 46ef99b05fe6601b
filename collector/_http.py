"""OTLP/HTTP `POST /v1/traces`: protobuf or JSON bodies, optionally gzip-encoded (aiohttp inflates them)."""

from __future__ import annotations

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from collector import metrics
from collector._status import RETRY_AFTER_S, answer_for
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


def build_http_app(service: TraceIngestService, max_request_bytes: int) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        content_type = request.content_type
        encoding = _CONTENT_TYPES.get(content_type)
        if encoding is None:
            metrics.REQUESTS.labels("http", "415").inc()
            return _error("json", 415, f"unsupported Content-Type {content_type!r}; "
                                       "use application/x-protobuf or application/json")
        try:
            body = await request.read()  # aiohttp has already undone Content-Encoding: gzip / deflate
            outcome = await service.export(body, encoding, request.headers.get("Authorization"), "http")
        except Exception as exc:  # every failure becomes an OTLP answer; the server keeps serving
            answer = answer_for(exc)
            metrics.REQUESTS.labels("http", str(answer.http_status)).inc()
            headers = {"Retry-After": str(RETRY_AFTER_S)} if answer.retryable else None
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
