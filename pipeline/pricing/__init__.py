"""Stage 1: exact token prices and everything made from them.

The pure core: the compiled genai-prices catalog (`catalog`), each of its prices compiled into the
function that prices a call's counts (`meter_plan`), `price_usage` and its batch form `price_usages`
(`price`), the FOCUS
mapping (`focus`), a batch's rows, dead letters and metric totals (`cost_records`) and
`spendstream price`'s explanation (`explain`). The shell: the consumer that feeds it (`stage`)
and its counters (`counters`). May import `guardrails` (stage 2's input and the unpriced alert),
`observability` and `kafka`; never `export`, `gateway` or `cli`.
"""

from pipeline.pricing.catalog import PriceCatalog, PriceOverride, UnpricedError, overrides_from_config
from pipeline.pricing.meter_plan import PricedLine
from pipeline.pricing.price import PricedUsage, price_usage, price_usages

__all__ = ["PriceCatalog", "PriceOverride", "PricedLine", "PricedUsage", "UnpricedError", "overrides_from_config",
           "price_usage", "price_usages"]
