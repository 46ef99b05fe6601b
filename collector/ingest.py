"""Turn one decoded OTLP trace request into usage events and dead letters. Pure apart from a bounded memory.

The memory (`NestedCallFilter`) remembers recently counted calls so that a model call
instrumented twice (a framework span wrapping the SDK span, both with usage) counts once:
the innermost span wins, as the reference recipe says.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from fractions import Fraction
from typing import Final

import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector.attribution import (
    Attribution,
    DimensionReader,
    ResourceAttribution,
    SettledAttributions,
    TokenIdentity,
)
from collector.decode import RejectedSpan
from collector.normalize import READ_KEYS, InvalidSpan, SpanUsage, normalize_span
from collector.sampling import InvalidTraceState, adjusted_count, scaled
from schemas.config import AttributionConfig, CollectorConfig, Config
from schemas.deadletter import DeadLetter
from schemas.usage import TokenCounts, UsageEvent

#: How many rejection messages one OTLP answer carries; the count covers all of them.
MAX_MESSAGES = 5
_NS = 1_000_000_000
#: an adjusted count on the wire and in FOCUS rows: 6 decimal places (FOCUS quantities have 6)
_COUNT_QUANTUM: Final = Decimal("0.000001")
_EXACT: Final = Context(prec=60)


class NestedCallFilter:
    """Remembers (trace, parent span) of counted calls; a span that is such a parent is a wrapper.

    Spans end child-first, so the inner call normally arrives in the same or an earlier
    request than its wrapper. Bounded: the oldest entries are forgotten first.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self._capacity = capacity
        self._parents: OrderedDict[tuple[str, str], None] = OrderedDict()

    def is_wrapper(self, trace_id: str, span_id: str) -> bool:
        return (trace_id, span_id) in self._parents

    def remember(self, trace_id: str, parent_span_id: str) -> None:
        self._parents[(trace_id, parent_span_id)] = None
        if len(self._parents) > self._capacity:
            self._parents.popitem(last=False)


