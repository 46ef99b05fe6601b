"""What the CLI prints: one table renderer, and the report and breaker listings built on it."""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Sequence
from typing import Any

import orjson

from pipeline.export.report import REPORT_COLUMNS, Report
from schemas.breaker import BreakerCommand


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = (),
                 rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in `right` right-aligned (numbers);
    `rule` draws a dashed line under the headers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(headers)]
    if rule:
        lines.append(line(["-" * w for w in widths]))
    lines += [line(r) for r in rows]
    return "\n".join(lines)


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
    table = render_table(headers, cells, right={i for i, c in enumerate(columns) if c in REPORT_COLUMNS}, rule=True)
    return table if cells else table + "\n(no spend in this period)"


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


def render_breakers(commands: list[BreakerCommand], fmt: str) -> str:
    if fmt == "json":
        return "[" + ",".join(c.encode().decode() for c in commands) + "]"
    if not commands:
        return "no breakers in force"
    rows = [(c.breaker_id, c.state, ",".join(f"{k}:{v}" for k, v in c.env_actions.items()) or c.action,
             c.expires_at or "-", c.reason) for c in sorted(commands, key=lambda c: c.breaker_id)]
    return render_table(("BREAKER", "STATE", "ACTION", "EXPIRES", "REASON"), rows)
