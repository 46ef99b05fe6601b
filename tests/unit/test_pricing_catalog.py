"""The compiled catalog prices every genai-prices model exactly as `genai_prices.calc_price` does."""

from __future__ import annotations

import warnings
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.data import providers
from genai_prices.types import ConditionalPrice, ModelPrice, StartDateConstraint, TieredPrices, TimeOfDateConstraint

from pipeline.pricing import PriceCatalog, PricedUsage, UnpricedError, price_usage
from pipeline.pricing.catalog import PROVIDER_IDS, ResolvedPrice
from pipeline.pricing.reprice import UNPRICED_REASONS
from schemas.config import config_from_dict
from schemas.usage import TokenCounts, UsageEvent

SHAPES = {
    "plain": TokenCounts(input_uncached=1_234, output=567),
    "cache_read": TokenCounts(input_uncached=800, cache_read=4_000, output=321),
    "cache_write": TokenCounts(input_uncached=500, cache_read=100, cache_write=2_048, output=99),
    "reasoning": TokenCounts(input_uncached=3_000, output=2_500, reasoning=2_000),
    "above_200k_tier": TokenCounts(input_uncached=150_000, cache_read=60_000, cache_write=5_000, output=4_000),
    "above_1m_tier": TokenCounts(input_uncached=1_100_000, output=10),
    "output_only": TokenCounts(output=77),
}


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 10**9


def _event(provider: str | None, model: str, tokens: TokenCounts, when: datetime, tier: str | None = None
           ) -> UsageEvent:
    return UsageEvent(id="t-s", trace_id="t", span_id="s", parent_span_id=None, start_time_unix_nano=_ns(when),
                      end_time_unix_nano=_ns(when) + 10**9, operation="chat", provider=provider,
                      request_model=model, response_model=None, tokens=tokens, attribution={},
                      attribution_key="k", service_tier=tier)


def _reference(tokens: TokenCounts, model: str, provider_id: str, when: datetime,
               context: dict[str, str] | None) -> Decimal:
    usage = Usage(input_tokens=tokens.input_total, cache_read_tokens=tokens.cache_read,
                  cache_write_tokens=tokens.cache_write, output_tokens=tokens.output,
                  output_reasoning_tokens=tokens.reasoning)
    return calc_price(usage, model, provider_id=provider_id, genai_request_timestamp=when,
                      price_context=context).total_price


def _moments(prices: ModelPrice | list[ConditionalPrice]) -> list[datetime]:
    """A moment in force for every conditional price of a model (start dates and times of day)."""
    moments = [datetime(2026, 11, 20, 12, 0, tzinfo=UTC)]
    if not isinstance(prices, ModelPrice):
        for conditional in prices:
            if isinstance(conditional.constraint, StartDateConstraint):
                start = conditional.constraint.start_date
                moments += [datetime.combine(start, time(1), UTC), datetime.combine(start - timedelta(days=1),
                                                                                     time(23), UTC)]
            elif isinstance(conditional.constraint, TimeOfDateConstraint):
                start_time = conditional.constraint.start_time
                moments.append(datetime.combine(date(2026, 11, 20), start_time.replace(tzinfo=None), UTC)
                               + timedelta(minutes=1))
    return moments


def _cases() -> list[tuple[str, str, datetime, str | None]]:
    cases = []
    for provider in providers:
        for model in provider.models:
            tiers = sorted({v for variant in model.price_variants or () for v in variant.when.values()})
            for when in _moments(model.prices):
                for tier in [None, *[t for t in tiers if t != "mistral/eu"]]:
                    cases.append((provider.id, model.id, when, tier))
    return cases


CASES = _cases()


def test_the_catalog_has_the_models_the_issue_names() -> None:
    assert len({(p, m) for p, m, _, _ in CASES}) > 2000
    assert any(isinstance(getattr(m.prices, "input_mtok", None), TieredPrices)
               for p in providers for m in p.models if isinstance(m.prices, ModelPrice))


