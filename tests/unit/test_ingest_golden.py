"""The collector's whole output for a mixed corpus, pinned byte for byte: a refactor of the ingest path must not
change one usage event, dead letter, outcome or OTLP message.

The corpus covers every dialect in `tests/dialects.py` and the edges around them: spans that are not usage,
bad token counts, a missing model, non-scalar and overlong values, sampled and nested calls, attribution from
span, resource and an ingest token (spoofed claims included), hashed user ids, event-time bounds, spans the
decoder could not read whole, and `attribution.on_missing: reject`. The expected output
(`testdata/ingest_golden.json`) was written by the ingest code before its rewrite for speed; regenerate it only
for an intended change of behaviour, and review the diff:

    .venv/bin/python -m tests.unit.test_ingest_golden
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from collector.attribution import token_identities
from collector.decode import decode_protobuf
from collector.ingest import NestedCallFilter, ingest_request
from collector.normalize import READ_KEYS, InvalidSpan, normalize_span
from schemas.config import AttributionConfig, Config
from schemas.usage import encode_usage_batch
from tests.dialects import DIALECTS
from tests.support import key_values, make_request

GOLDEN = Path(__file__).parent / "testdata" / "ingest_golden.json"
RECEIVED_NS = 1_764_590_400 * 10**9  # 2025-12-01T12:00:00Z
USER_KEY = b"golden-user-id-key-0123456789abcdef"
CONFIG = Config()
REJECTING = dataclasses.replace(CONFIG, attribution=AttributionConfig(required=("team", "use_case", "env"),
                                                                     on_missing="reject"))
IDENTITIES = token_identities({"tok-a": {"team": "alpha", "key": "key-a"}, "tok-b": {"team": "beta"}},
                              CONFIG.collector.max_value_chars)
CALL: Mapping[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                           "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1000,
                           "gen_ai.usage.output_tokens": 100}
_ids = itertools.count(1)  # restarted by corpus(): the same corpus in every run


def span(attrs: Mapping[str, Any], *, extra: tuple[KeyValue, ...] = (), trace: int = 0, parent: int = 0,
         start_ns: int = RECEIVED_NS - 10**9, **fields: Any) -> Span:
    """A span with ids and times of its own that do not depend on the clock or on other tests."""
    n = next(_ids)
    made = Span(trace_id=(trace or n).to_bytes(16, "big"), span_id=n.to_bytes(8, "big"),
                parent_span_id=parent.to_bytes(8, "big") if parent else b"", name="call",
                start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + 10**9, **fields)
    made.attributes.extend([*key_values(attrs), *extra])
    return made


def _array(key: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="gpt-4o")])))


def _kvlist(key: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(kvlist_value=KeyValueList(values=key_values({"a": "b"}))))


def _edges() -> list[Span]:
    return [
        span({"http.request.method": "POST", "server.address": "api.openai.com"}),  # not usage
        span({**CALL, "gen_ai.operation.name": "invoke_agent"}),  # an agent's sum of its calls
        span({"gen_ai.request.model": "gpt-4o"}),  # names a model, reports nothing
        span({**CALL, "gen_ai.usage.input_tokens": -1}),
        span({**CALL, "gen_ai.usage.output_tokens": 10**13}),
        span({**CALL, "gen_ai.usage.input_tokens": "many"}),
        span({**CALL, "gen_ai.usage.input_tokens": "1200", "gen_ai.usage.output_tokens": 30.0}),
        span({**CALL, "gen_ai.usage.output_tokens": 30.5}),
        span({**CALL, "gen_ai.usage.input_tokens": True}),
        span({k: v for k, v in CALL.items() if k != "gen_ai.request.model"}),  # tokens, no model
        span({"gen_ai.operation.name": "chat"}, status=Status(code=Status.STATUS_CODE_ERROR)),
        span({**CALL, "error.type": "timeout"}),
        span(CALL, status=Status(code=Status.STATUS_CODE_ERROR)),
        span({k: v for k, v in CALL.items() if k != "gen_ai.request.model"},
             extra=(_array("gen_ai.request.model"), _kvlist("gen_ai.response.model"))),
        span({**CALL, "gen_ai.request.model": "m" * 5000, "feature.name": "u" * 5000}),
        span({**CALL, "gen_ai.request.model": "", "gen_ai.response.model": "gpt-4o-2024-08-06"}),
        span({**CALL, "gen_ai.provider.name": "", "server.address": "API.Mistral.AI"}),
        span({**CALL, "gen_ai.provider.name": " Bedrock "}),
        span({**CALL, "gen_ai.operation.name": "EMBEDDING"}),
        span({"gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 5, "gen_ai.request.model": "m",
              "traceloop.entity.name": "x"}),
        span({"llm.request.type": "completion", "gen_ai.request.model": "gpt-3.5-turbo-instruct",
              "gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 5}),
        span({"openinference.span.kind": "chain", "llm.token_count.prompt": 10}),
        span({"langfuse.observation.usage_details": "not json", "langfuse.observation.model.name": "gpt-4o"}),
        span({"langfuse.observation.usage_details": "[1]", "langfuse.observation.model.name": "gpt-4o"}),
        span({"langfuse.observation.usage_details": '{"input": 1.5}', "langfuse.observation.model.name": "gpt-4o"}),
        span({"litellm.call_id": "c", "llm.request.type": "embedding", "gen_ai.system": "cohere",
              "litellm.provider.model": "embed-v4", "gen_ai.usage.input_tokens": 10,
              "metadata.usage_object": "not a literal"}),
        span({**CALL, "gen_ai.usage.cost": 0.25, "openai.request.service_tier": "priority",
              "gen_ai.usage.audio.input_tokens": 10, "llm.token_count.prompt_details.audio": 20}),
        span({**CALL, "gen_ai.usage.video.input_tokens": -5}),
        # attribution: span over resource, scalar kinds, user ids
        span({**CALL, "team.name": "span-team", "feature.name": 7, "env": True, "cost_center": 1.5,
              "enduser.id": "alice@example.com", "tenant.tier": "gold", "gen_ai.virtual_key": "key-a"}),
        span({**CALL, "user.id": 12345}),
        # sampling: 1/4, always kept, malformed
        span(CALL, trace_state="ot=th:c"),
        span(CALL, trace_state="ot=th:0"),
        span(CALL, trace_state="ot=th:zz"),
        span(CALL, trace_state="ot=th:fffffffffffff"),
        # event time and ids
        span(CALL, start_ns=RECEIVED_NS - 10**15),
        span(CALL, start_ns=RECEIVED_NS + 10**15),
        Span(trace_id=b"\x01" * 8, span_id=b"\x02" * 8, start_time_unix_nano=RECEIVED_NS,
             attributes=key_values(CALL)),
    ]


def _nested() -> list[Span]:
    """A framework span wrapping the SDK span (both with usage) and two sibling calls of one trace."""
    outer_id = next(_ids)
    outer = Span(trace_id=(10**6).to_bytes(16, "big"), span_id=outer_id.to_bytes(8, "big"),
                 start_time_unix_nano=RECEIVED_NS - 10**9, attributes=key_values(CALL))
    return [span(CALL, trace=10**6, parent=outer_id), outer, span(CALL, trace=10**6 + 1, parent=outer_id),
            span(CALL, trace=10**6 + 1, parent=outer_id)]


def _undecodable() -> bytes:
    """One call whose attribute is not UTF-8 (the decoder salvages and rejects it), beside a good one."""
    request = make_request([span({**CALL, "bad": "BAD_UTF8"}), span(CALL)], {"team.name": "t"})
    payload: bytes = request.SerializeToString()
    return payload.replace(b"BAD_UTF8", b"\xff\xfeD_UTF8")


def corpus() -> Iterator[tuple[str, ExportTraceServiceRequest, Config, str | None, bytes]]:
    """(name, request, config, ingest token, the request's protobuf bytes) for each request of the corpus."""
    global _ids  # noqa: PLW0603
    _ids = itertools.count(1)
    for d in DIALECTS:
        resource = d.resource or {"service.name": "svc", "team.name": "t", "deployment.environment.name": "prod"}
        request = make_request([span(d.attrs)], resource, d.scope)
        yield d.name, request, CONFIG, None, request.SerializeToString()
    resource = {"service.name": "svc", "team.name": "resource-team", "deployment.environment.name": "prod",
                "telemetry.sdk.name": "opentelemetry"}
    for name, config, token in (("edges", CONFIG, None), ("edges, rejecting", REJECTING, None),
                                ("edges, token a", CONFIG, "tok-a"), ("edges, token b", CONFIG, "tok-b")):
        request = make_request(_edges(), resource)
        yield name, request, config, token, request.SerializeToString()
    request = make_request(_nested(), resource, "opentelemetry.instrumentation.openai")
    yield "nested", request, CONFIG, None, request.SerializeToString()
    request = make_request([span({"gen_ai.usage.input_tokens": 5, "gen_ai.request.model": "m"})], {}, "openlit.x")
    yield "no resource", request, CONFIG, None, request.SerializeToString()
    yield "undecodable", ExportTraceServiceRequest(), CONFIG, None, _undecodable()


def ingest_corpus() -> dict[str, Any]:
    """What the collector makes of each request of the corpus, as JSON-ready values."""
    out: dict[str, Any] = {}
    for name, _, config, token, payload in corpus():
        decoded = decode_protobuf(payload)
        result = ingest_request(decoded.request, config, IDENTITIES.get(token or ""), NestedCallFilter(),
                                RECEIVED_NS, rejected=decoded.rejected, user_key=USER_KEY)
        out[name] = {
            "events": orjson.loads(encode_usage_batch(result.events)) if result.events else None,
            "dead_letters": [orjson.loads(d.encode()) for d in result.dead_letters],
            "outcomes": dict(sorted(result.outcomes.items())),
            "rejected_spans": result.rejected_spans,
            "error_message": result.error_message,
        }
    return out


def test_the_collector_output_for_the_corpus_is_unchanged() -> None:
    expected = orjson.loads(GOLDEN.read_bytes())
    actual = ingest_corpus()
    assert list(actual) == list(expected)
    for name, result in actual.items():
        assert result == expected[name], name


class ReadAttrs(Mapping[str, AnyValue]):
    """A span's attributes that remember every key looked up."""

    def __init__(self, attrs: Mapping[str, AnyValue], read: set[str]) -> None:
        self._attrs, self._read = attrs, read

    def __getitem__(self, key: str) -> AnyValue:
        self._read.add(key)
        return self._attrs[key]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("normalize_span looks attributes up by name; it must not depend on the others")

    def __len__(self) -> int:
        return len(self._attrs)


def test_every_attribute_normalisation_reads_is_one_the_collector_converts() -> None:
    read: set[str] = set()
    for _, request, _, _, _ in corpus():
        for rs in request.resource_spans:
            resource = {kv.key: kv.value for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = ReadAttrs({kv.key: kv.value for kv in s.attributes}, read)
                    with contextlib.suppress(InvalidSpan):  # what it read before refusing counts too
                        normalize_span(s, attrs, ReadAttrs(resource, read), ss.scope.name, max_tokens=10**9,
                                       max_chars=256)
    assert "gen_ai.usage.input_tokens" in read
    assert read <= READ_KEYS, sorted(read - READ_KEYS)


if __name__ == "__main__":
    GOLDEN.write_bytes(orjson.dumps(ingest_corpus(), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {GOLDEN}")
