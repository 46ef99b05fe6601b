"""Hand-built OTLP protobuf bytes for what the protobuf library refuses to build: values nested
thousands deep, strings that are not UTF-8. Wire format only, no recursion."""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_value(depth: int) -> bytes:
    """An AnyValue nested `depth` levels deep (kvlist in kvlist ...), a string at the bottom."""
    value = field(1, b"leaf")
    for _ in range(depth - 1):
        value = field(6, field(1, field(1, b"k") + field(2, value)))
    return value


def key_value(key: bytes, value: bytes) -> bytes:
    return field(1, key) + field(2, value)


def string_value(text: bytes) -> bytes:
    return field(1, text)


def int_value(number: int) -> bytes:
    return varint(3 << 3 | 0) + varint(number)


def span(trace_id: bytes, span_id: bytes, attributes: list[bytes], start_ns: int) -> bytes:
    fixed = (varint(7 << 3 | 1) + start_ns.to_bytes(8, "little")
             + varint(8 << 3 | 1) + (start_ns + 10**9).to_bytes(8, "little"))
    return (field(1, trace_id) + field(2, span_id) + field(5, b"chat") + varint(6 << 3 | 0) + varint(3) + fixed
            + b"".join(field(9, kv) for kv in attributes))


def model_call_attributes(extra: Sequence[bytes] = ()) -> list[bytes]:
    return [
        key_value(b"gen_ai.operation.name", string_value(b"chat")),
        key_value(b"gen_ai.provider.name", string_value(b"openai")),
        key_value(b"gen_ai.request.model", string_value(b"gpt-4o")),
        key_value(b"gen_ai.usage.input_tokens", int_value(100)),
        key_value(b"gen_ai.usage.output_tokens", int_value(10)),
        *extra,
    ]


def request(spans: list[bytes], resource_attributes: list[bytes] | None = None) -> bytes:
    if resource_attributes is None:
        resource_attributes = [key_value(b"service.name", string_value(b"svc")),
                               key_value(b"team.name", string_value(b"t")),
                               key_value(b"feature.name", string_value(b"uc")),
                               key_value(b"deployment.environment.name", string_value(b"prod"))]
    resource = field(1, b"".join(field(1, kv) for kv in resource_attributes))
    scope_spans = field(2, field(1, field(1, b"test")) + b"".join(field(2, s) for s in spans))
    return field(1, resource + scope_spans)


def gzip_bomb(inflated_bytes: int) -> bytes:
    """gzip of `inflated_bytes` zero bytes, compressed in a stream (never all in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(inflated_bytes >> 20)]
    parts.append(compressor.flush())
    return b"".join(parts)


def deflate_bomb(inflated_bytes: int) -> bytes:
    """zlib-format deflate (HTTP's `deflate`) of `inflated_bytes` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(inflated_bytes >> 20)]
    parts.append(compressor.flush())
    return b"".join(parts)


__all__ = ["deflate_bomb", "field", "gzip_bomb", "int_value", "key_value", "model_call_attributes",
           "nested_value", "request", "span", "string_value", "varint"]
