"""FOCUS Parquet files: their layout under the data dir, atomic writes, row-id ledger and rollups.

Layout (Hive-style, so DuckDB, Spark and FinOps tools read it with partition pruning):

    <data>/focus/request/billing_period=2026-11/charge_date=2026-11-22/part-<time>-<id>.parquet
    <data>/focus/hour/...   and   <data>/focus/day/...   (rollups, one file per charge date)

A file is written to a hidden temporary name, fsynced, then renamed into place: a reader sees a
whole file or none. Request-level files are always written (they are what rollups are built from).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.focus import COLUMNS_BY_VERSION, FOCUS_VERSION, MONEY_SCALE, row_version

QUANTITY_SCALE: Final = 6
_ARROW_TYPES: Final[Mapping[str, pa.DataType]] = {
    "money": pa.decimal128(38, MONEY_SCALE),
    "quantity": pa.decimal128(38, QUANTITY_SCALE),
    "int": pa.int64(),
    "string": pa.string(),
    "json": pa.string(),
    "datetime": pa.timestamp("s", tz="UTC"),
    "bool": pa.bool_(),
}
#: FOCUS version -> the files' Arrow schema; the version is also in the file metadata (FocusVersion)
ARROW_SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    version: pa.schema([pa.field(name, _ARROW_TYPES[kind]) for name, kind in columns]).with_metadata(
        {"FocusVersion": version, "DataGenerator": "spendstream"})
    for version, columns in COLUMNS_BY_VERSION.items()}
ARROW_SCHEMA: Final = ARROW_SCHEMAS[FOCUS_VERSION]
_KINDS: Final = {name: kind for columns in COLUMNS_BY_VERSION.values() for name, kind in columns}
LEDGER_DAYS: Final = 4


def focus_dir(data_dir: Path, grain: str = "request") -> Path:
    return data_dir / "focus" / grain


def partition_of(row: Mapping[str, Any]) -> tuple[str, str]:
    """(billing period, charge date) of a row, from its UTC timestamps."""
    return row["BillingPeriodStart"][:7], row["ChargePeriodStart"][:10]


def partition_dir(root: Path, period: str, day: str) -> Path:
    return root / f"billing_period={period}" / f"charge_date={day}"


def _column(name: str, rows: Sequence[Mapping[str, Any]]) -> pa.Array:
    """One column from row dicts. Decimal and time strings are parsed by Arrow, in C++."""
    kind = _KINDS[name]
    values = [row.get(name) for row in rows]
    if kind in ("money", "quantity"):
        text = pa.array([v if v is None or isinstance(v, str) else format(v, "f") for v in values], pa.string())
        return text.cast(_ARROW_TYPES[kind])  # exact: a string -> decimal cast raises rather than rounds
    if kind == "datetime":
        parsed = pc.strptime(pa.array(values, pa.string()), format="%Y-%m-%dT%H:%M:%SZ", unit="s")
        return parsed.cast(_ARROW_TYPES[kind])
    if kind == "json":
        values = [None if v is None else orjson.dumps(v).decode() for v in values]
    return pa.array(values, type=_ARROW_TYPES[kind])


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """FOCUS rows (as on Kafka, all of one FOCUS version) -> an Arrow table with that version's column types, in
    column order."""
    version = row_version(rows[0]) if rows else FOCUS_VERSION
    return pa.Table.from_arrays([_column(name, rows) for name, _ in COLUMNS_BY_VERSION[version]],
                                schema=ARROW_SCHEMAS[version])


def write_atomically(table: pa.Table, target: Path) -> None:
    """Write `table` to `target` so that no reader ever sees a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_partition(root: Path, period: str, day: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    target = partition_dir(root, period, day) / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    write_atomically(rows_table(rows), target)
    return target


class RowLedger:
    """Which row ids are already in the files, per charge date, loaded from the files on demand.

    Redelivered rows (the exporter or a worker restarted before committing) carry the same
    x_RowId and are dropped here. Only the last few days touched are kept in memory; an older
    day is read back from its files when a late row for it arrives.
    """

    def __init__(self, root: Path, max_days: int = LEDGER_DAYS) -> None:
        self._root = root
        self._max_days = max_days
        self._days: OrderedDict[tuple[str, str], set[str]] = OrderedDict()

    def _ids(self, period: str, day: str) -> set[str]:
        key = (period, day)
        if key not in self._days:
            files = sorted(partition_dir(self._root, period, day).glob("part-*.parquet"))
            ids: set[str] = set()
            for path in files:
                ids.update(pq.read_table(path, columns=["x_RowId"]).column(0).to_pylist())
            self._days[key] = ids
            while len(self._days) > self._max_days:
                self._days.popitem(last=False)
        self._days.move_to_end(key)
        return self._days[key]

    def new_rows(self, period: str, day: str, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The rows not yet written (also dropping repeats within `rows`); records them as written."""
        ids = self._ids(period, day)
        fresh = []
        for row in rows:
            if row["x_RowId"] not in ids:
                ids.add(row["x_RowId"])
                fresh.append(row)
        return fresh

    def forget(self, period: str, day: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Undo `new_rows` for rows whose file was not written."""
        ids = self._days.get((period, day))
        if ids is not None:
            ids.difference_update(row["x_RowId"] for row in rows)


_PER_REQUEST: Final = frozenset({"x_RowId", "x_UsageId", "x_TraceId", "x_SpanId"})
_VARYING: Final = frozenset({"x_Model", "x_RequestModel"})  # dated model ids of one SKU may differ
#: one rollup row per charge period x price point (SkuPriceId) x attribution: every dimension column
#: (SkuPriceDetails names the model version, so a rollup row is also per model version)
_GROUP_COLUMNS: Final = {version: [name for name, kind in columns
                                   if kind not in ("money", "quantity", "int") and name not in _PER_REQUEST | _VARYING
                                   and not name.startswith("ChargePeriod")]
                         for version, columns in COLUMNS_BY_VERSION.items()}


def rollup_sql(grain: str, source_glob: str, version: str = FOCUS_VERSION) -> str:
    """DuckDB SQL aggregating request rows into one row per charge period x SKU price x attribution.

    Within one SkuPriceId the unit prices are the same, so ListCost = ListUnitPrice x PricingQuantity
    still holds for the sums, exactly (DECIMAL sums).
    """
    if grain not in ("hour", "day"):
        raise ValueError(f"rollup grain must be hour or day, not {grain!r}")
    trunc = grain
    group_columns = _GROUP_COLUMNS[version]
    keys = ", ".join(f'"{c}"' for c in group_columns)
    select = []
    for name, kind in COLUMNS_BY_VERSION[version]:
        q = f'"{name}"'
        if name == "ChargePeriodStart":
            select.append(f"date_trunc('{trunc}', {q}) AS {q}")
        elif name == "ChargePeriodEnd":
            select.append(f"date_trunc('{trunc}', \"ChargePeriodStart\") + INTERVAL 1 {trunc.upper()} AS {q}")
        elif name in group_columns:
            select.append(q)
        elif "UnitPrice" in name or name == "x_SchemaVersion":  # one value per group
            select.append(f"any_value({q}) AS {q}")
        elif kind in ("money", "quantity", "int"):
            select.append(f"CAST(sum({q}) AS {_sql_type(kind)}) AS {q}")
        elif name in _VARYING:
            select.append(f"CASE WHEN count(DISTINCT {q}) = 1 THEN any_value({q}) END AS {q}")
        else:  # per-request ids have no meaning in a rollup
            select.append(f"CAST(NULL AS {_sql_type(kind)}) AS {q}")
    return (f"SELECT {', '.join(select)} FROM read_parquet('{source_glob}', hive_partitioning = false) "
            f"GROUP BY {keys}, date_trunc('{trunc}', \"ChargePeriodStart\") "
            f"ORDER BY \"ChargePeriodStart\", \"SkuPriceId\", \"x_AttributionKey\"")


def _sql_type(kind: str) -> str:
    return {"money": f"DECIMAL(38, {MONEY_SCALE})", "quantity": f"DECIMAL(38, {QUANTITY_SCALE})",
            "int": "BIGINT", "string": "VARCHAR", "json": "VARCHAR", "datetime": "TIMESTAMPTZ",
            "bool": "BOOLEAN"}[kind]


def write_rollup(data_dir: Path, grain: str, period: str, day: str) -> Path:
    """(Re)build the rollup file of one charge date from its request files, replacing it atomically."""
    source = partition_dir(focus_dir(data_dir), period, day)
    target = partition_dir(focus_dir(data_dir, grain), period, day) / "rollup.parquet"
    first = next(source.glob("part-*.parquet"), None)
    metadata = pq.read_schema(first).metadata if first is not None else None
    version = (metadata or {}).get(b"FocusVersion", FOCUS_VERSION.encode()).decode()
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        table = con.execute(rollup_sql(grain, str(source / "part-*.parquet"), version)).to_arrow_table()
    if table is None:
        raise RuntimeError(f"rollup of {source} returned no table")
    x_row_id = table.schema.get_field_index("x_RowId")
    # a stable id per rollup row: grain, period start, SKU price, attribution and model version
    ids = pa.array([f"{grain}:{s:%Y-%m-%dT%H}:{p}:{k}" + (f":{m}" if m else "") for s, k, p, m in zip(
        table.column("ChargePeriodStart").to_pylist(), table.column("x_AttributionKey").to_pylist(),
        table.column("SkuPriceId").to_pylist(), table.column("x_Model").to_pylist(), strict=True)],
        type=pa.string())
    table = table.set_column(x_row_id, "x_RowId", ids).cast(ARROW_SCHEMAS[version])
    write_atomically(table, target)
    return target
