"""Stage 1's pure core: usage events -> FOCUS row records and dead letters for what cannot be priced.

In two steps, so the stage can send a batch's spend before its rows: `price_calls` (what each call bills, the
dead letters and the metric totals), then `focus_records` (the rows of the priced calls, ~3/4 of the CPU).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.observability.cardinality import METRIC_DIMENSIONS
from pipeline.pricing.catalog import PriceCatalog, UnpricedError
from pipeline.pricing.focus import Billing, focus_values, line_costs
from pipeline.pricing.price import PricedUsage, price_usages
from schemas.codec import Record
from schemas.config import UNALLOCATED
from schemas.deadletter import DeadLetter
from schemas.usage import UsageEvent


@dataclass(slots=True)
class MeterTotal:
    cost: Decimal = Decimal(0)
    tokens: int = 0


@dataclass(slots=True)
class CostOutput:
    rows: list[Record] = field(default_factory=list)
    #: the priced calls, in input order, and the BilledCost of each of their lines: what their rows are made of
    #: (focus_records)
    priced: list[PricedUsage] = field(default_factory=list)
    line_costs: list[list[Decimal]] = field(default_factory=list)
    dead_letters: list[Record] = field(default_factory=list)
    priced_events: int = 0
    #: per input event, in order: its billed cost (the sum of its rows' BilledCost), None if unpriced
    billed: list[Decimal | None] = field(default_factory=list)
    unpriced: Counter[str] = field(default_factory=Counter)
    #: (provider, model) -> why it has no price, for one alert per model
    unpriced_models: dict[tuple[str | None, str | None], UnpricedError] = field(default_factory=dict)
    #: for metrics: (team, use_case, env, app, provider, model) -> requests, and with the meter appended ->
    #: [billed cost, tokens]
    requests: Counter[tuple[str, ...]] = field(default_factory=Counter)
    by_meter: defaultdict[tuple[str, ...], MeterTotal] = field(default_factory=lambda: defaultdict(MeterTotal))

    def extend(self, other: CostOutput) -> None:
        """Append the output of the events priced after these."""
        self.rows += other.rows
        self.priced += other.priced
        self.line_costs += other.line_costs
        self.dead_letters += other.dead_letters
        self.priced_events += other.priced_events
        self.billed += other.billed
        self.unpriced.update(other.unpriced)
        for model, exc in other.unpriced_models.items():
            self.unpriced_models.setdefault(model, exc)
        self.requests.update(other.requests)
        for labels, total in other.by_meter.items():
            meter = self.by_meter[labels]
            meter.cost += total.cost
            meter.tokens += total.tokens


def unpriced_letter(event: UsageEvent, exc: UnpricedError) -> DeadLetter:
    return DeadLetter(
        reason=exc.reason, detail=str(exc), stage="pricing", attribution_key=event.attribution_key,
        usage_id=event.id,
        fields={"provider": event.provider, "model": event.model, "operation": event.operation,
                "start_time_unix_nano": event.start_time_unix_nano, "service_tier": event.service_tier,
                "tokens": {"input_uncached": event.tokens.input_uncached, "cache_read": event.tokens.cache_read,
                           "cache_write": event.tokens.cache_write, "output": event.tokens.output,
                           "reasoning": event.tokens.reasoning},
                "attribution": dict(event.attribution),
                # the call itself (ids, times, token counts, attribution: no content), for `spendstream reprice`
                "usage": event.to_dict()},
    )


def cost_records(events: Sequence[UsageEvent], catalog: PriceCatalog, billing: Billing) -> CostOutput:
    """Price each event; a priced event gives one FOCUS row per meter, keyed by its attribution key."""
    out = price_calls(events, catalog, billing)
    out.rows = focus_records(out.priced, out.line_costs, billing)
    return out


def price_calls(events: Sequence[UsageEvent], catalog: PriceCatalog, billing: Billing) -> CostOutput:
    """cost_records without the rows: `priced` holds what they are made of."""
    out = CostOutput()
    dims_of: dict[str, tuple[str, ...]] = {}  # attribution key -> metric label values; most calls repeat one
    for event, priced in zip(events, price_usages(events, catalog), strict=True):
        if isinstance(priced, UnpricedError):
            out.unpriced[priced.reason] += 1
            out.unpriced_models.setdefault((event.provider, event.model), priced)
            out.dead_letters.append((event.attribution_key.encode(), unpriced_letter(event, priced).encode()))
            out.billed.append(None)
            continue
        out.priced_events += 1
        out.priced.append(priced)
        dims = dims_of.get(event.attribution_key)
        if dims is None:
            attribution = event.attribution
            dims = dims_of[event.attribution_key] = tuple(attribution.get(d) or UNALLOCATED for d in METRIC_DIMENSIONS)
        labels = (*dims, priced.price.provider_id, priced.price.model_id)
        out.requests[labels] += 1
        costs = line_costs(priced, billing)
        out.line_costs.append(costs)
        total = Decimal(0)
        for line, billed in zip(priced.lines, costs, strict=True):
            meter = out.by_meter[(*labels, line.meter)]
            meter.cost += billed
            meter.tokens += line.quantity
            total += billed
        out.billed.append(total)
    return out


def focus_records(priced: Sequence[PricedUsage], line_costs: Sequence[Sequence[Decimal]], billing: Billing
                  ) -> list[Record]:
    """The FOCUS rows of priced calls (with their lines' BilledCost), one per meter, keyed by the call's
    attribution key."""
    return [(call.event.attribution_key.encode(), value)
            for call, costs in zip(priced, line_costs, strict=True) for value in focus_values(call, billing, costs)]
