"""price_usage: one UsageEvent -> what each of its meters costs, at list and at contracted prices."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from pipeline.pricing.catalog import REPORTED_USAGE, MeterPrice, PriceCatalog, ResolvedPrice, UnpricedError
from schemas.usage import UsageEvent


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


def price_usage(event: UsageEvent, catalog: PriceCatalog) -> PricedUsage:
    """Price one call at the prices in force at its start. Raises UnpricedError (never prices at 0)."""
    model = event.response_model or event.request_model
    if not model:
        raise UnpricedError("missing_model", "the call names no model")
    resolved = catalog.resolve(event.provider, model, event.start_time_unix_nano, event.service_tier)
    tokens = event.tokens
    cache_read, cache_write = tokens.cache_read, tokens.cache_write
    total_input = tokens.input_uncached + cache_read + cache_write
    # our token meters as the genai-prices usage keys of catalog.REPORTED_USAGE, in its order (genai-prices'
    # `input_tokens` includes cache reads and writes); requests: the calls they are for (a sampled call's
    # adjusted count)
    counts = (total_input, cache_read, cache_write, tokens.output, tokens.reasoning, event.requests)
    for index in resolved.unbilled:
        if counts[index]:
            raise UnpricedError("unpriced_meter", f"the pricing.overrides entry for {resolved.model_id!r} has no "
                                                  f"price for its {REPORTED_USAGE[index]} ({counts[index]})")
    leaves: list[int] = []  # per meter, the units billed at its own rate (genai-prices' leaf decomposition)
    lines = []
    for index, includes, meter, contract_meter in resolved.plan:
        leaf = counts[index]
        for inner in includes:
            leaf -= leaves[inner]
        leaves.append(leaf)
        if not leaf:
            continue
        if leaf < 0:
            raise _exceeded(resolved, meter, counts[index])
        lines.append(priced_line(meter, contract_meter, leaf, total_input))
    return PricedUsage(event, resolved, tuple(lines), catalog.version)


_new_tuple = tuple.__new__


def priced_line(meter: MeterPrice, contract_meter: MeterPrice | None, leaf: int, total_input: int) -> PricedLine:
    """`leaf` units of one meter, at list (`meter`) and contracted (`contract_meter`; None or `meter`: the list
    price) prices; `total_input` (the call's input tokens) picks a long-context tier."""
    if meter.tiers:
        list_price, tier = meter.price_for(total_input)
        list_cost = list_price * leaf / meter.per  # genai-prices' own formula, so results are equal
    else:
        list_price, tier, list_cost = meter.base, None, meter.unit_base * leaf
    if contract_meter is None or contract_meter is meter:
        contract_price, contract_cost = list_price, list_cost
    else:
        contract_price = contract_meter.price_for(total_input)[0] if contract_meter.tiers else contract_meter.base
        contract_cost = contract_price * leaf / meter.per
    # tuple.__new__ skips NamedTuple's Python-level __new__, a third of the per-meter cost
    return _new_tuple(PricedLine, (meter.usage_key, leaf, meter.per, list_price, contract_price, list_cost,
                                   contract_cost, tier))


def _exceeded(resolved: ResolvedPrice, meter: MeterPrice, count: int) -> UnpricedError:
    inner_keys = ", ".join(resolved.list_sheet.meters[i].usage_key for i in meter.includes)
    return UnpricedError("invalid_usage", f"{inner_keys} exceed {meter.usage_key} ({count})")