@dataclass(slots=True)
class IngestResult:
    events: list[UsageEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    rejected_spans: int = 0
    messages: list[str] = field(default_factory=list)
    #: outcome -> spans: accepted, not_usage, nested_duplicate, unallocated, spoofed, sampled,
    #: malformed_tracestate (counted as unsampled), rejected:<reason>
    outcomes: Counter[str] = field(default_factory=Counter)

    def reject(self, message: str, reason: str) -> None:
        self.rejected_spans += 1
        self.outcomes[f"rejected:{reason}"] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    @property
    def error_message(self) -> str:
        if not self.rejected_spans:
            return ""
        more = self.rejected_spans - len(self.messages)
        return "; ".join(self.messages) + (f"; and {more} more" if more > 0 else "")


def _read_keys(attribution: AttributionConfig) -> frozenset[str]:
    """The attributes the collector reads: normalisation's and the attribution dimensions' names."""
    return READ_KEYS.union(*attribution.dimensions.values())


def _attrs(kvs: object, wanted: frozenset[str]) -> dict[str, AnyValue]:
    """The `wanted` attributes by key. Each value read from protobuf costs a Python object, and a span
    typically carries more attributes than the collector reads (ids, request parameters, prompts), so the
    others are never converted."""
    return {key: kv.value for kv in kvs if (key := kv.key) in wanted}  # type: ignore[attr-defined]  # repeated KeyValue


@dataclass(slots=True)
class PreparedRequest:
    """A request normalised and attributed, before the nested-call check (which needs the shared memory)."""

    result: IngestResult
    candidates: list[tuple[UsageEvent, str | None]]


def ingest_request(
    request: ExportTraceServiceRequest,
    config: Config,
    identity: TokenIdentity | None,
    nested: NestedCallFilter,
    received_ns: int | None = None,
    *,
    rejected: Sequence[RejectedSpan] = (),
    user_key: bytes | None = None,
    settled: SettledAttributions | None = None,
) -> IngestResult:
    """Normalise and attribute every span of a request: `prepare_request`, then `finish_request`."""
    prepared = prepare_request(request, config, identity, received_ns, rejected=rejected, user_key=user_key,
                               settled=settled)
    return finish_request(prepared, nested)


def prepare_request(
    request: ExportTraceServiceRequest,
    config: Config,
    identity: TokenIdentity | None,
    received_ns: int | None = None,
    *,
    rejected: Sequence[RejectedSpan] = (),
    user_key: bytes | None = None,
    settled: SettledAttributions | None = None,
) -> PreparedRequest:
    """Normalise and attribute every span of a request. Safe on any thread (`settled` may be shared).

    Spans that are not model calls are skipped; model calls that cannot be priced as sent
    are rejected (counted in the OTLP partial success) and kept as dead letters. With
    `received_ns` (when the request arrived, Unix ns), a model call that started outside
    [received - collector.max_lateness_s, received + collector.max_skew_s] is one of them
    (`invalid_timestamp`): no client clock may move the pipeline's event time. `rejected` are
    the spans the decoder could not read whole: each is rejected, and dead-lettered when what
    is left of it is a model call. `user_key` is the HMAC key for user ids (None: user ids are
    dropped while `attribution.hash_user_ids` is on). `settled` keeps attributions from one request to the next
    (for this `config` and `user_key` only); without it, each request settles its own.
    """
    result = IngestResult()
    limits = config.collector
    wanted = _read_keys(config.attribution)
    dimensions = DimensionReader(config.attribution)
    memory = None if settled is None else settled.of(identity)

    def attribution_of(resource: dict[str, AnyValue]) -> ResourceAttribution:
        return ResourceAttribution(resource, dimensions, config.attribution, identity, limits.max_value_chars,
                                   user_key=user_key, settled=memory)

    candidates: list[tuple[UsageEvent, str | None]] = []
    if received_ns is not None:  # the bounds tested inline: a call per span costs more than the test
        earliest = received_ns - limits.max_lateness_s * _NS
        latest = received_ns + limits.max_skew_s * _NS
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes, wanted)
        who_pays = attribution_of(resource)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            for span in scope_spans.spans:
                attrs = _attrs(span.attributes, wanted)
                trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
                try:
                    usage = normalize_span(
                        span, attrs, resource, scope_name,
                        max_tokens=limits.max_token_count, max_chars=limits.max_value_chars,
                    )
                    if usage is None:
                        result.outcomes["not_usage"] += 1
                        continue
                    if len(trace_id) != 32 or len(span_id) != 16:
                        raise InvalidSpan("invalid_span_id", "trace_id must be 16 bytes and span_id 8 bytes")
                    start_ns = span.start_time_unix_nano
                    if received_ns is not None and not earliest <= start_ns <= latest:
                        check_start_time(start_ns, received_ns, limits)
                    trace_state = span.trace_state
                    count = _sampling_count(trace_state, result) if trace_state else None
                    if count is not None:
                        usage = _sampled(usage, count, limits.max_token_count)
                except InvalidSpan as exc:
                    who = who_pays.of(attrs)
                    result.reject(f"span {span_id or '?'}: {exc.detail}", exc.reason)
                    result.dead_letters.append(DeadLetter(
                        reason=exc.reason, detail=exc.detail, stage="collector", attribution_key=who.key,
                        usage_id=f"{trace_id}-{span_id}",
                        fields={"attribution": dict(who.values), "scope": scope_name[:limits.max_value_chars]},
                    ))
                    continue
                who = who_pays.of(attrs)
                if who.missing and config.attribution.on_missing == "reject":
                    result.reject(f"span {span_id}: missing attribution {', '.join(who.missing)}",
                                  "missing_attribution")
                    result.dead_letters.append(DeadLetter(
                        reason="missing_attribution", detail=f"missing {', '.join(who.missing)}",
                        stage="collector", attribution_key=who.key, usage_id=f"{trace_id}-{span_id}",
                        fields=_event_fields(usage, dict(who.values)),
                    ))
                    continue
                if who.spoofed:
                    result.outcomes["spoofed"] += 1
                if who.missing:
                    result.outcomes["unallocated"] += 1
                if count is not None:
                    result.outcomes["sampled"] += 1
                parent = span.parent_span_id.hex() or None
                event = _event(span, usage, who, ids=(trace_id, span_id), start_ns=start_ns, parent=parent, count=count)
                candidates.append((event, parent))
    for item in rejected:
        _reject_undecodable(item, result, config, wanted, attribution_of)
    return PreparedRequest(result, candidates)


def finish_request(prepared: PreparedRequest, nested: NestedCallFilter) -> IngestResult:
    """Drop the wrappers of calls already counted (the innermost span wins) and remember this request's calls."""
    result, candidates = prepared.result, prepared.candidates
    parents_here = {(event.trace_id, parent) for event, parent in candidates if parent}
    events = result.events
    for event, parent in candidates:
        if (event.trace_id, event.span_id) in parents_here or nested.is_wrapper(event.trace_id, event.span_id):
            result.outcomes["nested_duplicate"] += 1
            continue
        if parent:
            nested.remember(event.trace_id, parent)
        events.append(event)
    if events:  # counted once, not per call
        result.outcomes["accepted"] += len(events)
    return result


def _reject_undecodable(item: RejectedSpan, result: IngestResult, config: Config, wanted: frozenset[str],
                        attribution_of: Callable[[dict[str, AnyValue]], ResourceAttribution]) -> None:
    """Refuse a span the decoder could not read whole; dead-letter it if what is left is a model call."""
    limits = config.collector
    span = item.span
    attrs, resource = _attrs(span.attributes, wanted), _attrs(item.resource.attributes, wanted)
    trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
    result.reject(f"span {span_id or '?'}: {item.detail}", item.reason)
    try:
        usage = normalize_span(span, attrs, resource, item.scope_name,
                               max_tokens=limits.max_token_count, max_chars=limits.max_value_chars)
    except InvalidSpan:
        usage = None
        is_call = True
    else:
        is_call = usage is not None
    if not is_call:
        return
    who = attribution_of(resource).of(attrs)
    fields = (_event_fields(usage, dict(who.values)) if usage is not None else {"attribution": dict(who.values)})
    result.dead_letters.append(DeadLetter(
        reason=item.reason, detail=item.detail, stage="collector", attribution_key=who.key,
        usage_id=f"{trace_id}-{span_id}" if trace_id and span_id else None,
        fields={**fields, "scope": item.scope_name[:limits.max_value_chars]},
    ))


