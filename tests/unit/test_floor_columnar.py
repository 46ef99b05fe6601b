"""bench/floor.py's design B: request files written by the worker from its priced calls, columnar. Its table must
be the one the exporter writes from the JSON rows of the same calls (design A), or its measurement is of nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest
from msgspec.structs import replace

from bench.floor import ColumnarRows
from pipeline.export.files import pack_values, unpack
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import focus_records, price_calls
from pipeline.pricing.focus import Billing
from schemas.usage import TokenCounts, UsageEvent

#: 2026-11-30T23:59:58Z: a run of calls that crosses a day and a month
LATE_NOV_S = int(datetime(2026, 11, 30, 23, 59, 58, tzinfo=UTC).timestamp())
MODELS = (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"),
          ("gcp.gemini", "gemini-2.5-flash"), ("openai", "gpt-4.1"))


def calls(n: int) -> list[UsageEvent]:
    """Distinct calls as the collector makes them, with what varies a row: models, cache reads and writes, teams and
    tags, service tiers, sampled calls, unallocated calls, a response model, seconds across a month's end."""
    out = []
    for i in range(n):
        provider, model = MODELS[i % len(MODELS)]
        team = f"team-{i % 3}"
        start_ns = (LATE_NOV_S + i % 5) * 10**9
        out.append(UsageEvent(
            id=f"{i:032x}-{i:016x}", trace_id=f"{i:032x}", span_id=f"{i:016x}", parent_span_id=None,
            start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + 10**9, operation="chat", provider=provider,
            request_model=model, response_model="gpt-4o-2024-08-06" if i % 10 == 0 and model == "gpt-4o" else None,
            tokens=TokenCounts(input_uncached=1_000 + i, cache_read=512 * (i % 2), cache_write=64 * (i % 4 == 2),
                               output=50 + i % 700),
            attribution={"team": team, "use_case": f"use-case-{i % 7}", "ünicode": "✓"} if i % 9 else {},
            attribution_key=f"team={team}" if i % 9 else "unallocated", allocated=bool(i % 9),
            service_tier="flex" if i % 11 == 0 and provider == "openai" else None))
    out[1] = replace(out[1], adjusted_count="4.000000",
                     tokens=TokenCounts(input_uncached=4 * 1_001, output=4 * 51))  # sampled at 1/4
    return out


@pytest.mark.parametrize("billing", [Billing(), Billing(focus_version="1.2"),
                                     Billing(currency="EUR", usd_rate=Decimal("0.92"))],
                         ids=["focus-1.4", "focus-1.2", "eur"])
def test_columnar_table_is_the_table_the_exporter_packs_from_the_rows(billing: Billing) -> None:
    out = price_calls(calls(300), PriceCatalog(), billing)
    assert len(out.priced) == 300
    packed, refused = pack_values([value for _, value in focus_records(out.priced, out.line_costs, billing)])
    assert not refused and len(packed) == 1
    expected = unpack(packed[0].table)
    columnar = ColumnarRows(billing)
    for _ in range(2):  # the second time from the templates it keeps
        table = columnar.table(out.priced, out.line_costs)
        assert table.schema.equals(expected.schema, check_metadata=True)
        for name in expected.column_names:  # a column at a time: a failure names it
            assert table.column(name).equals(expected.column(name)), name
    assert columnar.table([], []).equals(pa.Table.from_pylist([], schema=expected.schema))
