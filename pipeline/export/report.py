"""`spendstream report`: top spenders from the FOCUS files.

Queries are plain DuckDB SQL over the request-level Parquet files, the same a FinOps analyst
would write; rendering is separate so the numbers can be tested without a terminal.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import duckdb

from pipeline.export.files import focus_dir
from pipeline.pricing.focus import INPUT_METERS, OUTPUT_METERS
from schemas.codec import parse_utc, plain_decimal
from schemas.errors import SpendstreamError
from schemas.focus import ATTRIBUTION_COLUMNS, REQUEST_FILES, request_files_glob
from schemas.swap_lock import reading_request_files

#: --by names -> FOCUS columns
GROUPABLE: Final = {**ATTRIBUTION_COLUMNS, "provider": "ServiceProviderName",
                    "model": "x_Model", "meter": "SkuMeter", "service": "ServiceName", "day": "charge_date"}
REPORT_COLUMNS: Final = ("cost", "tokens_in", "tokens_out", "requests", "cost_per_request", "out_in_ratio")


class ReportError(SpendstreamError):
    """A report cannot be made: no files, or an unknown grouping."""


@dataclass(frozen=True, slots=True)
class Report:
    by: tuple[str, ...]
    currency: str | None
    rows: list[dict[str, Any]]
    total_cost: Decimal


#: --by provider in FOCUS 1.2 files (focus.version "1.2"): ServiceProviderName replaced ProviderName
_FOCUS_1_2_NAMES: Final = {"ServiceProviderName": "ProviderName"}


def _group_expression(by: str, columns: Collection[str] | None) -> str:
    """The SQL of a --by group over files that have `columns` (None: FOCUS 1.4 files only)."""
    name = GROUPABLE[by]
    old = _FOCUS_1_2_NAMES.get(name)
    if columns is None or old is None or old not in columns:
        return f'"{name}"'
    return f'coalesce("{name}", "{old}")' if name in columns else f'"{old}"'


def report_sql(by: Sequence[str], source_glob: str, since: str | None, until: str | None, top: int, *,
               columns: Collection[str] | None = None) -> str:
    """The report's SQL; `columns` are the files' columns (FOCUS 1.2 and 1.4 files name the provider apart)."""
    unknown = [b for b in by if b not in GROUPABLE]
    if unknown:
        raise ReportError(f"--by: unknown {', '.join(unknown)}; choose from {', '.join(GROUPABLE)}")
    groups = [f'coalesce(CAST({_group_expression(b, columns)} AS VARCHAR), \'(none)\') AS "{b}"' for b in by]
    where = []
    if since:
        where.append(f"\"ChargePeriodStart\" >= TIMESTAMPTZ '{_iso(since)}'")
    if until:
        where.append(f"\"ChargePeriodStart\" < TIMESTAMPTZ '{_iso(until)}'")
    inputs = ", ".join(f"'{m}'" for m in sorted(INPUT_METERS))
    outputs = ", ".join(f"'{m}'" for m in sorted(OUTPUT_METERS))
    return f"""
        SELECT {', '.join(groups) + ',' if groups else ''}
               sum("BilledCost") AS cost,
               CAST(coalesce(sum(CASE WHEN "x_Meter" IN ({inputs}) THEN "ConsumedQuantity" END), 0) AS BIGINT)
                 AS tokens_in,
               CAST(coalesce(sum(CASE WHEN "x_Meter" IN ({outputs}) THEN "ConsumedQuantity" END), 0) AS BIGINT)
                 AS tokens_out,
               count(DISTINCT "x_UsageId") AS requests,
               any_value("BillingCurrency") AS currency,
               count(DISTINCT "BillingCurrency") AS currencies
        FROM read_parquet('{source_glob}', hive_partitioning = true, union_by_name = true)
        {'WHERE ' + ' AND '.join(where) if where else ''}
        {'GROUP BY ALL' if groups else ''}
        ORDER BY cost DESC
        LIMIT {int(top)}"""


def _iso(value: str) -> str:
    """A --since/--until value (date or date-time, UTC) as an ISO timestamp. Raises ReportError."""
    try:
        moment = parse_utc(value)
    except ValueError as exc:
        raise ReportError(f"not a date or date-time: {value!r} (use e.g. 2026-11-01 or 2026-11-01T08:00)") from exc
    return moment.strftime("%Y-%m-%d %H:%M:%S+00")


def make_report(data_dir: Path, by: Sequence[str], *, since: str | None = None, until: str | None = None,
                top: int = 10) -> Report:
    root = focus_dir(data_dir)
    if not any(data_dir.glob(REQUEST_FILES)):
        raise ReportError(f"no FOCUS files under {root} (is the exporter running with --data-dir {data_dir}?)")
    source = request_files_glob(data_dir)
    sql = report_sql(by, source, since, until, top)  # checks the arguments first
    with reading_request_files(data_dir), duckdb.connect() as con:  # never across a compaction swap
        con.execute("SET TimeZone = 'UTC'")
        if any(_FOCUS_1_2_NAMES.get(GROUPABLE[b]) for b in by):  # the files may be FOCUS 1.2, 1.4 or both
            columns = {row[0] for row in con.execute(
                f"DESCRIBE SELECT * FROM read_parquet('{source}', hive_partitioning = true, union_by_name = true)"
            ).fetchall()}
            sql = report_sql(by, source, since, until, top, columns=columns)
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    currencies = {row.pop("currency") for row in rows}
    mixed_within_a_group = [row.pop("currencies") > 1 for row in rows]
    if len(currencies) > 1 or any(mixed_within_a_group):
        raise ReportError("the files mix billing currencies; report each billing period separately")
    for row in rows:
        row["cost"] = plain_decimal(row["cost"] or Decimal(0))
        row["cost_per_request"] = (row["cost"] / row["requests"]).quantize(Decimal("1e-8")) if row["requests"] \
            else None
        row["out_in_ratio"] = round(row["tokens_out"] / row["tokens_in"], 3) if row["tokens_in"] else None
    currency = currencies.pop() if currencies else None
    return Report(tuple(by), currency, rows, sum((r["cost"] for r in rows), Decimal(0)))