def test_every_model_and_usage_shape_equals_calc_price() -> None:
    catalog = PriceCatalog()
    checked = mismatches = 0
    failures: list[str] = []
    reverse_ids = {v: k for k, v in PROVIDER_IDS.items()}
    for provider_id, model_id, when, tier in CASES:
        context = None if tier is None else ({"service_tier": tier, "processing": tier}
                                             if tier == "batch" else {"service_tier": tier})
        for shape, tokens in SHAPES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    expected = _reference(tokens, model_id, provider_id, when,
                                          {"service_tier": tier, "processing": tier} if tier == "batch" else context)
                except ValueError:
                    expected = None  # genai-prices rejects this shape for this model (e.g. reasoning > output)
                except LookupError:
                    expected = None  # a few model ids are not matched by their own rules; nor by ours
            event = _event(reverse_ids.get(provider_id, provider_id), model_id, tokens, when, tier)
            try:
                priced = price_usage(event, catalog)
            except UnpricedError:
                got = None
            else:
                got = priced.list_cost
                failures += _line_errors(priced)
            checked += 1
            if got != expected:
                mismatches += 1
                failures.append(f"{provider_id}/{model_id} {when:%Y-%m-%d %H:%M} tier={tier} {shape}: "
                                f"{got} != {expected}")
    assert checked > 20_000
    assert not failures, f"{mismatches} of {checked} differ:\n" + "\n".join(failures[:20])


def _line_errors(priced: PricedUsage) -> list[str]:
    """The lines whose costs are not genai-prices' formula, price x units / per, at list and contracted prices."""
    return [f"{priced.price.model_id} {line}" for line in priced.lines
            if (line.list_cost, line.contract_cost) != (line.list_price * line.quantity / line.per,
                                                        line.contract_price * line.quantity / line.per)]


def test_contracted_prices_cost_their_price_times_units_exactly() -> None:
    # an fx rate with many digits, a contracted price the list lacks (cache writes of gpt-4o), tiered prices
    # in another currency (gemini-2.5-pro) and a self-hosted model: every line's costs are exact
    catalog = PriceCatalog.from_config(config_from_dict({"billing_currency": "EUR", "fx": {"USD": 0.9234567891234567},
                                                         "pricing": {"overrides": [
        {"model": "gpt-4o", "input_per_mtok": 2.1, "cache_write_per_mtok": 3.3},
        {"model": "claude-sonnet-4-5", "output_per_mtok": 13, "currency": "EUR"},
        {"model": "gemini-2.5-pro", "input_per_mtok": 1.1234567890123, "currency": "EUR"},
        {"provider": "vllm", "model": "acme-70b", "input_per_mtok": 0.5, "output_per_mtok": 0.75}]}}))
    when = datetime(2026, 6, 1, tzinfo=UTC)
    failures, contracted = [], 0
    for provider, model in [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("gcp.gemini", "gemini-2.5-pro"),
                            ("vllm", "acme-70b")]:
        for tokens in SHAPES.values():
            priced = price_usage(_event(provider, model, tokens, when), catalog)
            failures += _line_errors(priced)
            contracted += sum(line.contract_price != line.list_price for line in priced.lines)
    assert contracted > 20
    assert not failures, "\n".join(failures[:20])


def test_an_override_of_a_model_listed_without_token_prices_lines_up_with_a_list_price_of_0() -> None:
    # GitHub Copilot lists gpt-4o with no prices (a subscription): the override is the contract, the list 0
    catalog = PriceCatalog.from_config(config_from_dict({"pricing": {"overrides": [
        {"provider": "github-copilot", "model": "gpt-4o", "input_per_mtok": 2, "output_per_mtok": 8}]}}))
    priced = price_usage(_event("github-copilot", "gpt-4o", SHAPES["plain"], datetime(2026, 6, 1, tzinfo=UTC)),
                         catalog)
    assert priced.price.provider_id == "github-copilot"
    assert [(line.meter, line.list_cost, line.contract_cost) for line in priced.lines] == [
        ("input_tokens", Decimal(0), Decimal("0.002468")), ("output_tokens", Decimal(0), Decimal("0.004536"))]


