"""`spendstream report` and `spendstream price`: answers from the FOCUS files and from the catalog.

Queries are plain DuckDB SQL over the request-level Parquet files, the same a FinOps analyst
would write; rendering is separate so the numbers can be tested without a terminal.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson

from pipeline.focus import INPUT_METERS, OUTPUT_METERS
from pipeline.focus_files import focus_dir
from pipeline.pricing import PriceCatalog, PricedUsage, price_usage
from schemas.errors import SpendstreamError
from schemas.focus import ATTRIBUTION_COLUMNS
from schemas.usage import TokenCounts, UsageEvent

#: --by names -> FOCUS columns
GROUPABLE: Final = {**ATTRIBUTION_COLUMNS, "provider": "ProviderName",
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


def report_sql(by: Sequence[str], source_glob: str, since: str | None, until: str | None, top: int) -> str:
    unknown = [b for b in by if b not in GROUPABLE]
    if unknown:
        raise ReportError(f"--by: unknown {', '.join(unknown)}; choose from {', '.join(GROUPABLE)}")
    groups = [f'coalesce(CAST("{GROUPABLE[b]}" AS VARCHAR), \'(none)\') AS "{b}"' for b in by]
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
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ReportError(f"not a date or date-time: {value!r} (use e.g. 2026-11-01 or 2026-11-01T08:00)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00")


def make_report(data_dir: Path, by: Sequence[str], *, since: str | None = None, until: str | None = None,
                top: int = 10) -> Report:
    root = focus_dir(data_dir)
    if not any(root.glob("billing_period=*/charge_date=*/part-*.parquet")):
        raise ReportError(f"no FOCUS files under {root} (is the exporter running with --data-dir {data_dir}?)")
    sql = report_sql(by, str(root / "billing_period=*" / "charge_date=*" / "part-*.parquet"), since, until, top)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    currencies = {row.pop("currency") for row in rows}
    mixed_within_a_group = [row.pop("currencies") > 1 for row in rows]
    if len(currencies) > 1 or any(mixed_within_a_group):
        raise ReportError("the files mix billing currencies; report each billing period separately")
    for row in rows:
        row["cost"] = _plain(row["cost"] or Decimal(0))
        row["cost_per_request"] = (row["cost"] / row["requests"]).quantize(Decimal("1e-8")) if row["requests"] \
            else None
        row["out_in_ratio"] = round(row["tokens_out"] / row["tokens_in"], 3) if row["tokens_in"] else None
    currency = currencies.pop() if currencies else None
    return Report(tuple(by), currency, rows, sum((r["cost"] for r in rows), Decimal(0)))


def _plain(value: Decimal) -> Decimal:
    """Without trailing zeros and never in E-notation: 11.4184475, not 11.418447500000000000."""
    return Decimal(format(value.normalize(), "f"))


def render_report(report: Report, fmt: str) -> str:
    columns = [*report.by, *REPORT_COLUMNS]
    if fmt == "json":
        return orjson.dumps({"currency": report.currency, "rows": report.rows},
                            default=str, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report.rows)
        return buffer.getvalue()
    cells = [[_cell(row[c], c) for c in columns] for row in report.rows]
    headers = [c if c != "cost" else f"cost ({report.currency})" for c in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = {i for i, c in enumerate(columns) if c in REPORT_COLUMNS}
    lines = ["  ".join(h.rjust(w) if i in numeric else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths,
                                                                                                 strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    if not cells:
        lines.append("(no spend in this period)")
    return "\n".join(lines)


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "cost":
        return f"{value:,.4f}"
    if column == "cost_per_request":
        return f"{value:.6f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def explain_price(catalog: PriceCatalog, model: str, *, input_tokens: int, output_tokens: int, cache_read: int = 0,
                  cache_write: int = 0, reasoning: int = 0, provider: str | None = None, at: str | None = None,
                  service_tier: str | None = None) -> tuple[PricedUsage, str]:
    """Price one hypothetical call and explain each line of the computation."""
    when = datetime.fromisoformat(_iso(at).replace(" ", "T")) if at else datetime.now(UTC)
    if cache_read + cache_write > input_tokens:
        raise ReportError(f"--cache-read + --cache-write ({cache_read + cache_write}) exceed --input "
                          f"({input_tokens}); --input counts all input tokens, cached ones included")
    ns = int(when.timestamp()) * 10**9
    event = UsageEvent(id="explain", trace_id="", span_id="", parent_span_id=None, start_time_unix_nano=ns,
                       end_time_unix_nano=ns, operation="chat", provider=provider, request_model=model,
                       response_model=None, attribution={}, attribution_key="", service_tier=service_tier,
                       tokens=TokenCounts(input_uncached=input_tokens - cache_read - cache_write,
                                          cache_read=cache_read, cache_write=cache_write, output=output_tokens,
                                          reasoning=reasoning))
    priced = price_usage(event, catalog)
    price = priced.price
    lines = [f"{model} → {price.model_id} from {price.provider_name} (provider id {price.provider_id}), "
             f"prices in force on {when:%Y-%m-%d} ({price.list_sheet.price_id})"]
    for line in priced.lines:
        tier = f"  [input above {line.tier:,} tokens: tier rate for every token]" if line.tier is not None else ""
        lines.append(f"  {line.meter:<24} {line.quantity:>12,} x {_plain(line.list_price)} USD / {line.per:,} "
                     f"= {_plain(line.list_cost)} USD{tier}")
        if not price.is_list:
            lines.append(f"  {'  contracted':<24} {line.quantity:>12,} x {_plain(line.contract_price)} "
                         f"{price.contract_currency} / {line.per:,} = {_plain(line.contract_cost)} "
                         f"{price.contract_currency}")
    lines.append(f"  {'list total':<24} {_plain(priced.list_cost)} USD")
    if not price.is_list:
        lines.append(f"  {'contracted total':<24} {_plain(priced.contract_cost)} {price.contract_currency} "
                     "(pricing.overrides)")
    if catalog.billing_currency != "USD":
        billed = priced.contract_cost if price.contract_currency == catalog.billing_currency \
            else priced.contract_cost * catalog.usd_rate
        lines.append(f"  {'billed':<24} {_plain(billed)} {catalog.billing_currency} (fx: 1 USD = {catalog.usd_rate} "
                     f"{catalog.billing_currency})")
    lines.append(f"  catalog {catalog.version}")
    return priced, "\n".join(lines)
