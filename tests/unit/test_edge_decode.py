"""The edge's pure parts: bounded inflating, and decoding that names why a span cannot be read."""

from __future__ import annotations

import gzip
import os
import time
import zlib
from collections.abc import Callable, Generator, Sequence

import pytest

from collector.decode import MAX_ATTRIBUTE_DEPTH, MalformedRequest, decode_json, decode_protobuf
from collector.inflate import PIECE_BYTES, RequestTooLarge, UnsupportedEncoding, inflater_for
from collector.ingest import IngestResult, NestedCallFilter, ingest_request
from schemas.config import Config
from tests import otlp_wire as wire
from tests.support import make_request, make_span, to_otlp_json

GOOD = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}


def inflate_all(encoding: str | None, body: bytes, chunk: int = 65536) -> bytes:
    inflater = inflater_for(encoding)
    out: list[bytes] = []
    for start in range(0, len(body), chunk):
        out.extend(inflater.feed(body[start:start + chunk]))
    inflater.finish()
    return b"".join(out)


class TestInflate:
    payload = os.urandom(300_000) + bytes(2_000_000)

    @pytest.mark.parametrize(("encoding", "compress"), [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send it
        ("identity", lambda b: b),
        (None, lambda b: b),
    ])
    def test_round_trip(self, encoding: str | None, compress: Callable[[bytes], bytes]) -> None:
        assert inflate_all(encoding, compress(self.payload)) == self.payload

    def test_concatenated_gzip_members(self) -> None:
        assert inflate_all("gzip", gzip.compress(b"abc") + gzip.compress(b"def"), chunk=7) == b"abcdef"

    def test_a_bomb_comes_out_in_bounded_pieces(self) -> None:
        bomb = wire.gzip_bomb(64 << 20)
        inflater = inflater_for("gzip")
        pieces = inflater.feed(bomb[:65536])
        first = next(pieces)
        assert len(first) <= PIECE_BYTES
        # the caller stops here: nothing more was inflated than it took
        assert isinstance(pieces, Generator)  # feed's pieces come from a generator, which the caller closes
        pieces.close()

    @pytest.mark.parametrize(("encoding", "body", "message"), [
        ("gzip", b"not gzip at all", "not a valid gzip stream"),
        # mtime=0: the header's time is in the test's id, which every pytest-xdist worker must compute alike
        ("gzip", gzip.compress(b"x" * 1000, mtime=0)[:-12], "truncated"),
        ("gzip", gzip.compress(b"abc", mtime=0) + b"junk!", "not a valid gzip stream"),
        ("deflate", zlib.compress(b"abc") + b"junk", "data after the end"),
        ("gzip", b"", "body is empty"),
    ])
    def test_invalid_streams_are_malformed(self, encoding: str, body: bytes, message: str) -> None:
        with pytest.raises(MalformedRequest, match=message):
            inflate_all(encoding, body)

    def test_unknown_encoding(self) -> None:
        with pytest.raises(UnsupportedEncoding, match="br"):
            inflater_for("br")

    def test_too_large_is_permanent(self) -> None:
        from schemas.errors import PermanentError  # noqa: PLC0415

        assert issubclass(RequestTooLarge, PermanentError)


def ingest_bytes(payload: bytes, encoding: str = "protobuf") -> IngestResult:
    decoded = decode_protobuf(payload) if encoding == "protobuf" else decode_json(payload)
    return ingest_request(decoded.request, Config(), None, NestedCallFilter(), rejected=decoded.rejected)


def ids(n: int) -> tuple[bytes, bytes]:
    return os.urandom(16), n.to_bytes(8, "big")


