"""price_usage: one UsageEvent -> what each of its meters costs, at list and at contracted prices."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.pricing.catalog import PriceCatalog, PriceSheet, ResolvedPrice, UnpricedError
from schemas.usage import TokenCounts, UsageEvent


@dataclass(frozen=True, slots=True)
class PricedLine:
    """One meter of one call. Prices are per `per` units; costs are exact Decimals."""

    meter: str  # genai-prices usage key, e.g. "cache_read_tokens"
    quantity: int
    per: int
    list_price: Decimal  # USD
    contract_price: Decimal  # in the contract currency
    list_cost: Decimal
    contract_cost: Decimal
    tier: int | None  # the input-token threshold whose rate applies, if any


@dataclass(frozen=True, slots=True)
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


def usage_counts(tokens: TokenCounts) -> dict[str, int]:
    """Our token meters as genai-prices usage keys (its `input_tokens` includes cache reads and writes)."""
    return {
        "input_tokens": tokens.input_uncached + tokens.cache_read + tokens.cache_write,
        "cache_read_tokens": tokens.cache_read,
        "cache_write_tokens": tokens.cache_write,
        "output_tokens": tokens.output,
        "output_reasoning_tokens": tokens.reasoning,
        "requests": 1,
    }


def _meter_costs(sheet: PriceSheet, counts: dict[str, int]) -> list[tuple[int, Decimal, Decimal, int | None]]:
    leaves = sheet.leaves(counts)
    total_input = counts["input_tokens"]
    out = []
    for meter, leaf in zip(sheet.meters, leaves, strict=True):
        price, tier = meter.price_for(total_input)
        out.append((leaf, price, price * leaf / meter.per, tier))
    return out


def price_usage(event: UsageEvent, catalog: PriceCatalog) -> PricedUsage:
    """Price one call at the prices in force at its start. Raises UnpricedError (never prices at 0)."""
    model = event.model
    if not model:
        raise UnpricedError("missing_model", "the call names no model")
    resolved = catalog.resolve(event.provider, model, event.start_time_unix_nano, event.service_tier)
    counts = usage_counts(event.tokens)
    listed = _meter_costs(resolved.list_sheet, counts)
    contracted = listed if resolved.is_list else _meter_costs(resolved.contract_sheet, counts)
    lines = tuple(
        PricedLine(meter=meter.usage_key, quantity=leaf, per=meter.per, list_price=list_price,
                   contract_price=contract_price, list_cost=list_cost, contract_cost=contract_cost, tier=tier)
        for meter, (leaf, list_price, list_cost, tier), (_, contract_price, contract_cost, _)
        in zip(resolved.list_sheet.meters, listed, contracted, strict=True)
        if leaf
    )
    return PricedUsage(event=event, price=resolved, lines=lines, catalog_version=catalog.version)