def test_unknown_model_is_never_priced_at_zero() -> None:
    catalog = PriceCatalog()
    with pytest.raises(UnpricedError) as err:
        price_usage(_event("openai", "gpt-does-not-exist", SHAPES["plain"], datetime(2026, 1, 1, tzinfo=UTC)),
                    catalog)
    assert err.value.reason == "unknown_model"
    assert "gpt-does-not-exist" in str(err.value)
    with pytest.raises(UnpricedError) as err:
        price_usage(_event("vllm", "llama-3-70b-instruct", SHAPES["plain"], datetime(2026, 1, 1, tzinfo=UTC)),
                    catalog)
    assert err.value.reason == "unknown_provider"


def test_aliases_dated_ids_and_bedrock_region_prefixes_resolve() -> None:
    catalog = PriceCatalog()
    when = datetime(2026, 6, 1, tzinfo=UTC)
    for provider, model in [("openai", "gpt-4o-2024-08-06"), ("openai", "GPT-4o"),
                            ("aws.bedrock", "us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
                            ("anthropic", "claude-sonnet-4-5-20250929"), (None, "openai/gpt-4o")]:
        priced = price_usage(_event(provider, model, SHAPES["plain"], when), catalog)
        assert priced.list_cost > 0, (provider, model)


def test_prices_by_time_of_day_are_looked_up_once_per_slot_and_exact_at_each_boundary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = PriceCatalog()
    resolved: list[tuple[str | None, str, int, str | None]] = []
    resolve = catalog._resolve

    def counting(provider: str | None, model: str, start_unix_nano: int,
                 service_tier: str | None) -> tuple[ResolvedPrice | UnpricedError, int]:
        resolved.append((provider, model, start_unix_nano, service_tier))
        return resolve(provider, model, start_unix_nano, service_tier)

    monkeypatch.setattr(catalog, "_resolve", counting)
    tokens = SHAPES["cache_read"]
    day = datetime(2026, 11, 20, tzinfo=UTC)
    # deepseek-chat is off-peak from 16:30 to 00:30 UTC: within a half hour, every call has the same price
    for second in range(0, 1_800, 7):
        price_usage(_event("deepseek", "deepseek-chat", tokens, day + timedelta(hours=17, seconds=second)), catalog)
    assert len(resolved) <= 2  # the day's first call, then its slot's; not one per call
    # each side of every boundary, in one catalog: the nanosecond before and the boundary itself
    for model in ("deepseek-chat", "deepseek-flash"):
        for boundary in ("00:30", "01:00", "04:00", "06:00", "10:00", "16:30"):
            at = datetime.combine(day.date(), time.fromisoformat(boundary), UTC)
            for ns in (_ns(at) - 1, _ns(at)):
                event = UsageEvent(**{**_event("deepseek", model, tokens, at).to_dict(), "tokens": tokens,
                                      "start_time_unix_nano": ns})
                expected = _reference(tokens, model, "deepseek", datetime.fromtimestamp(ns // 1_000 / 1e6, UTC),
                                      None)
                assert price_usage(event, catalog).list_cost == expected, (model, boundary, ns)


def test_tokens_a_self_hosted_override_does_not_price_are_never_free() -> None:
    # the override is the only price of an unlisted model: its output tokens would otherwise vanish from the rows
    when = datetime(2026, 1, 1, tzinfo=UTC)
    input_only = PriceCatalog.from_config(config_from_dict({"pricing": {"overrides": [
        {"provider": "vllm", "model": "acme-70b", "input_per_mtok": 2}]}}))
    with pytest.raises(UnpricedError) as err:
        price_usage(_event("vllm", "acme-70b", SHAPES["reasoning"], when), input_only)
    assert err.value.reason == "unpriced_meter" and "output_tokens" in str(err.value)
    assert err.value.reason in UNPRICED_REASONS  # spendstream reprice prices it once the override is completed
    # a call without output is fully priced; an explicit price of 0 is the operator's word
    assert [line.meter for line in price_usage(_event("vllm", "acme-70b", TokenCounts(input_uncached=10), when),
                                               input_only).lines] == ["input_tokens"]
    free_output = PriceCatalog.from_config(config_from_dict({"pricing": {"overrides": [
        {"provider": "vllm", "model": "acme-70b", "input_per_mtok": 2, "output_per_mtok": 0}]}}))
    assert price_usage(_event("vllm", "acme-70b", SHAPES["reasoning"], when), free_output).list_cost == \
        Decimal("0.006")  # 3,000 input tokens x 2 USD / 1e6
