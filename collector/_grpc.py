"""OTLP/gRPC TraceService on grpc.aio. Takes the raw bytes so decoding errors are ours to answer.

grpc itself refuses a message above `collector.max_request_bytes` (as sent or once inflated)
with RESOURCE_EXHAUSTED and no RetryInfo: not retryable under the OTLP spec.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from collector import metrics
from collector._status import answer_for
from collector._tls import tls_version_refusal
from collector.inflight import InflightBytes
from collector.service import TraceIngestService

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class PortInUse(OSError):
    """The configured port cannot be bound."""


def _handler(service: TraceIngestService, inflight: InflightBytes, min_tls: str | None) -> grpc.GenericRpcHandler:
    async def export(payload: bytes, context: grpc.aio.ServicerContext[bytes, ExportTraceServiceResponse]
                     ) -> ExportTraceServiceResponse:
        refusal = tls_version_refusal(context.auth_context(), min_tls) if min_tls else None
        if refusal is not None:
            metrics.REQUESTS.labels("grpc", grpc.StatusCode.UNAUTHENTICATED.name).inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        try:
            with inflight.reservation() as reservation:
                reservation.take(len(payload))
                identity = service.authenticate(authorization if isinstance(authorization, str) else None)
                outcome = await service.export(payload, "protobuf", identity, "grpc")
        except Exception as exc:  # every failure becomes an OTLP answer; the server keeps serving
            answer = answer_for(exc)
            metrics.REQUESTS.labels("grpc", answer.grpc_code.name).inc()
            trailing = () if answer.retry_after_s is None else (("google.rpc.retryinfo-bin", RetryInfo(
                retry_delay=Duration(seconds=answer.retry_after_s)).SerializeToString()),)
            await context.abort(answer.grpc_code, answer.message, trailing)
        metrics.REQUESTS.labels("grpc", "OK").inc()
        if outcome.rejected_spans:
            return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
                rejected_spans=outcome.rejected_spans, error_message=outcome.error_message))
        return ExportTraceServiceResponse()

    return grpc.method_handlers_generic_handler(_SERVICE, {
        "Export": grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None, response_serializer=ExportTraceServiceResponse.SerializeToString
        ),
    })


async def start_grpc_server(service: TraceIngestService, host: str, port: int, *, max_request_bytes: int,
                            inflight: InflightBytes, credentials: grpc.ServerCredentials | None = None,
                            min_tls: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC receiver (TLS with `credentials`, calls below `min_tls` refused); returns the server
    and the port it bound."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers([_handler(service, inflight, min_tls)])
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise PortInUse(f"cannot listen for OTLP/gRPC on {address} (in use? change it with --grpc-port)") from exc
    if bound == 0:
        raise PortInUse(f"cannot listen for OTLP/gRPC on {address} (in use? change it with --grpc-port)")
    await server.start()
    return server, bound
