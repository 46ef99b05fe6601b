"""Compiled meter plans and price_usages: the same lines and refusals as pricing call by call, worked by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pipeline.pricing import PriceCatalog, PricedUsage, UnpricedError, price_usage, price_usages
from pipeline.pricing.meter_plan import MeterStep, PricedLine, compile_plan
from schemas.config import config_from_dict
from schemas.usage import TokenCounts, UsageEvent

WHEN = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp()) * 10**9


def _event(provider: str | None, model: str | None, tokens: TokenCounts, adjusted_count: str | None = None
           ) -> UsageEvent:
    return UsageEvent(id="t-s", trace_id="t", span_id="s", parent_span_id=None, start_time_unix_nano=WHEN,
                      end_time_unix_nano=WHEN + 10**9, operation="chat", provider=provider, request_model=model,
                      response_model=None, tokens=tokens, attribution={}, attribution_key="k",
                      adjusted_count=adjusted_count)


def _call(input_uncached: int, cache_read: int, cache_write: int, output: int) -> UsageEvent:
    return _event(None, "m", TokenCounts(input_uncached=input_uncached, cache_read=cache_read,
                                         cache_write=cache_write, output=output))


def _step(units: tuple[int, ...], key: str, price: str, tier: int | None = None, contract: str | None = None
          ) -> MeterStep:
    return MeterStep(units, key, 1_000_000, Decimal(price), Decimal(contract or price),
                     Decimal(price) / 1_000_000, None if contract is None else Decimal(contract) / 1_000_000, tier)


def test_a_batch_prices_each_call_as_pricing_it_alone_does() -> None:
    catalog = PriceCatalog.from_config(config_from_dict({"pricing": {"overrides": [
        {"provider": "vllm", "model": "acme-70b", "input_per_mtok": 2}]}}))
    tokens = TokenCounts(input_uncached=1_000, cache_read=4_000, cache_write=200, output=300, reasoning=100)
    events = [_event("openai", "gpt-4o", tokens), _event("anthropic", "claude-sonnet-4-5", tokens),
              _event(None, None, tokens),  # missing_model
              _event("openai", "gpt-does-not-exist", tokens),  # unknown_model
              _event("vllm", "acme-70b", tokens),  # unpriced_meter: the override prices no output
              _event("perplexity", "sonar-deep-research", TokenCounts(input_uncached=10, output=5, reasoning=9)),
              _event("perplexity", "sonar-pro", tokens, adjusted_count="3.6")]  # 4 requests, each priced
    batch = price_usages(events, catalog)
    assert len(batch) == len(events)
    for event, priced in zip(events, batch, strict=True):
        try:
            alone = price_usage(event, catalog)
        except UnpricedError as exc:
            assert isinstance(priced, UnpricedError) and (priced.reason, str(priced)) == (exc.reason, str(exc))
        else:
            assert priced == alone
    assert [getattr(p, "reason", None) for p in batch] == [
        None, None, "missing_model", "unknown_model", "unpriced_meter", "invalid_usage", None]
    assert str(batch[5]) == "output_reasoning_tokens exceed output_tokens (5)"
    sonar_pro = batch[6]
    assert isinstance(sonar_pro, PricedUsage)
    requests = next(line for line in sonar_pro.lines if line.meter == "requests")
    assert requests.quantity == 4 and requests.list_cost == Decimal("0.056")  # 4 x 14 USD / 1,000


def test_a_plan_bills_each_meter_its_leaf_at_the_tier_its_input_reaches() -> None:
    # cache reads, then input less them, then output; above 200k input tokens every token costs the tier rate
    below = [_step((1,), "cache_read_tokens", "0.3"), _step((0, 1), "input_tokens", "3"),
             _step((3,), "output_tokens", "15", contract="12")]
    above = [_step((1,), "cache_read_tokens", "0.6", 200_000), _step((0, 1), "input_tokens", "6", 200_000),
             _step((3,), "output_tokens", "22.5", 200_000, contract="18")]
    price_lines = compile_plan("m", [(200_000, above), (None, below)], [])
    lines = price_lines(_call(150_000, 50_000, 0, 1_000))  # input 200,000: not above the threshold
    assert lines == (
        PricedLine("cache_read_tokens", 50_000, 1_000_000, Decimal("0.3"), Decimal("0.3"), Decimal("0.015"),
                   Decimal("0.015"), None),
        PricedLine("input_tokens", 150_000, 1_000_000, Decimal(3), Decimal(3), Decimal("0.45"), Decimal("0.45"), None),
        PricedLine("output_tokens", 1_000, 1_000_000, Decimal(15), Decimal(12), Decimal("0.015"), Decimal("0.012"),
                   None))
    lines = price_lines(_call(150_001, 50_000, 0, 1_000))
    assert [(line.quantity, line.list_cost, line.contract_cost, line.tier) for line in lines] == [
        (50_000, Decimal("0.03"), Decimal("0.03"), 200_000),
        (150_001, Decimal("0.900006"), Decimal("0.900006"), 200_000),
        (1_000, Decimal("0.0225"), Decimal("0.018"), 200_000)]
    assert price_lines(_call(0, 0, 0, 7)) == (PricedLine(  # no input: the lowest rates, no line for 0 units
        "output_tokens", 7, 1_000_000, Decimal(15), Decimal(12), Decimal("0.000105"), Decimal("0.000084"), None),)


def test_a_plan_refuses_units_no_meter_prices() -> None:
    price_lines = compile_plan("acme-70b", [(None, [_step((0,), "input_tokens", "2")])], [3])
    assert [line.quantity for line in price_lines(_call(10, 0, 0, 0))] == [10]
    with pytest.raises(UnpricedError) as err:
        price_lines(_call(10, 0, 0, 5))
    assert (err.value.reason, str(err.value)) == (
        "unpriced_meter", "the pricing.overrides entry for 'acme-70b' has no price for its output_tokens (5)")


def test_prices_of_one_shape_run_the_same_code_with_their_own_prices() -> None:
    catalog = PriceCatalog()
    tokens = TokenCounts(input_uncached=10, output=5)
    gpt_4o, gpt_41 = (price_usage(_event("openai", model, tokens), catalog).price for model in ("gpt-4o", "gpt-4.1"))
    # cache reads, input, output; no tiers: one bytecode, each price's constants its own
    assert gpt_4o.price_lines.__code__.co_code == gpt_41.price_lines.__code__.co_code
    assert [line.list_price for line in gpt_4o.price_lines(_call(10, 0, 0, 5))] == [Decimal("2.5"), Decimal(10)]
    assert [line.list_price for line in gpt_41.price_lines(_call(10, 0, 0, 5))] == [Decimal(2), Decimal(8)]


def test_every_combination_of_billed_meters_gives_its_lines_in_meter_order() -> None:
    # all six meters, below and above a tier: each meter with units makes a line, in the plan's order, whichever
    # others have none (a compiled plan returns one tuple per combination, 2**6 per bracket)
    def steps(rate: str, tier: int | None) -> list[MeterStep]:
        return [_step((1,), "cache_read_tokens", rate, tier), _step((2,), "cache_write_tokens", rate, tier),
                _step((0, 1, 2), "input_tokens", rate, tier), _step((3, 4), "output_tokens", rate, tier),
                _step((4,), "output_reasoning_tokens", rate, tier), _step((5,), "requests", rate, tier)]

    price_lines = compile_plan("m", [(1_000, steps("2", 1_000)), (None, steps("1", None))], [])
    for combination in range(64):
        has = [bool(combination >> meter & 1) for meter in range(6)]
        for scale in (1, 100):  # input up to the threshold, then above it
            cache_read, cache_write, uncached = (7 * scale * has[0], 5 * scale * has[1], 3 * scale * has[2])
            reasoning, output = 11 * has[4], 11 * has[4] + 13 * has[3]
            event = _event(None, "m", TokenCounts(input_uncached=uncached, cache_read=cache_read,
                                                  cache_write=cache_write, output=output, reasoning=reasoning),
                           adjusted_count=None if has[5] else "0.4")  # 0.4 calls round to 0 requests
            rate, tier = (Decimal(2), 1_000) if uncached + cache_read + cache_write > 1_000 else (Decimal(1), None)
            expected = [(key, units, rate * units / 1_000_000, tier) for key, units in (
                ("cache_read_tokens", cache_read), ("cache_write_tokens", cache_write), ("input_tokens", uncached),
                ("output_tokens", output - reasoning), ("output_reasoning_tokens", reasoning),
                ("requests", event.requests)) if units]
            assert [(line.meter, line.quantity, line.list_cost, line.tier) for line in price_lines(event)] == \
                expected, (has, scale)
