"""price_usage: one UsageEvent -> what each of its meters costs, at list and at contracted prices."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from pipeline.pricing.catalog import MeterPrice, PriceCatalog, ResolvedPrice, UnpricedError
from schemas.usage import TokenCounts, UsageEvent


class PricedLine(NamedTuple):
    """One meter of one call. Prices are per `per` units; costs are exact Decimals."""

    meter: str  # genai-prices usage key, e.g. "cache_read_tokens"
    quantity: int
    per: int
    list_price: Decimal  # USD
    contract_price: Decimal  # in the contract currency
    list_cost: Decimal
    contract_cost: Decimal
    tier: int | None  # the input-token threshold whose rate applies, if any


@dataclass(slots=True)  # not frozen: frozen dataclasses pay object.__setattr__ per field, per call
class PricedUsage:
    event: UsageEvent
    price: ResolvedPrice
    lines: tuple[PricedLine, ...]
    catalog_version: str

    @property
    def list_cost(self) -> Decimal:
        return sum((line.list_cost for line in self.lines), Decimal(0))

    @property
    def contract_cost(self) -> Decimal:
        return sum((line.contract_cost for line in self.lines), Decimal(0))


def usage_counts(tokens: TokenCounts, requests: int = 1) -> dict[str, int]:
    """Our token meters as genai-prices usage keys (its `input_tokens` includes cache reads and writes);
    `requests`: the calls they are for (a sampled call's adjusted count)."""
    return {
        "input_tokens": tokens.input_uncached + tokens.cache_read + tokens.cache_write,
        "cache_read_tokens": tokens.cache_read,
        "cache_write_tokens": tokens.cache_write,
        "output_tokens": tokens.output,
        "output_reasoning_tokens": tokens.reasoning,
        "requests": requests,
    }


def price_usage(event: UsageEvent, catalog: PriceCatalog) -> PricedUsage:
    """Price one call at the prices in force at its start. Raises UnpricedError (never prices at 0)."""
    model = event.response_model or event.request_model
    if not model:
        raise UnpricedError("missing_model", "the call names no model")
    resolved = catalog.resolve(event.provider, model, event.start_time_unix_nano, event.service_tier)
    counts = usage_counts(event.tokens, event.requests)
    total_input = counts["input_tokens"]
    listed = resolved.list_sheet.meters
    # the contract sheet has the same meters in the same order (catalog._with_meters)
    contracted = listed if resolved.is_list else resolved.contract_sheet.meters
    lines = [priced_line(meter, contract_meter, leaf, total_input)
             for meter, contract_meter, leaf in zip(listed, contracted, resolved.list_sheet.leaves(counts), strict=True)
             if leaf]
    return PricedUsage(event=event, price=resolved, lines=tuple(lines), catalog_version=catalog.version)


_new_tuple = tuple.__new__


def priced_line(meter: MeterPrice, contract_meter: MeterPrice, leaf: int, total_input: int) -> PricedLine:
    """`leaf` units of one meter, at list (`meter`) and contracted (`contract_meter`) prices; `total_input` (the
    call's input tokens) picks a long-context tier."""
    if meter.tiers:
        list_price, tier = meter.price_for(total_input)
        list_cost = list_price * leaf / meter.per  # genai-prices' own formula, so results are equal
    else:
        list_price, tier, list_cost = meter.base, None, meter.unit_base * leaf
    if contract_meter is meter:
        contract_price, contract_cost = list_price, list_cost
    else:
        contract_price = contract_meter.price_for(total_input)[0] if contract_meter.tiers else contract_meter.base
        contract_cost = contract_price * leaf / meter.per
    # tuple.__new__ skips NamedTuple's Python-level __new__, a third of the per-meter cost
    return _new_tuple(PricedLine, (meter.usage_key, leaf, meter.per, list_price, contract_price, list_cost,
                                   contract_cost, tier))
