"""FOCUS mapping: a priced call -> one cost row per token meter (reference/focus-1.2.md §4.3), in FOCUS 1.4
(default: all 65 Cost and Usage columns, null where they do not apply) or 1.2 (`focus.version`). One mapping:
the version only chooses which columns a row has (schemas/focus.py COLUMNS_BY_VERSION).

SkuPriceDetails carries the FOCUS 1.5-draft "AI Model Billing" properties, x_-prefixed while they are draft:
x_ModelDeveloper, x_ModelFamily, x_ModelId, x_ModelVersion, x_TokenDirection, x_TokenCacheAction.

Pure: no I/O. Money is Decimal; every product is computed in a 60-digit context and rounded once,
to MONEY_SCALE places, so ListCost is ListUnitPrice x PricingQuantity and sums of rows are exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal
from functools import lru_cache
from typing import Any, Final

import orjson

from pipeline.pricing import PricedLine, PricedUsage
from pipeline.pricing.model_billing import model_identity, parties_of
from schemas.codec import rfc3339
from schemas.config import Config
from schemas.focus import (
    ATTRIBUTION_COLUMNS,
    COLUMNS_BY_VERSION,
    FOCUS_SCHEMA_VERSION,
    FOCUS_VERSION,
    MONEY_QUANTUM,
    encode_row,
)

_EXACT: Final = Context(prec=60)
#: genai-prices usage key -> (SkuMeter, ConsumedUnit, token direction, cache action). The direction and cache
#: action are the 1.5 draft's TokenDirection (reasoning is Output) and TokenCacheAction (request tokens only)
METERS: Final[dict[str, tuple[str, str, str | None, str | None]]] = {
    "input_tokens": ("Input Tokens", "Tokens", "Input", "Uncached"),
    "cache_read_tokens": ("Cache Read Input Tokens", "Tokens", "Input", "Read"),
    "cache_write_tokens": ("Cache Write Input Tokens", "Tokens", "Input", "Write"),
    "output_tokens": ("Output Tokens", "Tokens", "Output", None),
    "output_reasoning_tokens": ("Reasoning Output Tokens", "Tokens", "Output", None),
    "requests": ("Requests", "Requests", None, None),
}
INPUT_METERS: Final = frozenset(k for k, v in METERS.items() if v[2] == "Input")
OUTPUT_METERS: Final = frozenset(k for k, v in METERS.items() if v[2] == "Output")


@dataclass(frozen=True, slots=True)
class Billing:
    """Who pays and in which currency; `usd_rate` is billing-currency units per USD."""

    currency: str = "USD"
    usd_rate: Decimal = Decimal(1)
    account_id: str = "spendstream"
    #: the organisation: it sells, runs and bills its self-hosted models (ServiceProviderName, ...)
    account_name: str = "spendstream"
    #: "1.4" or "1.2": which FOCUS columns the rows have
    focus_version: str = FOCUS_VERSION

    @classmethod
    def from_config(cls, config: Config) -> Billing:
        return cls(currency=config.billing_currency, usd_rate=config.usd_rate,
                   account_id=config.focus.billing_account_id, account_name=config.focus.billing_account_name,
                   focus_version=config.focus.version)


#: calls cluster in time: most rows repeat a recent second
iso_utc: Final = lru_cache(maxsize=4096)(rfc3339)


def month_bounds(unix_seconds: int) -> tuple[str, str]:
    """The calendar month (UTC) holding `unix_seconds`, as FOCUS start (inclusive) and end (exclusive)."""
    return _month_bounds(unix_seconds // 86_400)


@lru_cache(maxsize=1024)
def _month_bounds(epoch_day: int) -> tuple[str, str]:
    day = datetime.fromtimestamp(epoch_day * 86_400, UTC)
    start = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return rfc3339(start.timestamp()), rfc3339(end.timestamp())


def money(value: Decimal) -> Decimal:
    return value.quantize(MONEY_QUANTUM, context=_EXACT)


def _slug(text: str) -> str:
    return text.lower().replace(" ", "-")


@dataclass(frozen=True, slots=True)
class _PricePoint:
    """The columns of a meter row that depend only on the price point, not on the call.

    Built once per (resolved price, meter, tier, service tier, billing) and kept, with its
    JSON fragment, so a row costs only its quantities and three products.
    """

    columns: dict[str, Any]
    fragment: bytes  # the columns as JSON object members, without braces, ending in ","
    list_unit: Decimal
    contract_unit: Decimal
    pc_contract_unit: Decimal
    #: ListUnitPrice, ContractedUnitPrice and PricingCurrencyContractedUnitPrice are one Decimal (a list price
    #: billed in USD): ListCost and PricingCurrencyEffectiveCost are then the row's BilledCost, not computed again
    one_unit_price: bool
    per: Decimal
    row_id_end: bytes  # the end of a row: its x_RowId after the usage id ("/<meter>"), then the closing brace
    keep_alive: object  # holds what the cache key names by id(), so those ids are never reused


_PRICE_POINTS: dict[tuple[Any, ...], _PricePoint] = {}
_PRICE_POINTS_MAX: Final = 20_000


def _price_point(priced: PricedUsage, line: PricedLine, billing: Billing) -> _PricePoint:
    key = (id(priced.price), line.meter, line.tier, priced.event.service_tier, priced.event.model, id(billing))
    point = _PRICE_POINTS.get(key)
    if point is None:
        if len(_PRICE_POINTS) >= _PRICE_POINTS_MAX:
            _PRICE_POINTS.clear()
        point = _PRICE_POINTS[key] = _new_price_point(priced, line, billing)
    return point


def _new_price_point(priced: PricedUsage, line: PricedLine, billing: Billing) -> _PricePoint:
    price = priced.price
    sku_meter, unit, direction, cache_action = METERS.get(
        line.meter, (line.meter.replace("_", " ").title(), "Units", None, None))
    pricing_currency = price.contract_currency
    # contract currency -> billing currency; list prices are USD
    contract_rate = Decimal(1) if pricing_currency == billing.currency else billing.usd_rate
    list_unit = money(_EXACT.multiply(line.list_price, billing.usd_rate))
    contract_unit = money(_EXACT.multiply(line.contract_price, contract_rate))
    pc_list_unit = money(line.list_price if pricing_currency == "USD"
                         else _EXACT.multiply(line.list_price, billing.usd_rate))
    pc_contract_unit = money(line.contract_price)
    sku_id = f"{price.provider_id}/{price.model_id}/{_slug(sku_meter)}"
    tier = f">{line.tier}" if line.tier is not None else None
    model = model_identity(price.model_id, priced.event.model or price.model_id, publisher=price.publisher_name,
                           developer=price.developer, family=price.family)
    details: dict[str, Any] = {"x_ModelDeveloper": model.developer, "x_ModelFamily": model.family,
                               "x_ModelId": model.model_id, "x_ModelVersion": model.version,
                               "x_PriceSource": "override" if not price.is_list else "genai-prices"}
    if direction:
        details["x_TokenDirection"] = direction
    if cache_action:
        details["x_TokenCacheAction"] = cache_action
    if tier:
        details["x_InputTokenTier"] = tier
    if priced.event.service_tier:
        details["x_ServiceTier"] = priced.event.service_tier
    columns = {
        "ChargeDescription": f"{price.model_id} {sku_meter.lower()}",
        "ConsumedUnit": unit,
        "ContractedUnitPrice": contract_unit,
        "ListUnitPrice": list_unit,
        "PricingCurrency": pricing_currency,
        "PricingCurrencyContractedUnitPrice": pc_contract_unit,
        "PricingCurrencyListUnitPrice": pc_list_unit,
        "PricingUnit": f"{line.per} {unit}",
        "SkuId": sku_id,
        "SkuMeter": sku_meter,
        "SkuPriceDetails": details,
        "SkuPriceId": f"{sku_id}@{line.per}:{price.contract_sheet.price_id}{tier or ''}",
        "x_Meter": line.meter,
        "x_PriceTier": tier,
    }
    return _PricePoint(columns, encode_row(columns)[1:-1] + b",", list_unit, contract_unit, pc_contract_unit,
                       list_unit == contract_unit == pc_contract_unit, Decimal(line.per),
                       orjson.dumps("/" + line.meter)[1:] + b"}", (price, billing))


def _contract_cost(point: _PricePoint, pricing_quantity: Decimal) -> Decimal:
    """BilledCost, ContractedCost and EffectiveCost of a row (no discounts or credits apply to a model call);
    money() spelt out for the hot path."""
    return _EXACT.multiply(point.contract_unit, pricing_quantity).quantize(MONEY_QUANTUM, context=_EXACT)


#: the columns that change with every row, in the order (and with the Decimal text) encode_row gives them:
#: BilledCost = ContractedCost = EffectiveCost, ConsumedQuantity, ListCost, PricingCurrencyEffectiveCost,
#: PricingQuantity, then x_RowId (`<usage id>/<meter>`) whose value the caller appends
_QUANTITIES: Final = ('"BilledCost":"%s","ConsumedQuantity":"%d","ContractedCost":"%s","EffectiveCost":"%s",'
                      '"ListCost":"%s","PricingCurrencyEffectiveCost":"%s","PricingQuantity":"%s","x_RowId":"')


def _plain(value: Decimal) -> str:
    """format(value, "f"), as encode_row writes a Decimal: str() is that, 4x faster, unless it uses E-notation."""
    text = str(value)
    return format(value, "f") if "E" in text else text


def encoded_focus_rows(priced: PricedUsage, billing: Billing) -> list[tuple[bytes, Decimal]]:
    """The FOCUS rows of one priced call, one per meter it used, as `genai.cost.focus` values with their
    BilledCost."""
    costs = line_costs(priced, billing)
    return list(zip(focus_values(priced, billing, costs), costs, strict=True))


def focus_values(priced: PricedUsage, billing: Billing, costs: Sequence[Decimal]) -> list[bytes]:
    """The FOCUS rows of one priced call as `genai.cost.focus` values, given each line's BilledCost (line_costs:
    the same products of the same price point, so it stands for ListCost too where the unit prices are one).
    A row's JSON object is spliced from encoded parts: the constant columns, the call's columns (cached runs
    around its times and ids), the price point's (encoded once, cached) and the row's own quantities and costs,
    written as encode_row would."""
    head = b"{" + _CONSTANT_FRAGMENTS[billing.focus_version] + _call_fragment(priced, billing) + b","
    usage_id = orjson.dumps(priced.event.id)[1:-1]
    out = []
    for line, contract_cost in zip(priced.lines, costs, strict=True):
        point = _price_point(priced, line, billing)
        pricing_quantity = _EXACT.divide(Decimal(line.quantity), point.per)
        billed = _plain(contract_cost)
        if point.one_unit_price:
            list_cost = pc_effective_cost = billed
        else:
            list_cost = _plain(_EXACT.multiply(point.list_unit, pricing_quantity).quantize(MONEY_QUANTUM,
                                                                                          context=_EXACT))
            pc_effective_cost = _plain(_EXACT.multiply(point.pc_contract_unit, pricing_quantity).quantize(
                MONEY_QUANTUM, context=_EXACT))
        quantities = _QUANTITIES % (billed, line.quantity, billed, billed, list_cost, pc_effective_cost,
                                    _plain(pricing_quantity))
        out.append(b"".join((head, point.fragment, quantities.encode(), usage_id, point.row_id_end)))
    return out


def line_costs(priced: PricedUsage, billing: Billing) -> list[Decimal]:
    """The BilledCost of each FOCUS row of one priced call (one per line), without the rows."""
    out = []
    for line in priced.lines:
        point = _price_point(priced, line, billing)
        out.append(_contract_cost(point, _EXACT.divide(Decimal(line.quantity), point.per)))
    return out


def billed_cost(priced: PricedUsage, billing: Billing) -> Decimal:
    """What the FOCUS rows of one priced call bill in total (the sum of their BilledCost), without the rows."""
    return sum(line_costs(priced, billing), Decimal(0))


#: the columns of a row that depend on its price point (_PricePoint) and on its quantities (_QUANTITIES)
_POINT_COLUMNS: Final = frozenset({
    "ChargeDescription", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice", "PricingCurrency",
    "PricingCurrencyContractedUnitPrice", "PricingCurrencyListUnitPrice", "PricingUnit", "SkuId", "SkuMeter",
    "SkuPriceDetails", "SkuPriceId", "x_Meter", "x_PriceTier"})
_QUANTITY_COLUMNS: Final = frozenset({
    "BilledCost", "ConsumedQuantity", "ContractedCost", "EffectiveCost", "ListCost", "PricingCurrencyEffectiveCost",
    "PricingQuantity", "x_RowId"})
#: the columns that depend on the call (_call_columns sets them, in either version)
_CALL_COLUMNS: Final = frozenset({
    "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart",
    "ChargePeriodEnd", "ChargePeriodStart", "HostProviderName", "InvoiceIssuerName", "ProviderName", "PublisherName",
    "ServiceName", "ServiceProviderName", "SubAccountId", "SubAccountName", "SubAccountType", "Tags", "x_UsageId",
    "x_TraceId", "x_SpanId", "x_Provider", "x_Model", "x_RequestModel", "x_Operation", "x_ServiceTier",
    "x_CatalogVersion", "x_AttributionKey", "x_Allocated", "x_RequestCount", "x_SampleAdjustedCount",
    *ATTRIBUTION_COLUMNS.values()})
#: the columns with one value on every row; every other column is null: FOCUS has it, a model call does not use it
#: (commitments, split cost allocation, invoices, capacity reservations, regions, resources, ...)
_CONSTANTS: Final[dict[str, Any]] = {
    "BillingAccountType": "Billing Account",  # 1.4: not null when BillingAccountId is not
    "ChargeCategory": "Usage", "ChargeFrequency": "Usage-Based", "PricingCategory": "Standard",
    "ServiceCategory": "AI and Machine Learning", "ServiceSubcategory": "Generative AI",
    "x_SchemaVersion": FOCUS_SCHEMA_VERSION}
#: per version: its constant and null columns, encoded once (JSON object members ending in ","), and the call
#: columns it does not have (1.4: ProviderName, PublisherName; 1.2: ServiceProviderName, ...)
_CONSTANT_FRAGMENTS: Final[dict[str, bytes]] = {
    version: encode_row({name: _CONSTANTS.get(name) for name, _ in columns
                         if name not in _POINT_COLUMNS | _QUANTITY_COLUMNS | _CALL_COLUMNS})[1:-1] + b","
    for version, columns in COLUMNS_BY_VERSION.items()}
_NOT_IN_VERSION: Final[dict[str, tuple[str, ...]]] = {
    version: tuple(sorted(_CALL_COLUMNS - {name for name, _ in columns}))
    for version, columns in COLUMNS_BY_VERSION.items()}


#: the call columns that depend on the call's start second, those that differ on every call, and those that depend
#: only on its attribution; the other call columns depend on its price, model and billing (its "kind")
_PER_SECOND: Final = ("BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart")
_PER_CALL: Final = ("x_UsageId", "x_TraceId", "x_SpanId")
_BY_ATTRIBUTION: Final = frozenset({"SubAccountId", "SubAccountName", "SubAccountType", "Tags", "x_AttributionKey",
                                    *ATTRIBUTION_COLUMNS.values()})
#: the runs of call columns in the order _call_columns lists them (in either version), by what they depend on
_LAYOUT: Final = ("kind", "second", "kind", "attribution", "call", "kind", "attribution", "kind", "attribution")


def _role(column: str) -> str:
    return ("second" if column in _PER_SECOND else "call" if column in _PER_CALL
            else "attribution" if column in _BY_ATTRIBUTION else "kind")


@dataclass(frozen=True, slots=True)
class _Runs:
    """The encoded members of each run of call columns of one role (_LAYOUT), shared by the calls alike in what
    that role depends on. Calls differ widely in attribution x kind (the e2e bench has over 12,000 pairs), so each
    is cached apart: a cache of pairs missed on most calls."""

    members: tuple[bytes, ...]
    keep_alive: object  # holds what the cache key names by id(), so those ids are never reused


_KINDS: dict[tuple[Any, ...], _Runs] = {}
_ATTRIBUTIONS: dict[tuple[Any, ...], _Runs] = {}
_RUNS_MAX: Final = 10_000  # per cache; under 1 KB each (with their key): about 20 MB at most


def _call_fragment(priced: PricedUsage, billing: Billing) -> bytes:
    """encode_row(_call_columns(priced, billing)) without its braces, from cached runs of encoded columns."""
    event = priced.event
    kind_key = (id(priced.price), id(billing), priced.catalog_version, event.provider, event.response_model,
                event.request_model, event.operation, event.service_tier, event.allocated, event.adjusted_count)
    kind = _KINDS.get(kind_key)
    if kind is None:
        kind = _cached(_KINDS, kind_key, _Runs(_runs_of(priced, billing, "kind"), (priced.price, billing)))
    attribution_key = (id(billing), event.attribution_key, *event.attribution.items())
    attribution = _ATTRIBUTIONS.get(attribution_key)
    if attribution is None:
        attribution = _cached(_ATTRIBUTIONS, attribution_key,
                              _Runs(_runs_of(priced, billing, "attribution"), billing))
    k0, k1, k2, k3 = kind.members
    a0, a1, a2 = attribution.members
    ids = (b'"x_UsageId":' + orjson.dumps(event.id) + b',"x_TraceId":' + orjson.dumps(event.trace_id)
           + b',"x_SpanId":' + orjson.dumps(event.span_id))
    return b",".join((k0, _per_second_fragment(event.start_time_unix_nano // 10**9), k1, a0, ids, k2, a1, k3, a2))


def _cached(cache: dict[tuple[Any, ...], _Runs], key: tuple[Any, ...], runs: _Runs) -> _Runs:
    if len(cache) >= _RUNS_MAX:
        cache.clear()  # a flood of distinct calls must not grow memory
    cache[key] = runs
    return runs


def _runs_of(priced: PricedUsage, billing: Billing, role: str) -> tuple[bytes, ...]:
    """The encoded members of each run of `role` columns of the call's columns."""
    layout, members = [], []
    for run_role, items in itertools.groupby(_call_columns(priced, billing).items(), key=lambda item: _role(item[0])):
        layout.append(run_role)
        if run_role == role:
            members.append(encode_row(dict(items))[1:-1])
    if tuple(layout) != _LAYOUT:
        raise AssertionError(f"_call_columns lists its columns as {layout}, not as _LAYOUT")
    return tuple(members)