class TestUndecodableSpans:
    now = time.time_ns()

    def span(self, n: int, extra: Sequence[bytes] = ()) -> bytes:
        trace, span_id = ids(n)
        return wire.span(trace, span_id, wire.model_call_attributes(list(extra)), self.now)

    @pytest.mark.parametrize("depth", [MAX_ATTRIBUTE_DEPTH + 3, 150, 10_000])
    def test_deep_attribute_is_dead_lettered_and_the_rest_kept(self, depth: int) -> None:
        deep = wire.key_value(b"deep.attr", wire.nested_value(depth))
        result = ingest_bytes(wire.request([self.span(1), self.span(2, [deep])]))
        assert [e.span_id for e in result.events] == [(1).to_bytes(8, "big").hex()]
        assert result.rejected_spans == 1
        [letter] = result.dead_letters
        assert letter.reason == "attribute_too_deep"
        assert "'deep.attr'" in letter.detail and "32 levels" in letter.detail
        assert letter.usage_id and letter.usage_id.endswith((2).to_bytes(8, "big").hex())
        assert letter.fields["request_model"] == "gpt-4o"  # what could be read of the call
        assert letter.fields["tokens"]["output"] == 10
        assert "nested deeper" in result.error_message

    def test_invalid_utf8_in_a_span_is_dead_lettered_with_its_reason(self) -> None:
        bad = wire.key_value(b"gen_ai.input.messages", wire.string_value(b"\xc3\x28 prompt"))
        result = ingest_bytes(wire.request([self.span(1), self.span(2, [bad])]))
        assert len(result.events) == 1 and result.rejected_spans == 1
        [letter] = result.dead_letters
        assert letter.reason == "invalid_utf8"
        assert "gen_ai.input.messages" in letter.detail
        assert "prompt" not in str(letter.fields)  # content never leaves, not even from a broken span

    def test_invalid_utf8_in_the_resource_rejects_its_spans_instead_of_unallocating_them(self) -> None:
        resource = [wire.key_value(b"team.name", wire.string_value(b"t\xffeam")),
                    wire.key_value(b"service.name", wire.string_value(b"svc"))]
        result = ingest_bytes(wire.request([self.span(1), self.span(2)], resource_attributes=resource))
        assert result.events == []
        assert result.rejected_spans == 2
        assert {d.reason for d in result.dead_letters} == {"invalid_resource"}
        assert all("'team.name'" in d.detail for d in result.dead_letters)
        assert result.outcomes["rejected:invalid_resource"] == 2
        assert result.outcomes["unallocated"] == 0

    def test_deep_resource_attribute_rejects_its_spans(self) -> None:
        resource = [wire.key_value(b"deep", wire.nested_value(10_000))]
        result = ingest_bytes(wire.request([self.span(1)], resource_attributes=resource))
        [letter] = result.dead_letters
        assert letter.reason == "invalid_resource" and "nested deeper" in letter.detail

    def test_a_broken_span_that_is_no_model_call_is_refused_without_a_dead_letter(self) -> None:
        trace, span_id = ids(3)
        plain = wire.span(trace, span_id, [wire.key_value(b"http.route", wire.string_value(b"/\xff"))], self.now)
        result = ingest_bytes(wire.request([self.span(1), plain]))
        assert result.rejected_spans == 1 and result.dead_letters == []

    def test_garbage_is_still_malformed(self) -> None:
        with pytest.raises(MalformedRequest):
            decode_protobuf(b"\xff\xff\xff\xff garbage")


class TestJsonDepth:
    def nested_json(self, depth: int) -> dict[str, object]:
        value: dict[str, object] = {"stringValue": "leaf"}
        for _ in range(depth - 1):
            value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
        return value

    def test_deep_json_attribute_is_dead_lettered(self) -> None:
        import orjson  # noqa: PLC0415

        good, bad = make_span(GOOD), make_span(GOOD)
        data = orjson.loads(to_otlp_json(make_request([good, bad])))
        spans = data["resourceSpans"][0]["scopeSpans"][0]["spans"]
        # 60 levels: orjson writes at most 255 JSON levels (3 a level); the reader's limit is 1,024
        spans[1]["attributes"].append({"key": "deep.attr", "value": self.nested_json(60)})
        result = ingest_bytes(orjson.dumps(data), "json")
        assert [e.span_id for e in result.events] == [good.span_id.hex()]
        [letter] = result.dead_letters
        assert letter.reason == "attribute_too_deep" and "'deep.attr'" in letter.detail
        assert letter.usage_id == f"{bad.trace_id.hex()}-{bad.span_id.hex()}"

    def test_json_deeper_than_the_parser_is_malformed(self) -> None:
        body = b'{"resourceSpans": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        with pytest.raises(MalformedRequest, match="nested deeper than 1024"):
            decode_json(body)

    def test_json_at_the_limit_is_accepted(self) -> None:
        import orjson  # noqa: PLC0415

        span = make_span(GOOD)
        data = orjson.loads(to_otlp_json(make_request([span])))
        data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append(
            {"key": "deep.ok", "value": self.nested_json(MAX_ATTRIBUTE_DEPTH)})
        result = ingest_bytes(orjson.dumps(data), "json")
        assert len(result.events) == 1 and result.rejected_spans == 0
