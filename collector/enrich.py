"""Processor mode's span changes: cost and attribution on priced model calls, content stripped. Pure.

The attribute names live here and nowhere else, so they can follow the GenAI conventions' cost
proposal (`gen_ai.usage.cost.*`, still a proposal) by changing one line each.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Final

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pipeline.pricing import PriceCatalog, UnpricedError, price_usages
from pipeline.pricing.focus import Billing, billed_cost
from schemas.content import CONTENT_KEYS, CONTENT_PREFIXES, is_content
from schemas.usage import UsageEvent

#: the cost of the call in `COST_CURRENCY` (double: what tracing backends sum and chart; the exact decimal is
#: the FOCUS rows' BilledCost sum, which this is the nearest double to)
COST_AMOUNT: Final = "gen_ai.usage.cost.amount"
COST_CURRENCY: Final = "gen_ai.usage.cost.currency"
#: "local": priced by spendstream from its price catalog, not reported by the provider
COST_SOURCE: Final = "gen_ai.usage.cost.source"
COST_SOURCE_LOCAL: Final = "local"
#: + dimension name (team, use_case, env, app, key, cost_center, ...): the attribution spendstream resolved
ATTRIBUTION_PREFIX: Final = "spendstream.attribution."
#: a sampled call (tracestate ot=th:...): the calls its cost stands for
ADJUSTED_COUNT: Final = "spendstream.sampling.adjusted_count"

#: on span events named gen_ai.* (gen_ai.user.message, gen_ai.choice, ...) these plain keys are content too
EVENT_CONTENT_KEYS: Final = frozenset({"content", "message", "messages", "body", "tool_calls", "arguments"})


@dataclass(frozen=True, slots=True)
class SpanCost:
    """What spendstream adds to one model-call span."""

    amount: Decimal
    currency: str
    attribution: Mapping[str, str]
    adjusted_count: str | None = None


def span_costs(events: Sequence[UsageEvent], catalog: PriceCatalog, billing: Billing
               ) -> dict[tuple[bytes, bytes], SpanCost]:
    """The cost of each call the workers will price, as they will (the same pure core: the FOCUS rows'
    BilledCost sum). A call without a price gets none: the workers dead-letter it, and 0 would be a lie."""
    costs = {}
    for event, priced in zip(events, price_usages(events, catalog), strict=True):
        if isinstance(priced, UnpricedError):
            continue
        costs[(bytes.fromhex(event.trace_id), bytes.fromhex(event.span_id))] = SpanCost(
            billed_cost(priced, billing), billing.currency, event.attribution, event.adjusted_count)
    return costs


def _is_event_content(key: str) -> bool:
    return key in EVENT_CONTENT_KEYS or is_content(key)


def _drop(attributes: RepeatedCompositeFieldContainer[KeyValue], unwanted: Callable[[str], bool]) -> None:
    # deleted in place, last first: rebuilding the list would copy every attribute that stays
    for index in reversed([i for i, kv in enumerate(attributes) if unwanted(kv.key)]):
        del attributes[index]


def _string(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _amount_prefix() -> bytes:
    """A Span's wire bytes holding only the COST_AMOUNT attribute, without its 8-byte double: the double
    follows, little-endian (protobuf's fixed64)."""
    probe: bytes = Span(attributes=[KeyValue(key=COST_AMOUNT, value=AnyValue(double_value=1.0))]).SerializeToString()
    assert probe.endswith(_DOUBLE.pack(1.0))
    return probe[:-_DOUBLE.size]


_DOUBLE: Final = struct.Struct("<d")
_AMOUNT_PREFIX: Final = _amount_prefix()


@lru_cache(maxsize=4096)
def _rest_of_cost(currency: str, attribution: tuple[tuple[str, str], ...], adjusted_count: str | None) -> bytes:
    """The other attributes a priced span gains, as Span wire bytes; most calls repeat an attribution."""
    added = [_string(COST_CURRENCY, currency), _string(COST_SOURCE, COST_SOURCE_LOCAL),
             *(_string(ATTRIBUTION_PREFIX + name, value) for name, value in attribution)]
    if adjusted_count is not None:
        added.append(_string(ADJUSTED_COUNT, adjusted_count))
    wire: bytes = Span(attributes=added).SerializeToString()
    return wire


def _cost_bytes(cost: SpanCost) -> bytes:
    # repeated fields concatenate on the wire: merging these bytes into a span appends the attributes, in C,
    # at a fraction of what building KeyValue messages in Python costs (bench/ingest.py "forward core")
    return (_AMOUNT_PREFIX + _DOUBLE.pack(float(cost.amount))
            + _rest_of_cost(cost.currency, tuple(cost.attribution.items()), cost.adjusted_count))


#: one search over a span's attribute keys (newline-joined) instead of a Python test per key
_CONTENT_SEARCH: Final = re.compile("^(?:" + "|".join(re.escape(k) for k in sorted(CONTENT_KEYS)) + "|"
                                    + "|".join(re.escape(p) + ".*" for p in CONTENT_PREFIXES) + ")$", re.MULTILINE)
#: the attributes (and the prefix) spendstream sets on a forwarded span
_OURS: Final = (COST_AMOUNT, COST_CURRENCY, COST_SOURCE, ATTRIBUTION_PREFIX, ADJUSTED_COUNT)
_OURS_SEARCH: Final = re.compile("^(?:" + "|".join(re.escape(name) for name in _OURS) + ")", re.MULTILINE)


def _is_ours(key: str) -> bool:
    return key.startswith(_OURS)


def enrich_request(request: ExportTraceServiceRequest, costs: Mapping[tuple[bytes, bytes], SpanCost], *,
                   keep_content: bool) -> int:
    """Add cost and attribution to the spans in `costs` (keyed by trace id and span id) and, unless
    `keep_content`, strip content attributes from every span, span event and link. Changes `request` in place;
    returns how many spans it holds.
    """
    spans = 0
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans += 1
                cost = costs.get((span.trace_id, span.span_id))
                if keep_content and cost is None:
                    continue
                keys = "\n".join([kv.key for kv in span.attributes])
                if not keep_content:
                    if _CONTENT_SEARCH.search(keys):
                        _drop(span.attributes, is_content)
                    for event in span.events:
                        _drop(event.attributes, _is_event_content if event.name.startswith("gen_ai.") else is_content)
                    for link in span.links:
                        _drop(link.attributes, is_content)
                if cost is None:
                    continue
                if _OURS_SEARCH.search(keys):  # a client's own value of one of our attributes: replaced, not doubled
                    _drop(span.attributes, _is_ours)
                span.MergeFromString(_cost_bytes(cost))
    return spans


__all__ = ["ADJUSTED_COUNT", "ATTRIBUTION_PREFIX", "CONTENT_KEYS", "CONTENT_PREFIXES", "COST_AMOUNT",
           "COST_CURRENCY", "COST_SOURCE", "EVENT_CONTENT_KEYS", "SpanCost", "enrich_request", "is_content",
           "span_costs"]
