"""price_usage: one UsageEvent -> what each of its meters costs, at list and at contracted prices."""

from __future__ import annotations

from decimal import Decimal

import msgspec

from pipeline.pricing.catalog import (
    LEAF_COUNTS,
    REPORTED_USAGE,
    MeterPrice,
    PriceCatalog,
    ResolvedPrice,
    UnpricedError,
    meter_step,
)
from schemas.usage import UsageEvent


class PricedLine(msgspec.Struct, frozen=True, gc=False):
    """One meter of one call. Prices are per `per` units; costs are exact Decimals.

    msgspec Structs: made in C, as fast as a plain tuple, where a NamedTuple or dataclass runs Python code per
    instance (gc=False: they hold only text, numbers and other pricing values, never a cycle)."""

    meter: str  # genai-prices usage key, e.g. "cache_read_tokens"
    quantity: int
    per: int
    list_price: Decimal  # USD
    contract_price: Decimal  # in the contract currency
    list_cost: Decimal
    contract_cost: Decimal
    tier: int | None  # the input-token threshold whose rate applies, if any


class PricedUsage(msgspec.Struct, frozen=True, gc=False):
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
    cache_read, cache_write, output, reasoning = tokens.cache_read, tokens.cache_write, tokens.output, \
        tokens.reasoning
    total_input = tokens.input_uncached + cache_read + cache_write
    # what each meter can bill, as catalog.LEAF_COUNTS lists them: first the genai-prices usage keys of
    # REPORTED_USAGE (genai-prices' `input_tokens` includes cache reads and writes; requests: the calls they
    # are for, a sampled call's adjusted count), then those totals less the meters they include
    counts = (total_input, cache_read, cache_write, output, reasoning, event.requests, total_input - cache_read,
              total_input - cache_write, tokens.input_uncached, output - reasoning)
    for index in resolved.unbilled:
        if counts[index]:
            raise UnpricedError("unpriced_meter", f"the pricing.overrides entry for {resolved.model_id!r} has no "
                                                  f"price for its {REPORTED_USAGE[index]} ({counts[index]})")
    steps = resolved.steps
    for threshold, above in resolved.tiered_steps:
        if total_input > threshold:
            steps = above
            break
    lines = []
    for count, meter, per, list_price, contract_price, list_unit, contract_unit, tier in steps:
        leaf = counts[count]
        if leaf > 0:
            list_cost = list_unit * leaf
            lines.append(PricedLine(meter, leaf, per, list_price, contract_price, list_cost,
                                    list_cost if contract_unit is None else contract_unit * leaf, tier))
        elif leaf:
            raise _exceeded(meter, count, counts)
    return PricedUsage(event, resolved, tuple(lines), catalog.version)


def priced_line(meter: MeterPrice, contract_meter: MeterPrice | None, leaf: int, total_input: int) -> PricedLine:
    """`leaf` units of one meter, at list (`meter`) and contracted (`contract_meter`; None or `meter`: the list
    price) prices; `total_input` (the call's input tokens) picks a long-context tier. (price_usage spells this
    out in its loop: a call here per meter would cost it a tenth of its time.)"""
    step = meter_step(meter, contract_meter, total_input)
    list_cost = step.list_unit * leaf
    return PricedLine(meter.usage_key, leaf, meter.per, step.list_price, step.contract_price, list_cost,
                      list_cost if step.contract_unit is None else step.contract_unit * leaf, step.tier)


def _exceeded(meter: str, count: int, counts: tuple[int, ...]) -> UnpricedError:
    total, *included = LEAF_COUNTS[count]
    inner_keys = ", ".join(REPORTED_USAGE[i] for i in included)
    return UnpricedError("invalid_usage", f"{inner_keys} exceed {meter} ({counts[total]})")
