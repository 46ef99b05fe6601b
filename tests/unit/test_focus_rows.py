"""Overrides, fx and historic dates change the price as documented; FOCUS rows obey the contract.

Expected values are computed by hand from the published prices quoted in each test.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any

import jsonschema
import msgspec
import orjson
import pytest

from pipeline.pricing import PriceCatalog, PricedUsage, UnpricedError, focus, overrides_from_config, price_usage
from pipeline.pricing.cost_records import cost_records, focus_records, price_calls
from pipeline.pricing.focus import Billing, encoded_focus_rows, month_bounds
from schemas.codec import rfc3339
from schemas.config import config_from_dict
from schemas.errors import ConfigError
from schemas.focus import COLUMN_NAMES, COLUMNS, decode_row, encode_row
from schemas.usage import TokenCounts, UsageEvent

WHEN = datetime(2026, 11, 20, 9, 30, 15, tzinfo=UTC)


def focus_rows(priced: PricedUsage, billing: Billing) -> list[dict[str, Any]]:
    """The rows as a subscriber of `genai.cost.focus` reads them, with money and quantities as Decimal."""
    exact = {name for name, kind in COLUMNS if kind in ("money", "quantity")}
    rows = [decode_row(value) for value, _ in encoded_focus_rows(priced, billing)]
    return [{k: Decimal(v) if k in exact and v is not None else v for k, v in row.items()} for row in rows]


def event(model: str = "gpt-4o", provider: str | None = "openai", when: datetime = WHEN,
          tokens: TokenCounts | None = None, tier: str | None = None) -> UsageEvent:
    ns = int(when.timestamp()) * 10**9
    return UsageEvent(
        id="0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331", parent_span_id=None, start_time_unix_nano=ns, end_time_unix_nano=ns + 10**9,
        operation="chat", provider=provider, request_model=model, response_model=None, service_tier=tier,
        tokens=tokens or TokenCounts(input_uncached=800_000, cache_read=200_000, output=100_000),
        attribution={"team": "search", "use_case": "rag", "env": "prod"},
        attribution_key="team=search|use_case=rag|env=prod|app=|key=")


def catalog(config: dict[str, object]) -> PriceCatalog:
    cfg = config_from_dict(config)
    return PriceCatalog(overrides_from_config(cfg.pricing.get("overrides", ()), cfg.billing_currency),
                        billing_currency=cfg.billing_currency, usd_rate=cfg.usd_rate)


def test_gpt_4o_list_price_by_hand() -> None:
    # gpt-4o: 2.50 USD input, 1.25 USD cached input, 10 USD output per million tokens
    priced = price_usage(event(), PriceCatalog())
    by_meter = {line.meter: line.list_cost for line in priced.lines}
    assert by_meter == {"input_tokens": Decimal("2.0"), "cache_read_tokens": Decimal("0.25"),
                        "output_tokens": Decimal("1.0")}
    assert priced.list_cost == priced.contract_cost == Decimal("3.25")


def test_override_sets_the_contracted_price_and_keeps_the_list_price() -> None:
    cat = catalog({"pricing": {"overrides": [{"provider": "openai", "model": "gpt-4o", "input_per_mtok": 2.0,
                                              "output_per_mtok": 8.0}]}})
    priced = price_usage(event(), cat)
    # contracted: 800k x 2.0 + 200k cached (not overridden: list 1.25) + 100k x 8.0
    assert priced.contract_cost == Decimal("1.6") + Decimal("0.25") + Decimal("0.8")
    assert priced.list_cost == Decimal("3.25")
    rows = focus_rows(priced, Billing())
    total = {k: sum((r[k] for r in rows), Decimal(0)) for k in ("ListCost", "ContractedCost", "BilledCost")}
    assert total == {"ListCost": Decimal("3.25"), "ContractedCost": Decimal("2.65"), "BilledCost": Decimal("2.65")}
    assert {r["SkuPriceDetails"]["x_PriceSource"] for r in rows} == {"override"}


def test_override_validity_dates_bound_it() -> None:
    cat = catalog({"pricing": {"overrides": [{"model": "gpt-4o", "input_per_mtok": 1, "output_per_mtok": 1,
                                              "valid_from": "2026-12-01", "valid_until": "2026-12-31"}]}})
    assert price_usage(event(), cat).contract_cost == Decimal("3.25")  # November: list price
    december = price_usage(event(when=datetime(2026, 12, 31, 23, 59, tzinfo=UTC)), cat)
    assert december.contract_cost == Decimal("0.8") + Decimal("0.25") + Decimal("0.1")
    january = price_usage(event(when=datetime(2027, 1, 1, tzinfo=UTC)), cat)
    assert january.contract_cost == Decimal("3.25")


def test_self_hosted_model_is_priced_only_through_an_override() -> None:
    tokens = TokenCounts(input_uncached=1_000_000, output=500_000)
    with pytest.raises(UnpricedError):
        price_usage(event("llama-3.1-70b-internal", "vllm", tokens=tokens), PriceCatalog())
    cat = catalog({"billing_currency": "EUR", "fx": {"USD": 0.92},
                   "pricing": {"overrides": [{"provider": "vllm", "model": "llama-3.1-70b-internal",
                                              "input_per_mtok": 0.3, "output_per_mtok": 0.6, "currency": "EUR"}]}})
    priced = price_usage(event("llama-3.1-70b-internal", "vllm", tokens=tokens), cat)
    assert priced.price.unlisted and priced.price.contract_currency == "EUR"
    rows = focus_rows(priced, Billing(currency="EUR", usd_rate=Decimal("0.92")))
    # an EUR contract is billed in EUR as is: 0.3 + 0.3
    assert sum((r["BilledCost"] for r in rows), Decimal(0)) == Decimal("0.6")
    assert {r["PricingCurrency"] for r in rows} == {"EUR"}


def test_fx_converts_to_the_billing_currency_and_keeps_usd() -> None:
    rows = focus_rows(price_usage(event(), PriceCatalog()), Billing(currency="EUR", usd_rate=Decimal("0.92")))
    assert {r["BillingCurrency"] for r in rows} == {"EUR"}
    assert {r["PricingCurrency"] for r in rows} == {"USD"}
    assert sum((r["BilledCost"] for r in rows), Decimal(0)) == Decimal("3.25") * Decimal("0.92")  # 2.99
    assert sum((r["PricingCurrencyEffectiveCost"] for r in rows), Decimal(0)) == Decimal("3.25")
    output = next(r for r in rows if r["x_Meter"] == "output_tokens")
    assert output["ListUnitPrice"] == Decimal("9.2") and output["PricingCurrencyListUnitPrice"] == Decimal("10")


def test_historic_dates_use_the_price_then_in_force() -> None:
    # claude-sonnet-4-6 (genai-prices): until 2026-03-12 input 3 USD/MTok, 6 above 200k input tokens, output
    # 15 / 22.5 above 200k; from 2026-03-13 a flat 3 / 15.
    tokens = TokenCounts(input_uncached=300_000, output=10_000)
    cat = PriceCatalog()
    before = price_usage(event("claude-sonnet-4-6", "anthropic", datetime(2026, 3, 12, 23, 59, tzinfo=UTC), tokens),
                         cat)
    after = price_usage(event("claude-sonnet-4-6", "anthropic", datetime(2026, 3, 13, 0, 1, tzinfo=UTC), tokens),
                        cat)
    assert before.list_cost == Decimal("1.8") + Decimal("0.225")  # every token at the tier rate
    assert after.list_cost == Decimal("0.9") + Decimal("0.15")
    assert [line.tier for line in before.lines] == [200_000, 200_000]


def test_service_tier_selects_its_price() -> None:
    cat = PriceCatalog()
    tokens = TokenCounts(input_uncached=1_000_000, output=1_000_000)
    standard = price_usage(event("gpt-5", tokens=tokens), cat).list_cost
    flex = price_usage(event("gpt-5", tokens=tokens, tier="flex"), cat).list_cost
    assert flex < standard


def test_rows_follow_the_focus_contract() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(
        resources.files("schemas").joinpath("focus_row.schema.json").read_text("utf-8")))
    rows = focus_rows(price_usage(event(), PriceCatalog()), Billing())
    assert [r["x_Meter"] for r in rows] == ["cache_read_tokens", "input_tokens", "output_tokens"]
    for row in rows:
        decoded = decode_row(encode_row(row))
        validator.validate(decoded)
        assert set(decoded) == set(COLUMN_NAMES)
        assert row["ListCost"] == row["ListUnitPrice"] * row["PricingQuantity"]
        assert row["ChargePeriodStart"] == "2026-11-20T09:30:15Z" and row["ChargePeriodEnd"] == "2026-11-20T09:30:16Z"
        assert (row["BillingPeriodStart"], row["BillingPeriodEnd"]) == ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
        assert row["Tags"] == {"team": "search", "use_case": "rag", "env": "prod"}
        assert row["InvoiceId"] is None and row["ChargeClass"] is None  # null, never ""
    assert len({r["x_RowId"] for r in rows}) == 3


def test_a_redelivered_event_gives_identical_rows() -> None:
    cat = PriceCatalog()
    assert cost_records([event()], cat, Billing()).rows == cost_records([event()], cat, Billing()).rows


def test_unpriced_usage_becomes_a_dead_letter_with_reason() -> None:
    out = cost_records([event("gpt-nope"), event()], PriceCatalog(), Billing())
    assert out.priced_events == 1 and out.unpriced == {"unknown_model": 1}
    [(key, value)] = out.dead_letters
    letter = orjson.loads(value)
    assert letter["reason"] == "unknown_model" and "gpt-nope" in letter["detail"]
    assert letter["fields"]["tokens"]["output"] == 100_000 and key.startswith(b"team=search")


def test_december_billing_period_ends_in_january() -> None:
    assert month_bounds(int(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())) == (
        "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")


def test_bad_overrides_name_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"pricing.overrides\[0\].currency: GBP is neither USD nor"):
        catalog({"billing_currency": "EUR", "fx": {"USD": 0.9},
                 "pricing": {"overrides": [{"model": "m", "input_per_mtok": 1, "currency": "GBP"}]}})
    with pytest.raises(ConfigError, match=r"pricing.overrides\[0\]: names no price"):
        catalog({"pricing": {"overrides": [{"model": "m"}]}})
    with pytest.raises(ConfigError, match=r"valid_until: 2026-01-01 is before valid_from"):
        catalog({"pricing": {"overrides": [{"model": "m", "input_per_mtok": 1, "valid_from": "2026-02-01",
                                            "valid_until": "2026-01-01"}]}})


@pytest.mark.parametrize("version", ["1.4", "1.2"])
def test_spliced_rows_are_the_json_of_their_columns_for_tiny_costs_and_odd_text(version: str) -> None:
    # 1 token of gpt-4o-mini costs 0.00000015 USD: str() of that Decimal is E-notation, which the contract forbids
    odd = UsageEvent(**{**event("gpt-4o-mini").to_dict(), "tokens": TokenCounts(input_uncached=1, output=1),
                        "id": 'tr"ace\\-spän', "attribution": {"team": 'sé"arch\n'}})
    rows = encoded_focus_rows(price_usage(odd, PriceCatalog()), Billing(focus_version=version))
    for value, billed in rows:
        columns = orjson.loads(value)
        assert value == encode_row(columns)  # what encoding the columns in one go gives, byte for byte
        row = decode_row(value)  # money and quantities as plain decimals, as the contract's patterns require
        assert row["x_RowId"] == f'tr"ace\\-spän/{row["x_Meter"]}' and row["x_UsageId"] == 'tr"ace\\-spän'
        assert row["Tags"] == {"team": 'sé"arch\n'} and Decimal(row["BilledCost"]) == billed
    assert orjson.loads(rows[0][0])["ListCost"] == "0.000000150000000000"


def test_calls_differing_in_one_call_column_each_get_their_own_columns() -> None:
    base = event("gpt-4o-mini").to_dict() | {"tokens": TokenCounts(input_uncached=10, output=5)}
    variants: list[dict[str, Any]] = [
        {}, {"operation": "text_completion"}, {"response_model": "gpt-4o-mini-2024-07-18"}, {"allocated": False},
        {"service_tier": "flex"}, {"attribution": {"team": "ads"}}, {"attribution_key": "team=ads"},
        {"start_time_unix_nano": base["start_time_unix_nano"] + 10**9},
        {"id": "other-id", "trace_id": "other", "span_id": "id"}]
    cat, billing = PriceCatalog(), Billing()  # the call columns' runs are cached per billing, price and attribution
    for changed in variants * 2:  # the second time from the cached runs
        call = UsageEvent(**base | changed)
        [row, *_] = [decode_row(v) for v, _ in encoded_focus_rows(price_usage(call, cat), billing)]
        assert (row["x_Operation"], row["x_Model"], row["x_Allocated"], row["x_ServiceTier"], row["Tags"],
                row["x_AttributionKey"], row["x_UsageId"], row["x_SpanId"]) == (
            call.operation, call.model, call.allocated, call.service_tier, dict(call.attribution),
            call.attribution_key, call.id, call.span_id), changed
        assert row["ChargePeriodStart"] == rfc3339(call.start_time_unix_nano // 10**9)


@pytest.mark.parametrize("version", ["1.4", "1.2"])
def test_call_columns_are_cached_per_attribution_and_per_model_not_per_pair(version: str) -> None:
    # the e2e bench's calls make over 12,000 (attribution, model) pairs: a cache of pairs missed on most calls
    calls = [msgspec.structs.replace(event(model, provider), id=f"call-{n}-{model}",
                                     attribution={"team": f"t{n}", "app": f"a{n % 3}"}, attribution_key=f"team=t{n}")
             for n in range(30) for provider, model in (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"),
                                                        ("anthropic", "claude-sonnet-4-5"))]
    focus._KINDS.clear()
    focus._ATTRIBUTIONS.clear()
    rows = cost_records(calls, PriceCatalog(), Billing(focus_version=version)).rows
    assert (len(focus._KINDS), len(focus._ATTRIBUTIONS)) == (3, 30)
    for _, value in rows:
        assert value == encode_row(orjson.loads(value))


def test_rows_made_after_pricing_are_the_rows_of_cost_records() -> None:
    calls = [event(), event("gpt-nope"), event("gpt-4o-mini")]
    priced = price_calls(calls, PriceCatalog(), Billing())
    assert not priced.rows and len(priced.priced) == 2
    whole = cost_records(calls, PriceCatalog(), Billing())
    assert focus_records(priced.priced, priced.line_costs, Billing()) == whole.rows and priced.billed == whole.billed
    assert priced.by_meter == whole.by_meter and priced.dead_letters == whole.dead_letters
