"""Pricing throughput: priced usage events/s, against `genai_prices.calc_price` on the same events.

Both run in this process on the same 20,000 events (a realistic mix: 12 models of 6 providers,
cache reads and writes, reasoning, long-context tiers, service tiers, dates across a year):
  baseline   genai_prices.calc_price(Usage(...), model, provider_id=..., timestamp, price_context)
  pricing    spendstream's price_usages (compiled meter plans): every meter's list and contracted cost
  + FOCUS    price_usage + the FOCUS 1.2 rows of each call, encoded as `genai.cost.focus` values
  decode +   the same from `genai.usage` message values (one call each): decode_usage_batch, then + FOCUS
Each runs for --seconds of this thread's CPU time, in interleaved rounds so that a shared machine's load
weighs on all alike; the chart goes to bench/results/pricing.svg.

    .venv/bin/python bench/pricing.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genai_prices import Usage, calc_price

from bench.chart import bar_chart
from pipeline.pricing import PriceCatalog, price_usage, price_usages
from pipeline.pricing.catalog import PROVIDER_IDS
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.usage import TokenCounts, UsageEvent, decode_usage_batch, encode_usage_batch

RESULTS = Path(__file__).parent / "results"
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "gpt-5"), ("openai", "gpt-4.1"),
          ("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-haiku-4-5"), ("anthropic", "claude-opus-4-1"),
          ("gcp.gemini", "gemini-2.5-pro"), ("gcp.gemini", "gemini-2.5-flash"), ("aws.bedrock",
          "us.anthropic.claude-3-5-sonnet-20241022-v2:0"), ("mistral_ai", "mistral-large-latest"),
          ("deepseek", "deepseek-chat")]


def make_events(n: int, seed: int = 7) -> list[UsageEvent]:
    rng = random.Random(seed)
    start = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp())
    events = []
    for i in range(n):
        provider, model = rng.choice(MODELS)
        inputs = rng.choice([rng.randint(50, 4_000), rng.randint(10_000, 120_000), rng.randint(200_001, 400_000)])
        cache_read = rng.choice([0, 0, inputs // 2])
        cache_write = rng.choice([0, 0, 0, min(1024, inputs - cache_read)])
        output = rng.randint(1, 3_000)
        ts = (start + rng.randint(0, 365 * 86_400)) * 10**9
        events.append(UsageEvent(
            id=f"{i:032x}-{i:016x}", trace_id=f"{i:032x}", span_id=f"{i:016x}", parent_span_id=None,
            start_time_unix_nano=ts, end_time_unix_nano=ts + 10**9, operation="chat", provider=provider,
            request_model=model, response_model=None, service_tier=rng.choice([None, None, None, "flex"])
            if provider == "openai" else None,
            tokens=TokenCounts(input_uncached=inputs - cache_read - cache_write, cache_read=cache_read,
                               cache_write=cache_write, output=output, reasoning=output // 3 if "gpt-5" in model
                               else 0),
            attribution={"team": f"team-{i % 17}", "use_case": "bench"}, attribution_key=f"team=team-{i % 17}"))
    return events


def interleaved_rates(workloads: dict[str, tuple[Callable[[Sequence[Any]], object], Sequence[Any]]],
                      seconds: float, *, slice_s: float = 0.25) -> dict[str, float]:
    """Events/s of each workload by this thread's CPU time, in interleaved slices of `slice_s`: on a shared
    machine, wall-clock rates measured one after the other would compare different loads."""
    done = dict.fromkeys(workloads, 0)
    spent = dict.fromkeys(workloads, 0.0)
    while min(spent.values()) < seconds:
        for label, (work, events) in workloads.items():
            began = time.thread_time()
            while (used := time.thread_time() - began) < slice_s:
                start = done[label] % len(events)
                chunk = events[start:start + 500]  # not events[start:][:500]: a copy of the rest of the list
                work(chunk)
                done[label] += len(chunk)
            spent[label] += used
        print("\r  " + "  ".join(f"{label} {done[label] / spent[label]:>9,.0f}/s" for label in workloads),
              end="", flush=True)
    print()
    return {label: done[label] / spent[label] for label in workloads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    events = make_events(20_000)
    catalog = PriceCatalog()
    billing = Billing()

    def baseline(chunk: Sequence[UsageEvent]) -> None:
        for e in chunk:
            usage = Usage(input_tokens=e.tokens.input_total, cache_read_tokens=e.tokens.cache_read,
                          cache_write_tokens=e.tokens.cache_write, output_tokens=e.tokens.output,
                          output_reasoning_tokens=e.tokens.reasoning)
            context = {"service_tier": e.service_tier} if e.service_tier else None
            calc_price(usage, e.request_model or "", provider_id=PROVIDER_IDS.get(e.provider or "", e.provider),
                       genai_request_timestamp=datetime.fromtimestamp(e.start_time_unix_nano / 1e9, UTC),
                       price_context=context)

    def pricing(chunk: Sequence[UsageEvent]) -> None:
        price_usages(chunk, catalog)  # the batch form cost_records uses: no Python call per event

    def with_focus(chunk: Sequence[UsageEvent]) -> None:
        cost_records(chunk, catalog, billing)

    values = [encode_usage_batch([e]) for e in events]

    def decoded(chunk: Sequence[bytes]) -> None:
        cost_records([e for value in chunk for e in decode_usage_batch(value)], catalog, billing)

    # same answer first: a benchmark of a wrong result is worthless
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in events[:2_000]:
            usage = Usage(input_tokens=e.tokens.input_total, cache_read_tokens=e.tokens.cache_read,
                          cache_write_tokens=e.tokens.cache_write, output_tokens=e.tokens.output,
                          output_reasoning_tokens=e.tokens.reasoning)
            expected = calc_price(usage, e.request_model or "",
                                  provider_id=PROVIDER_IDS.get(e.provider or "", e.provider),
                                  genai_request_timestamp=datetime.fromtimestamp(e.start_time_unix_nano / 1e9, UTC),
                                  price_context={"service_tier": e.service_tier} if e.service_tier else None)
            assert price_usage(e, catalog).list_cost == expected.total_price, e
        print(f"pricing {len(events):,} events ({len(MODELS)} models), {args.seconds:g}s each; "
              "2,000 checked equal to calc_price first")
        measured = interleaved_rates({"baseline": (baseline, events), "pricing": (pricing, events),
                                      "+ FOCUS": (with_focus, events), "decode +": (decoded, values)}, args.seconds)
    for label, per_s in measured.items():
        print(f"  {label:<10} {per_s:>12,.0f} events/s")
    rates = {"genai_prices.calc_price (baseline)": measured["baseline"], "price_usage": measured["pricing"],
             "price_usage + FOCUS rows": measured["+ FOCUS"], "decode + price + FOCUS rows": measured["decode +"]}
    base = rates["genai_prices.calc_price (baseline)"]
    print(f"pricing: {rates['price_usage'] / base:.1f}x calc_price; "
          f"with FOCUS rows: {rates['price_usage + FOCUS rows'] / base:.1f}x; "
          f"decoded from genai.usage: {rates['decode + price + FOCUS rows'] / base:.1f}x (target: >= 50x for pricing)")
    RESULTS.mkdir(exist_ok=True)
    chart = RESULTS / "pricing.svg"
    chart.write_text(bar_chart("Pricing usage events (events/s, one core)", rates, baseline=base))
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
