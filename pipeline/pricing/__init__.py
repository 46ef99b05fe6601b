"""Exact token pricing: the compiled genai-prices catalog and the pure `price_usage` function."""

from pipeline.pricing.catalog import PriceCatalog, PriceOverride, UnpricedError, overrides_from_config
from pipeline.pricing.price import PricedLine, PricedUsage, price_usage

__all__ = ["PriceCatalog", "PriceOverride", "PricedLine", "PricedUsage", "UnpricedError", "overrides_from_config",
           "price_usage"]