@lru_cache(maxsize=4096)  # calls cluster in time: most rows repeat a recent second
def _per_second_fragment(start_s: int) -> bytes:
    period_start, period_end = month_bounds(start_s)
    return encode_row({"BillingPeriodEnd": period_end, "BillingPeriodStart": period_start,
                       "ChargePeriodEnd": rfc3339(start_s + 1), "ChargePeriodStart": rfc3339(start_s)})[1:-1]


def _call_columns(priced: PricedUsage, billing: Billing) -> dict[str, Any]:
    """The columns that depend on the call, exactly those `billing.focus_version` has."""
    event = priced.event
    price = priced.price
    start_s = event.start_time_unix_nano // 10**9
    period_start, period_end = month_bounds(start_s)
    team = event.attribution.get("team")
    parties = parties_of(price.provider_id, price.provider_name, self_hosted=price.unlisted,
                         organisation=billing.account_name)
    values: dict[str, Any] = {
        "BillingAccountId": billing.account_id,
        "BillingAccountName": billing.account_name,
        "BillingCurrency": billing.currency,
        "BillingPeriodEnd": period_end,
        "BillingPeriodStart": period_start,
        "ChargePeriodEnd": iso_utc(start_s + 1),
        "ChargePeriodStart": iso_utc(start_s),
        "HostProviderName": parties.host_provider,
        "InvoiceIssuerName": parties.invoice_issuer,
        "ProviderName": parties.service_provider,  # 1.2 only; ServiceProviderName replaced it (1.3)
        "PublisherName": price.publisher_name,  # 1.2 only; removed in 1.4
        "ServiceName": f"{price.provider_name} API",
        "ServiceProviderName": parties.service_provider,
        "SubAccountId": team,
        "SubAccountName": team,
        "SubAccountType": "Team" if team else None,  # 1.4: a sub account is a team
        "Tags": dict(event.attribution),
        "x_UsageId": event.id,
        "x_TraceId": event.trace_id,
        "x_SpanId": event.span_id,
        "x_Provider": event.provider,
        "x_Model": event.model,
        "x_RequestModel": event.request_model,
        "x_Operation": event.operation,
        "x_ServiceTier": event.service_tier,
        "x_CatalogVersion": priced.catalog_version,
        "x_AttributionKey": event.attribution_key,
        "x_Allocated": event.allocated,
        # a sampled call's row is an estimate: it stands for x_SampleAdjustedCount calls, quantities scaled
        "x_RequestCount": event.requests,
        "x_SampleAdjustedCount": None if event.adjusted_count is None else Decimal(event.adjusted_count),
        **{column: event.attribution.get(dim) for dim, column in ATTRIBUTION_COLUMNS.items()},
    }
    for name in _NOT_IN_VERSION[billing.focus_version]:
        del values[name]
    return values
