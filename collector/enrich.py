"""Processor mode's span changes: cost and attribution on priced model calls, content stripped. Pure.

The attribute names live here and nowhere else, so they can follow the GenAI conventions' cost
proposal (`gen_ai.usage.cost.*`, still a proposal) by changing one line each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from pipeline.pricing import PriceCatalog, UnpricedError, price_usage
from pipeline.pricing.focus import Billing, billed_cost
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

#: prompt and completion content, on spans and span events, by every generation and library dialect
#: (reference/genai-semconv.md): exact keys, and key prefixes (indexed or nested forms)
CONTENT_KEYS: Final = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.tool.definitions",
    "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.content", "gen_ai.event.content",
    "input.value", "output.value", "ai.prompt", "ai.response.text", "ai.response.object", "ai.response.toolCalls",
    "langfuse.observation.input", "langfuse.observation.output", "traceloop.entity.input",
    "traceloop.entity.output",
})
#: on span events named gen_ai.* (gen_ai.user.message, gen_ai.choice, ...) these plain keys are content too
EVENT_CONTENT_KEYS: Final = frozenset({"content", "message", "messages", "body", "tool_calls", "arguments"})
CONTENT_PREFIXES: Final = ("gen_ai.prompt", "gen_ai.completion", "llm.prompts", "llm.input_messages",
                           "llm.output_messages", "ai.prompt.", "gen_ai.input.messages.", "gen_ai.output.messages.")


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
    for event in events:
        try:
            priced = price_usage(event, catalog)
        except UnpricedError:
            continue
        costs[(bytes.fromhex(event.trace_id), bytes.fromhex(event.span_id))] = SpanCost(
            billed_cost(priced, billing), billing.currency, event.attribution, event.adjusted_count)
    return costs


def is_content(key: str) -> bool:
    return key in CONTENT_KEYS or key.startswith(CONTENT_PREFIXES)


def _strip(attributes: object, also: frozenset[str] = frozenset()) -> None:
    kept = [kv for kv in attributes  # type: ignore[attr-defined]  # repeated KeyValue
            if not is_content(kv.key) and kv.key not in also]
    if len(kept) != len(attributes):  # type: ignore[arg-type]
        del attributes[:]  # type: ignore[attr-defined]
        attributes.extend(kept)  # type: ignore[attr-defined]


def _string(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


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
                if not keep_content:
                    _strip(span.attributes)
                    for event in span.events:
                        _strip(event.attributes, EVENT_CONTENT_KEYS if event.name.startswith("gen_ai.")
                               else frozenset())
                    for link in span.links:
                        _strip(link.attributes)
                cost = costs.get((span.trace_id, span.span_id))
                if cost is None:
                    continue
                added = [KeyValue(key=COST_AMOUNT, value=AnyValue(double_value=float(cost.amount))),
                         _string(COST_CURRENCY, cost.currency), _string(COST_SOURCE, COST_SOURCE_LOCAL),
                         *(_string(ATTRIBUTION_PREFIX + name, value) for name, value in cost.attribution.items())]
                if cost.adjusted_count is not None:
                    added.append(_string(ADJUSTED_COUNT, cost.adjusted_count))
                ours = {kv.key for kv in added}
                # a client's own value of one of our attributes is replaced, not doubled
                if any(kv.key in ours for kv in span.attributes):
                    kept = [kv for kv in span.attributes if kv.key not in ours]
                    del span.attributes[:]
                    span.attributes.extend(kept)
                span.attributes.extend(added)
    return spans


__all__ = ["ADJUSTED_COUNT", "ATTRIBUTION_PREFIX", "CONTENT_KEYS", "CONTENT_PREFIXES", "COST_AMOUNT",
           "COST_CURRENCY", "COST_SOURCE", "EVENT_CONTENT_KEYS", "SpanCost", "enrich_request", "is_content",
           "span_costs"]
