"""What the FOCUS files say was spent: the durable record, read back when the broker's state is gone.

The files are the one record that survives everything (the embedded broker keeps nothing across a
restart). Stage 2 rebuilds budget period totals from them on start and on a policy reload (a budget
added mid-period counts the whole period), and, on a cold start (no changelog state), the recent
buckets its baselines need; stage 1 seeds its dedupe ids from them. Reads the request-level files
with DuckDB, pruned by charge date; call it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import duckdb
import orjson

from pipeline.guardrails.state import Bucket, day_of, month_of
from schemas.focus import REQUEST_FILES, request_files_glob
from schemas.policy import Policy
from schemas.swap_lock import reading_request_files


@dataclass(frozen=True, slots=True)
class RecordedSpend:
    """Spend of one attribution in one stretch of time, as the files have it."""

    attribution: Mapping[str, str]
    allocated: bool
    start_s: int  # the bucket's or the day's start (Unix seconds, UTC)
    cost: Decimal  # BilledCost, billing currency
    requests: int
    tokens: int


def _query(data_dir: Path, sql: str, since_s: int, *params: object) -> list[tuple[object, ...]]:
    if not any(data_dir.glob(REQUEST_FILES)):
        return []
    glob = request_files_glob(data_dir)
    with reading_request_files(data_dir), duckdb.connect() as con:  # never across a compaction swap
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql.format(source=f"read_parquet('{glob}', hive_partitioning = true, "
                                             "union_by_name = true)"),
                           [since_s, day_of(since_s), *params]).fetchall()


def recorded_spend(data_dir: Path, since_s: int, grain_s: int) -> list[RecordedSpend]:
    """Spend charged from `since_s` on, per attribution and per `grain_s` of charge time (86400: per UTC day)."""
    # per call first: a sampled call counts as the calls it stands for (x_RequestCount), on each of its rows
    rows = _query(data_dir, f"""
        SELECT "Tags", allocated, start_s, sum(cost), sum(requests), CAST(sum(tokens) AS BIGINT)
        FROM (SELECT "Tags", coalesce("x_Allocated", true) AS allocated,
                     CAST(epoch("ChargePeriodStart") AS BIGINT) // {int(grain_s)} * {int(grain_s)} AS start_s,
                     "x_UsageId", sum("BilledCost") AS cost, max(coalesce("x_RequestCount", 1)) AS requests,
                     sum("ConsumedQuantity") AS tokens
              FROM {{source}}
              WHERE "ChargePeriodStart" >= to_timestamp(?) AND charge_date >= CAST(? AS DATE)
              GROUP BY ALL)
        GROUP BY ALL""", since_s)
    return [RecordedSpend(orjson.loads(str(tags)) if tags else {}, bool(allocated), int(str(start)),
                          Decimal(str(cost)), int(str(requests)), int(str(tokens or 0)))
            for tags, allocated, start, cost, requests, tokens in rows]


def recorded_usage(data_dir: Path, since_s: int) -> list[tuple[str, str, int]]:
    """(attribution key, usage id, start in Unix seconds) of every call charged from `since_s` on."""
    rows = _query(data_dir, """
        SELECT DISTINCT "x_AttributionKey", "x_UsageId", CAST(epoch("ChargePeriodStart") AS BIGINT)
        FROM {source}
        WHERE "ChargePeriodStart" >= to_timestamp(?) AND charge_date >= CAST(? AS DATE)""", since_s)
    return [(str(key or ""), str(usage_id), int(str(start))) for key, usage_id, start in rows]


def recorded_usage_ids(data_dir: Path, usage_ids: Iterable[str], since_s: int) -> set[str]:
    """Which of `usage_ids` (calls charged from `since_s` on) have rows in the files."""
    return _recorded(data_dir, "x_UsageId", usage_ids, since_s)


def recorded_row_ids(data_dir: Path, row_ids: Iterable[str], since_s: int) -> set[str]:
    """Which of `row_ids` (rows charged from `since_s` on) are in the files."""
    return _recorded(data_dir, "x_RowId", row_ids, since_s)


def _recorded(data_dir: Path, column: str, ids: Iterable[str], since_s: int) -> set[str]:
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    rows = _query(data_dir, f"""
        SELECT DISTINCT "{column}" FROM {{source}}
        WHERE "ChargePeriodStart" >= to_timestamp(?) AND charge_date >= CAST(? AS DATE)
          AND list_contains(?, "{column}")""", since_s, wanted)
    return {str(found) for (found,) in rows}


@dataclass(slots=True)
class RecordedScope:
    """One scope's spend as the files have it: per period ("2026-11", "2026-11-22") and per recent bucket."""

    periods: dict[str, Decimal] = field(default_factory=dict)
    unallocated: dict[str, Decimal] = field(default_factory=dict)
    buckets: dict[int, Bucket] = field(default_factory=dict)


def recorded_scopes(days: Iterable[RecordedSpend], buckets: Iterable[RecordedSpend], policy: Policy,
                    owns: Callable[[str], bool]) -> dict[str, RecordedScope]:
    """The files' spend folded into the scopes of `policy` that `owns` accepts (those of this worker's
    partitions): `days` (per UTC day) give period totals, `buckets` (per BUCKET_S) the recent buckets."""
    out: dict[str, RecordedScope] = {}
    scopes_of: dict[tuple[tuple[str, str], ...], list[str]] = {}

    def owned(attribution: Mapping[str, str]) -> list[str]:
        key = tuple(sorted(attribution.items()))
        if key not in scopes_of:
            scopes_of[key] = [s.key for s in policy.scopes_of(attribution) if owns(s.key)]
        return scopes_of[key]

    for day in days:
        for scope in owned(day.attribution):
            recorded = out.setdefault(scope, RecordedScope())
            for period in (day_of(day.start_s), month_of(day.start_s)):
                recorded.periods[period] = recorded.periods.get(period, Decimal(0)) + day.cost
                if not day.allocated:
                    recorded.unallocated[period] = recorded.unallocated.get(period, Decimal(0)) + day.cost
    for spend in buckets:
        for scope in owned(spend.attribution):
            bucket = out.setdefault(scope, RecordedScope()).buckets.setdefault(spend.start_s, Bucket())
            bucket.cost += spend.cost
            bucket.requests += spend.requests
            bucket.tokens += spend.tokens
    return out
