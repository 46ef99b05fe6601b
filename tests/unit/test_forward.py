"""Processor mode's pure part: which attributes a forwarded span gains and loses; its configuration."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from collector.enrich import ADJUSTED_COUNT, COST_AMOUNT, COST_CURRENCY, COST_SOURCE, enrich_request, span_costs
from collector.ingest import NestedCallFilter, ingest_request
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.config import Config, ForwardConfig, load_config
from schemas.errors import ConfigError
from tests.dialects import DIALECTS
from tests.support import key_values, make_request, make_span

CONTENT = {"gen_ai.input.messages": "[..]", "gen_ai.output.messages": "[..]", "gen_ai.system_instructions": "be",
           "gen_ai.prompt.0.content": "hi", "gen_ai.completion.0.content": "yo", "llm.input_messages.0.message.content":
           "hi", "input.value": "hi", "output.value": "yo", "ai.prompt.messages": "[..]", "gen_ai.prompt": "hi",
           "gen_ai.tool.call.arguments": "{}", "traceloop.entity.input": "hi"}


def attrs_of(kvs: Iterable[KeyValue]) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in kvs:
        kind = kv.value.WhichOneof("value")
        assert kind, f"{kv.key} has no value"
        out[kv.key] = getattr(kv.value, kind)
    return out


def test_priced_calls_gain_cost_and_attribution_content_goes_everywhere_and_other_spans_keep_the_rest() -> None:
    call = make_span({**DIALECTS[0].attrs, **CONTENT})
    call.events.add(name="gen_ai.user.message", attributes=key_values({"content": "hi", "role": "user"}))
    http = make_span({"http.request.method": "GET", "message": "kept: not a gen_ai event", **CONTENT})
    http.events.add(name="exception", attributes=key_values({"exception.message": "boom"}))
    request = make_request([call, http])
    events = ingest_request(request, Config(), None, NestedCallFilter()).events
    catalog, billing = PriceCatalog(), Billing(currency="EUR", usd_rate=Decimal("0.92"))
    costs = span_costs(events, catalog, billing)
    assert enrich_request(request, costs, keep_content=False) == 2

    out_call, out_http = request.resource_spans[0].scope_spans[0].spans
    call_attrs, http_attrs = attrs_of(out_call.attributes), attrs_of(out_http.attributes)
    assert not set(CONTENT) & (set(call_attrs) | set(http_attrs))
    assert attrs_of(out_call.events[0].attributes) == {"role": "user"}
    assert attrs_of(out_http.events[0].attributes) == {"exception.message": "boom"}
    assert http_attrs == {"http.request.method": "GET", "message": "kept: not a gen_ai event"}
    [billed] = cost_records(events, catalog, billing).billed
    assert billed is not None and call_attrs[COST_AMOUNT] == float(billed)  # the FOCUS rows' BilledCost sum
    assert call_attrs[COST_CURRENCY] == "EUR" and call_attrs[COST_SOURCE] == "local"
    assert call_attrs["spendstream.attribution.team"] == "t"
    assert ADJUSTED_COUNT not in call_attrs


def test_keep_content_keeps_it_and_a_client_cost_attribute_is_replaced_not_doubled() -> None:
    call = make_span({**DIALECTS[0].attrs, **CONTENT, COST_AMOUNT: 99.0})
    call.trace_state = "ot=th:c"
    request = make_request([call])
    events = ingest_request(request, Config(), None, NestedCallFilter()).events
    enrich_request(request, span_costs(events, PriceCatalog(), Billing()), keep_content=True)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    attrs = attrs_of(span.attributes)
    assert set(CONTENT) <= set(attrs)
    assert [kv.key for kv in span.attributes].count(COST_AMOUNT) == 1 and attrs[COST_AMOUNT] != 99.0
    assert attrs[ADJUSTED_COUNT] == "4"


def test_an_unpriced_call_gets_no_cost_never_zero() -> None:
    call = make_span({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                      "gen_ai.request.model": "gpt-nope-9", "gen_ai.usage.input_tokens": 10,
                      "gen_ai.usage.output_tokens": 1})
    request = make_request([call])
    events = ingest_request(request, Config(), None, NestedCallFilter()).events
    assert len(events) == 1 and span_costs(events, PriceCatalog(), Billing()) == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("collector:\n  forward: {endpoint: 'h:4317', protocol: thrift}\n", "collector.forward.protocol (line 2)"),
    ("collector:\n  forward: {protocol: grpc}\n", "collector.forward (line 2): 'endpoint' is a required property"),
    ("collector:\n  forward: {endpoint: 'h:4317', queue_spans: 0}\n", "collector.forward.queue_spans (line 2)"),
    ("collector:\n  forward: {endpoint: 'h:4317', cert_file: c.pem}\n",
     "collector.forward.cert_file (line 2): cert_file and key_file go together"),
    ("collector:\n  forward: {endpoint: 'h:4318', protocol: http/protobuf}\n",
     "collector.forward.endpoint (line 2): 'h:4318' is not an http:// or https:// URL"),
])
def test_forward_mistakes_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "spendstream.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_forward_is_off_by_default_and_loads(tmp_path: Path) -> None:
    assert load_config(None).collector.forward is None
    path = tmp_path / "spendstream.yaml"
    path.write_text("collector:\n  forward:\n    endpoint: https://otlp.example.com/v1/traces\n"
                    "    protocol: http/protobuf\n    headers: {authorization: Bearer x}\n")
    forward = load_config(path).collector.forward
    assert forward == ForwardConfig(endpoint="https://otlp.example.com/v1/traces", protocol="http/protobuf",
                                    headers={"authorization": "Bearer x"})
    assert forward.compression == "gzip" and not forward.keep_content
