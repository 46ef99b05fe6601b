"""`spendstream price`: what one hypothetical call costs, each line of the computation explained. Pure."""

from __future__ import annotations

from datetime import datetime

from pipeline.pricing.catalog import PriceCatalog
from pipeline.pricing.price import PricedUsage, price_usage
from schemas.codec import plain_decimal
from schemas.errors import SpendstreamError
from schemas.usage import TokenCounts, UsageEvent


class ExplainError(SpendstreamError):
    """The question cannot be priced as asked; the message names the flag."""


def explain_price(catalog: PriceCatalog, model: str, *, input_tokens: int, output_tokens: int, cache_read: int = 0,
                  cache_write: int = 0, reasoning: int = 0, provider: str | None = None, at: datetime,
                  service_tier: str | None = None) -> tuple[PricedUsage, str]:
    """Price one hypothetical call started `at` and explain each line of the computation.
    Raises ExplainError (inconsistent token counts) or UnpricedError."""
    if cache_read + cache_write > input_tokens:
        raise ExplainError(f"--cache-read + --cache-write ({cache_read + cache_write}) exceed --input "
                          f"({input_tokens}); --input counts all input tokens, cached ones included")
    ns = int(at.timestamp()) * 10**9
    event = UsageEvent(id="explain", trace_id="", span_id="", parent_span_id=None, start_time_unix_nano=ns,
                       end_time_unix_nano=ns, operation="chat", provider=provider, request_model=model,
                       response_model=None, attribution={}, attribution_key="", service_tier=service_tier,
                       tokens=TokenCounts(input_uncached=input_tokens - cache_read - cache_write,
                                          cache_read=cache_read, cache_write=cache_write, output=output_tokens,
                                          reasoning=reasoning))
    priced = price_usage(event, catalog)
    price = priced.price
    lines = [f"{model} → {price.model_id} from {price.provider_name} (provider id {price.provider_id}), "
             f"prices in force on {at:%Y-%m-%d} ({price.list_sheet.price_id})"]
    for line in priced.lines:
        tier = f"  [input above {line.tier:,} tokens: tier rate for every token]" if line.tier is not None else ""
        lines.append(f"  {line.meter:<24} {line.quantity:>12,} x {plain_decimal(line.list_price)} USD / {line.per:,} "
                     f"= {plain_decimal(line.list_cost)} USD{tier}")
        if not price.is_list:
            lines.append(f"  {'  contracted':<24} {line.quantity:>12,} x {plain_decimal(line.contract_price)} "
                         f"{price.contract_currency} / {line.per:,} = {plain_decimal(line.contract_cost)} "
                         f"{price.contract_currency}")
    lines.append(f"  {'list total':<24} {plain_decimal(priced.list_cost)} USD")
    if not price.is_list:
        lines.append(f"  {'contracted total':<24} {plain_decimal(priced.contract_cost)} {price.contract_currency} "
                     "(pricing.overrides)")
    if catalog.billing_currency != "USD":
        billed = priced.contract_cost if price.contract_currency == catalog.billing_currency \
            else priced.contract_cost * catalog.usd_rate
        lines.append(f"  {'billed':<24} {plain_decimal(billed)} {catalog.billing_currency} "
                     f"(fx: 1 USD = {catalog.usd_rate} {catalog.billing_currency})")
    lines.append(f"  catalog {catalog.version}")
    return priced, "\n".join(lines)
