"""Decode OTLP trace requests (protobuf and JSON) without letting one bad span sink the rest. Pure.

protobuf rejects a whole message when any string in it is not UTF-8. When the fast parse
fails, the request is split along the wire format (ResourceSpans → ScopeSpans → Span) and
every span is parsed on its own, so only the broken spans are refused.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from schemas.errors import PermanentError

_LEN = 2  # wire type of length-delimited fields


class MalformedRequest(PermanentError):
    """The request body is not an OTLP ExportTraceServiceRequest at all."""


@dataclass(slots=True)
class DecodedRequest:
    request: ExportTraceServiceRequest
    #: spans that could not be decoded (counted in rejected_spans), with a message each
    broken_spans: int = 0
    messages: list[str] = field(default_factory=list)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise MalformedRequest("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedRequest("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """Split a protobuf message into (field number, wire type, payload) without interpreting it."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise MalformedRequest("length-delimited field runs past the end")
            out.append((number, wire, buf[pos:pos + size]))
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            out.append((number, wire, buf[pos:pos + width]))
            pos += width
        else:
            raise MalformedRequest(f"unsupported wire type {wire}")
    return out


def _embedded(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of each length-delimited field: the sub-messages of a message."""
    for number, wire, value in _fields(buf):
        if wire == _LEN and isinstance(value, bytes):
            yield number, value


def _salvage(payload: bytes) -> DecodedRequest:
    decoded = DecodedRequest(ExportTraceServiceRequest())
    for number, rs_bytes in _embedded(payload):
        if number != 1:
            continue
        resource_spans = decoded.request.resource_spans.add()
        for rs_number, rs_value in _embedded(rs_bytes):
            if rs_number == 1:
                _parse_or_note(Resource, rs_value, resource_spans.resource, decoded, "resource")
            elif rs_number == 2:
                _salvage_scope(rs_value, resource_spans.scope_spans.add(), decoded)
    return decoded


def _salvage_scope(buf: bytes, scope_spans: ScopeSpans, decoded: DecodedRequest) -> None:
    for number, value in _embedded(buf):
        if number == 1:
            _parse_or_note(InstrumentationScope, value, scope_spans.scope, decoded, "scope")
        elif number == 2:
            span = Span()
            try:
                span.ParseFromString(value)
            except DecodeError:
                decoded.broken_spans += 1
                if len(decoded.messages) < 5:
                    decoded.messages.append("a span could not be decoded (strings must be valid UTF-8)")
                continue
            scope_spans.spans.append(span)


def _parse_or_note(cls: type[Any], buf: bytes, target: Any, decoded: DecodedRequest, what: str) -> None:
    try:
        target.CopyFrom(cls.FromString(buf))
    except DecodeError:
        # the spans are still usable; their resource or scope attributes are lost
        if len(decoded.messages) < 5:
            decoded.messages.append(f"a {what} could not be decoded and was dropped (strings must be UTF-8)")


def decode_protobuf(payload: bytes) -> DecodedRequest:
    """Decode a binary ExportTraceServiceRequest. Raises MalformedRequest if nothing is salvageable."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
        return DecodedRequest(request)
    except DecodeError:
        pass
    try:
        decoded = _salvage(payload)
    except MalformedRequest as exc:
        raise MalformedRequest(f"not an OTLP ExportTraceServiceRequest: {exc}") from exc
    if decoded.broken_spans == 0 and not decoded.messages:
        raise MalformedRequest("not an OTLP ExportTraceServiceRequest")
    return decoded


_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(obj: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex, protobuf's JSON mapping expects base64."""
    for key in _HEX_ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError as exc:
                raise MalformedRequest(f"{key} {value[:40]!r} is not hex") from exc


def decode_json(payload: bytes) -> DecodedRequest:
    """Decode an OTLP/JSON request. Invalid UTF-8 is replaced (U+FFFD) rather than refused."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            data = orjson.loads(payload.decode("utf-8", errors="replace"))
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedRequest("OTLP/JSON body must be an object")
    try:
        for resource_spans in data.get("resourceSpans") or []:
            for scope_spans in resource_spans.get("scopeSpans") or []:
                for span in scope_spans.get("spans") or []:
                    _hex_ids_to_base64(span)
                    for link in span.get("links") or []:
                        _hex_ids_to_base64(link)
        request = ExportTraceServiceRequest()
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (AttributeError, TypeError, json_format.ParseError) as exc:
        raise MalformedRequest(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
    return DecodedRequest(request)


__all__ = ["DecodedRequest", "MalformedRequest", "decode_json", "decode_protobuf"]
