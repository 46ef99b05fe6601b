"""Decode OTLP trace requests (protobuf and JSON) without letting one bad span sink the rest. Pure.

protobuf rejects a whole message when any string in it is not UTF-8 or any value is nested
deeper than its recursion limit. When the fast parse fails, the request is split along the
wire format (ResourceSpans → ScopeSpans → Span) and every part is parsed on its own. A span
that still does not parse, or whose resource or scope does not, becomes a `RejectedSpan`: the
reason (`invalid_utf8`, `attribute_too_deep`, `malformed_span`, `invalid_resource`,
`invalid_scope`) and whatever could still be read of it (ids, model, token counts), so the
ingest step answers it in the partial success and dead-letters the model calls among them.

OTLP/JSON gets the same rules: invalid UTF-8 is replaced (U+FFFD) rather than refused, and an
attribute nested deeper than `MAX_ATTRIBUTE_DEPTH` rejects its span (or, in a resource or
scope, every span under it). A JSON document nested deeper than the JSON parser's own limit
(1,024 levels) is not readable at all: the whole request is malformed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from schemas.errors import PermanentError

_LEN: Final = 2  # wire type of length-delimited fields
#: Attribute values (AnyValue) nested deeper than this reject their span. protobuf's own limit of
#: 100 message levels allows about 32 inside a whole request, so both encodings use 32.
MAX_ATTRIBUTE_DEPTH: Final = 32


class MalformedRequest(PermanentError):
    """The request body is not an OTLP ExportTraceServiceRequest at all."""


@dataclass(slots=True)
class RejectedSpan:
    """A span that cannot be ingested as sent, with what could still be read of it.

    `span` and `resource` lack the parts that could not be decoded (the offending attribute,
    event or link); their ids, model and token counts are usually intact.
    """

    span: Span
    resource: Resource
    scope_name: str
    #: invalid_utf8 | attribute_too_deep | malformed_span | invalid_resource | invalid_scope
    reason: str
    detail: str


@dataclass(slots=True)
class DecodedRequest:
    #: the spans that decoded cleanly
    request: ExportTraceServiceRequest
    #: the spans that did not (counted in the partial success, model calls dead-lettered)
    rejected: list[RejectedSpan] = field(default_factory=list)

    @property
    def span_count(self) -> int:
        return sum(len(ss.spans) for rs in self.request.resource_spans for ss in rs.scope_spans) + len(self.rejected)


# --- the protobuf wire format, read without interpreting it --------------------------------------

def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
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


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    wire: int
    start: int  # where the field's tag starts
    value: int  # where its payload starts (length-delimited: after the length)
    end: int


def _fields(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[_Field]:
    """Split a protobuf message into its fields without interpreting them. Raises MalformedRequest."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        begin = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            after = pos + size
        elif wire in (1, 5):
            after = pos + (8 if wire == 1 else 4)
        else:
            raise MalformedRequest(f"unsupported wire type {wire}")
        if after > end:
            raise MalformedRequest("a field runs past the end of its message")
        yield _Field(number, wire, begin, pos, after)
        pos = after