def check_start_time(start_ns: int, received_ns: int, limits: CollectorConfig) -> None:
    """Raises InvalidSpan (`invalid_timestamp`) when a call's start is outside the accepted event-time window."""
    earliest = received_ns - limits.max_lateness_s * _NS
    latest = received_ns + limits.max_skew_s * _NS
    if earliest <= start_ns <= latest:
        return
    where = (f"{(received_ns - start_ns) // _NS} s before it arrived (more than collector.max_lateness_s = "
             f"{limits.max_lateness_s})" if start_ns < earliest else
             f"{(start_ns - received_ns) // _NS} s after it arrived (more than collector.max_skew_s = "
             f"{limits.max_skew_s})")
    raise InvalidSpan("invalid_timestamp", f"start time {start_ns} ns is {where}")


def _event_fields(usage: SpanUsage, attribution: dict[str, str]) -> dict[str, object]:
    return {
        "operation": usage.operation, "provider": usage.provider, "request_model": usage.request_model,
        "response_model": usage.response_model, "tokens": msgspec.structs.asdict(usage.tokens),
        "attribution": attribution,
    }


def _sampling_count(trace_state: str, result: IngestResult) -> Fraction | None:
    """The calls a span with a tracestate stands for when it was sampled; None for a measured call. A malformed
    threshold counts the span as measured (and is counted): a broken tracestate must not lose the call."""
    try:
        count = adjusted_count(trace_state)
    except InvalidTraceState:
        result.outcomes["malformed_tracestate"] += 1
        return None
    return None if count == 1 else count  # th:0: kept with probability 1, a measured call


def _sampled(usage: SpanUsage, count: Fraction, max_count: int) -> SpanUsage:
    """Token meters (and the modality breakdown, a subset of them) scaled to the estimate, once, by the exact
    rational count; priced downstream like any other.

    Every cost is then the exact price of whole tokens, as for a measured call, and FOCUS keeps
    ListCost = ListUnitPrice x PricingQuantity. Scaling the Decimal cost instead would need a non-terminating
    division for counts that are not whole (p not a power of two). Raises InvalidSpan when a meter's estimate, or
    the calls the span stands for, exceed `max_count` (collector.max_token_count), the edge limit of a measured count.
    """
    tokens = usage.tokens
    out = TokenCounts(input_uncached=scaled(tokens.input_uncached, count), cache_read=scaled(tokens.cache_read, count),
                      cache_write=scaled(tokens.cache_write, count), output=scaled(tokens.output, count),
                      reasoning=scaled(tokens.reasoning, count))
    # a threshold may claim up to 2^56 calls: unbounded, one span's estimate (or two spans' sum in a spend entry
    # or a budget bucket) would pass what a count on the wire holds, the message would not decode, and every other
    # call in it would be lost to the files or the budgets
    if max(out.input_uncached, out.cache_read, out.cache_write, out.output, out.reasoning, round(count)) > max_count:
        raise InvalidSpan("invalid_token_count", f"sampled at 1/{float(count):g}, it estimates more than "
                                                 f"collector.max_token_count ({max_count}) tokens or calls")
    modalities = {meter: scaled(n, count) for meter, n in usage.modality_tokens.items()}
    return msgspec.structs.replace(usage, tokens=out, modality_tokens=modalities)


def _count_text(count: Fraction) -> str:
    exact = _EXACT.divide(Decimal(count.numerator), Decimal(count.denominator))
    return format(exact.quantize(_COUNT_QUANTUM, context=_EXACT).normalize(), "f")


def _event(span: Span, usage: SpanUsage, who: Attribution, *, ids: tuple[str, str], start_ns: int,
           parent: str | None, count: Fraction | None) -> UsageEvent:
    """The usage event of a call; `ids`: its trace and span id in hex, `start_ns`: its start time, `count`: the
    calls a sampled span stands for (its tokens already scaled)."""
    trace_id, span_id = ids
    extra = {"reported_cost_usd": usage.reported_cost_usd} if usage.reported_cost_usd else {}
    if usage.modality_tokens:
        extra |= {f"tokens.{meter}": str(count) for meter, count in usage.modality_tokens.items()}
    return UsageEvent(
        id=f"{trace_id}-{span_id}",
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=span.end_time_unix_nano,
        operation=usage.operation,
        provider=usage.provider,
        request_model=usage.request_model,
        response_model=usage.response_model,
        tokens=usage.tokens,
        attribution=who.values,
        attribution_key=who.key,
        allocated=not who.missing,  # `who.allocated`, without a property call per event
        service_tier=usage.service_tier,
        server_address=usage.server_address,
        dialect=usage.dialect,
        error=usage.error,
        extra=extra,
        adjusted_count=None if count is None else _count_text(count),
    )