def _embedded(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of each length-delimited field: the sub-messages of a message."""
    for f in _fields(buf):
        if f.wire == _LEN:
            yield f.number, buf[f.value:f.end]


#: For each message type: the fields that are strings or messages that can carry attributes.
_SCHEMA: Final[dict[str, dict[int, str]]] = {
    "Resource": {1: "KeyValue"},
    "InstrumentationScope": {1: "string", 2: "string", 3: "KeyValue"},
    "Span": {3: "string", 5: "string", 9: "KeyValue", 11: "Event", 13: "Link", 15: "Status"},
    "Event": {2: "string", 3: "KeyValue"},
    "Link": {3: "string", 4: "KeyValue"},
    "Status": {2: "string"},
    "KeyValue": {1: "string", 2: "AnyValue"},
    "AnyValue": {1: "string", 5: "ArrayValue", 6: "KeyValueList"},
    "ArrayValue": {1: "AnyValue"},
    "KeyValueList": {1: "KeyValue"},
}


def describe_problem(buf: bytes, type_name: str, max_depth: int = MAX_ATTRIBUTE_DEPTH) -> tuple[str, str]:
    """Why protobuf refused `buf` as a `type_name`: (reason, detail).

    Reasons: `attribute_too_deep`, `invalid_utf8`, else `malformed_span`. Walks the message
    with an explicit stack, so a 10,000-deep value costs no recursion, and stops at the
    first problem.
    """
    view = memoryview(buf)
    # frames: (message type, position, end, AnyValue depth, top-level attribute key)
    stack: list[tuple[str, int, int, int, str]] = [(type_name, 0, len(buf), 0, "")]
    try:
        while stack:
            kind, pos, end, depth, key = stack.pop()
            schema = _SCHEMA[kind]
            for f in _fields(view, pos, end):
                child = schema.get(f.number) if f.wire == _LEN else None
                if child is None:
                    continue
                if child == "string":
                    try:
                        text = str(view[f.value:f.end], "utf-8")
                    except UnicodeDecodeError:
                        where = f"attribute {key!r}" if key else f"a {kind} field"
                        return "invalid_utf8", f"{where} is not valid UTF-8"
                    if kind == "KeyValue" and f.number == 1 and depth == 0:
                        key = text[:64]
                    continue
                child_depth = depth + (child == "AnyValue")
                if child_depth > max_depth:
                    return "attribute_too_deep", f"attribute {key!r} is nested deeper than {max_depth} levels"
                stack.append((kind, f.end, end, depth, key))  # come back for the fields after this one
                stack.append((child, f.value, f.end, child_depth, key))
                break
    except MalformedRequest as exc:
        return "malformed_span", f"a {type_name} is not valid protobuf: {exc}"
    return "malformed_span", f"a {type_name} could not be decoded"


def _parse_part(cls: type[Message], buf: bytes, type_name: str) -> tuple[Any, tuple[str, str] | None]:
    """Parse `buf`; on failure, the message without its undecodable fields and why they failed."""
    try:
        return cls.FromString(buf), None
    except DecodeError:
        pass
    problem = describe_problem(buf, type_name)
    good: list[bytes] = []
    try:
        for f in _fields(buf):
            piece = buf[f.start:f.end]
            try:
                cls.FromString(piece)
            except DecodeError:
                continue
            good.append(piece)
        return cls.FromString(b"".join(good)), problem
    except (MalformedRequest, DecodeError):
        return cls(), problem


def _salvage(payload: bytes) -> DecodedRequest:
    decoded = DecodedRequest(ExportTraceServiceRequest())
    for number, rs_bytes in _embedded(payload):
        if number != 1:
            continue
        resource, resource_problem = Resource(), None
        scopes: list[bytes] = []
        for rs_number, value in _embedded(rs_bytes):
            if rs_number == 1:
                resource, resource_problem = _parse_part(Resource, value, "Resource")
            elif rs_number == 2:
                scopes.append(value)
        kept = None
        for ss_bytes in scopes:
            scope, scope_problem = InstrumentationScope(), None
            spans: list[bytes] = []
            for ss_number, value in _embedded(ss_bytes):
                if ss_number == 1:
                    scope, scope_problem = _parse_part(InstrumentationScope, value, "InstrumentationScope")
                elif ss_number == 2:
                    spans.append(value)
            kept_scope = None
            for span_bytes in spans:
                span, problem = _parse_part(Span, span_bytes, "Span")
                if resource_problem is not None:
                    problem = ("invalid_resource", f"its resource cannot be read: {resource_problem[1]}")
                elif scope_problem is not None:
                    problem = ("invalid_scope", f"its instrumentation scope cannot be read: {scope_problem[1]}")
                if problem is not None:
                    decoded.rejected.append(RejectedSpan(span, resource, scope.name, *problem))
                    continue
                if kept is None:
                    kept = decoded.request.resource_spans.add()
                    kept.resource.CopyFrom(resource)
                if kept_scope is None:
                    kept_scope = kept.scope_spans.add()
                    kept_scope.scope.CopyFrom(scope)
                kept_scope.spans.append(span)
    return decoded


def decode_protobuf(payload: bytes) -> DecodedRequest:
    """Decode a binary ExportTraceServiceRequest. Raises MalformedRequest if it is not one at all."""
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
    if not decoded.rejected:
        raise MalformedRequest("not an OTLP ExportTraceServiceRequest")
    return decoded


# --- OTLP/JSON ------------------------------------------------------------------------------------

_HEX_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(obj: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex, protobuf's JSON mapping expects base64."""
    for key in _HEX_ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError as exc:
                raise MalformedRequest(f"{key} {value[:40]!r} is not hex") from exc


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether an OTLP/JSON AnyValue nests deeper than `max_depth` AnyValues (itself counting 1)."""
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > max_depth:
            return True
        if not isinstance(current, dict):
            continue
        for name, inner in (("kvlistValue", "kv"), ("arrayValue", "any")):
            holder = current.get(name)
            values = holder.get("values") if isinstance(holder, dict) else None
            for item in values if isinstance(values, list) else ():
                child = item.get("value") if inner == "kv" and isinstance(item, dict) else item
                stack.append((child, depth + 1))
    return False


def _strip_deep(attributes: Any, max_depth: int) -> str | None:
    """Remove the attributes nested too deep from an OTLP/JSON attribute list; the first one's key."""
    if not isinstance(attributes, list):
        return None
    first: str | None = None
    kept = []
    for kv in attributes:
        if isinstance(kv, dict) and _too_deep(kv.get("value"), max_depth):
            if first is None:
                first = str(kv.get("key", ""))[:64]
            continue
        kept.append(kv)
    attributes[:] = kept
    return first


def _strip_deep_span(span: dict[str, Any], max_depth: int) -> str | None:
    first = _strip_deep(span.get("attributes"), max_depth)
    for part in ("events", "links"):
        items = span.get(part)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                found = _strip_deep(item.get("attributes"), max_depth)
                first = first if first is not None else found
    return first


def _parse_dict(data: Any, message: Message) -> None:
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (AttributeError, TypeError, ValueError, RecursionError, json_format.ParseError) as exc:
        raise MalformedRequest(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise MalformedRequest("JSON nested deeper than 1024 levels") from exc
    try:
        return orjson.loads(payload.decode("utf-8", errors="replace"))
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"not JSON: {exc}") from exc


def decode_json(payload: bytes, max_depth: int = MAX_ATTRIBUTE_DEPTH) -> DecodedRequest:
    """Decode an OTLP/JSON request. Invalid UTF-8 is replaced (U+FFFD) rather than refused.

    Raises MalformedRequest when the body is not an OTLP/JSON ExportTraceServiceRequest.
    """
    data = _loads(payload)
    if not isinstance(data, dict):
        raise MalformedRequest("OTLP/JSON body must be an object")
    pending: list[tuple[dict[str, Any], dict[str, Any], str, str, str]] = []
    try:
        for resource_spans in data.get("resourceSpans") or []:
            resource = resource_spans.get("resource") or {}
            deep = _strip_deep(resource.get("attributes"), max_depth) if isinstance(resource, dict) else None
            resource_problem = None if deep is None else (
                "invalid_resource", f"its resource cannot be read: attribute {deep!r} is nested deeper than "
                                    f"{max_depth} levels")
            for scope_spans in resource_spans.get("scopeSpans") or []:
                scope = scope_spans.get("scope") or {}
                deep = _strip_deep(scope.get("attributes"), max_depth) if isinstance(scope, dict) else None
                scope_problem = None if deep is None else (
                    "invalid_scope", f"its instrumentation scope cannot be read: attribute {deep!r} is nested "
                                     f"deeper than {max_depth} levels")
                kept = []
                for span in scope_spans.get("spans") or []:
                    _hex_ids_to_base64(span)
                    for link in span.get("links") or []:
                        _hex_ids_to_base64(link)
                    deep = _strip_deep_span(span, max_depth)
                    problem = resource_problem or scope_problem or (None if deep is None else (
                        "attribute_too_deep", f"attribute {deep!r} is nested deeper than {max_depth} levels"))
                    if problem is None:
                        kept.append(span)
                    else:
                        name = scope.get("name") if isinstance(scope, dict) else ""
                        pending.append((span, resource, str(name or ""), *problem))
                scope_spans["spans"] = kept
    except (AttributeError, TypeError) as exc:
        raise MalformedRequest(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
    decoded = DecodedRequest(ExportTraceServiceRequest())
    _parse_dict(data, decoded.request)
    for span_data, resource_data, scope_name, reason, detail in pending:
        span, resource = Span(), Resource()
        _parse_dict(span_data, span)
        _parse_dict(resource_data, resource)
        decoded.rejected.append(RejectedSpan(span, resource, scope_name, reason, detail))
    return decoded


__all__ = ["MAX_ATTRIBUTE_DEPTH", "DecodedRequest", "MalformedRequest", "RejectedSpan", "decode_json",
           "decode_protobuf", "describe_problem"]
