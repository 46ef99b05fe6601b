"""FOCUS Parquet files: their layout under the data dir, atomic writes, row-id ledger and rollups.

Layout (Hive-style, so DuckDB, Spark and FinOps tools read it with partition pruning):

    <data>/focus/request/billing_period=2026-11/charge_date=2026-11-22/part-<time>-<id>.parquet
    <data>/focus/hour/...   and   <data>/focus/day/...   (rollups, one file per charge date)

A file is written to a hidden temporary name, fsynced, then renamed into place: a reader sees a
whole file or none. Request-level files are always written (they are what rollups are built from).
Rows waiting to be written are held as packed Arrow tables (`parse_rows`), not Python objects.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.pricing.dedupe import HashedIds, id_hash
from schemas.focus import ADDED_COLUMNS, COLUMNS_BY_VERSION, FOCUS_VERSION, MONEY_SCALE, row_version
from schemas.swap_lock import SWAP_LOCK

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


_PARSE_TYPES: Final[Mapping[str, str]] = {
    "money": f"DECIMAL(38, {MONEY_SCALE})", "quantity": f"DECIMAL(38, {QUANTITY_SCALE})", "int": "BIGINT",
    "string": "VARCHAR", "json": "JSON", "datetime": "VARCHAR", "bool": "BOOLEAN"}
#: FOCUS version -> every column, typed as the files hold it (json_transform_strict: a missing column or a value
#: that does not convert exactly is an error, never a null)
_ROW_STRUCTURES: Final[Mapping[str, str]] = {
    version: orjson.dumps({name: _PARSE_TYPES[kind] for name, kind in columns}).decode()
    for version, columns in COLUMNS_BY_VERSION.items()}
#: ... but the columns added since rows were first published, which an older worker's rows lack
_OLDER_ROW_STRUCTURES: Final[Mapping[str, str]] = {
    version: orjson.dumps({name: _PARSE_TYPES[kind] for name, kind in columns if name not in ADDED_COLUMNS}).decode()
    for version, columns in COLUMNS_BY_VERSION.items()}
#: ... which are read on their own for such rows: null when absent (a wrong value still fails, when cast)
_ADDED_SELECT: Final = "".join(f", json_extract_string(v, '$.{name}') AS \"{name}\"" for name in sorted(ADDED_COLUMNS))
#: FOCUS version -> how its added columns' keys look in a value (orjson writes no space before the colon)
_ADDED_KEYS: Final[Mapping[str, tuple[bytes, ...]]] = {
    version: tuple(f'"{name}":'.encode() for name, _ in columns if name in ADDED_COLUMNS)
    for version, columns in COLUMNS_BY_VERSION.items()}
_PARSERS: Final = threading.local()  # a DuckDB connection per thread (`_connection`)
_PER_REQUEST: Final = frozenset({"x_RowId", "x_UsageId", "x_TraceId", "x_SpanId"})
#: columns whose values repeat from row to row, dictionary-encoded while rows wait to be written: every text,
#: JSON and time column but the per-request ids, and the unit prices
PACKED_COLUMNS: Final = frozenset(
    name for name, kind in _KINDS.items()
    if name not in _PER_REQUEST and (kind in ("string", "json", "datetime") or "UnitPrice" in name))


def parse_rows(values: Sequence[bytes], version: str = FOCUS_VERSION) -> pa.Table:
    """`genai.cost.focus` values (JSON objects) of one FOCUS version -> one packed table, parsed in bulk by DuckDB
    (in C++, without the GIL): about 620 bytes a FOCUS 1.4 row, where it takes about 7.6 KB as a Python dict. Repeating
    columns are dictionary-encoded (`PACKED_COLUMNS`); `unpack` gives the file schema back (the version is in the
    table's metadata). Raises duckdb.Error or pyarrow.ArrowInvalid when a value lacks a column of `version` or one
    does not convert exactly (money with more than 18 decimals, a malformed time, text that is not UTF-8).
    """
    source = pa.table({"v": pa.array(values, pa.binary()).cast(pa.string())})
    con = _connection()
    con.register("source", source)
    try:
        parsed = _parse_source(con, version, all(key in value for value in values for key in _ADDED_KEYS[version]))
    finally:
        con.unregister("source")
    arrays = []
    for name, kind in COLUMNS_BY_VERSION[version]:
        column = parsed.column(name)
        if kind == "datetime":
            column = pc.strptime(column, format="%Y-%m-%dT%H:%M:%SZ", unit="s")
        column = column.cast(_ARROW_TYPES[kind])
        arrays.append(pc.dictionary_encode(column) if name in PACKED_COLUMNS else _copied(column))
    return pa.Table.from_arrays(arrays, names=[name for name, _ in COLUMNS_BY_VERSION[version]],
                                metadata={"FocusVersion": version}).combine_chunks()


def _parse_source(con: duckdb.DuckDBPyConnection, version: str, complete: bool) -> pa.Table:
    """The values of the registered table `source`, one column each. `complete`, every value has the columns added
    since rows were first published: one strict JSON parse a value. Else, or when a value only seemed to have them
    (the key was in a nested object), the added columns are read apart: a second parse a value, which held ~45 MiB
    more of DuckDB's memory a parsing thread (test_exporter_memory), so only for batches with an older worker's rows.
    """
    if complete:
        try:
            return con.sql(f"SELECT unnest(json_transform_strict(v, '{_ROW_STRUCTURES[version]}')) FROM source"
                           ).to_arrow_table()
        except duckdb.Error:
            pass
    return con.sql(f"SELECT unnest(json_transform_strict(v, '{_OLDER_ROW_STRUCTURES[version]}')){_ADDED_SELECT} "
                   "FROM source").to_arrow_table()


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's DuckDB connection for parsing, kept: connecting costs ~75 ms, more than parsing a 5 s flush's
    rows (a flush parses once a partition)."""
    connection: duckdb.DuckDBPyConnection | None = getattr(_PARSERS, "connection", None)
    if connection is None:
        connection = _PARSERS.connection = duckdb.connect(config={"threads": 1})
    return connection


def table_version(table: pa.Table) -> str:
    """The FOCUS version of a packed table (`parse_rows`) or of a file's table."""
    return schema_version(table.schema)


def schema_version(schema: pa.Schema) -> str:
    """The FOCUS version a table or file schema says it holds (FocusVersion metadata; the default without)."""
    return ((schema.metadata or {}).get(b"FocusVersion") or FOCUS_VERSION.encode()).decode()


def _copied(column: pa.ChunkedArray) -> pa.Array:
    """`column` in memory of its own. A column DuckDB returned keeps DuckDB's whole result (every column, as
    parsed) alive: holding only the id columns as returned costs about 3x the packed row."""
    return pa.concat_arrays([*column.chunks, pa.array([], column.type)])  # concatenating always copies


def parse_rows_skipping(values: Sequence[bytes]) -> tuple[list[pa.Table], list[str]]:
    """`parse_rows` of values of any FOCUS version, leaving out the values it cannot parse: a table per version
    (none when no value is left) and why each value left out was. Values are grouped by `row_version`'s guess; a
    value that fails is found by halving (one bad value among many costs a few parses) and tried as the other
    version before it is left out (the guess is wrong for a 1.4 row with a tag named ProviderName)."""
    by_version: dict[str, list[bytes]] = {}
    for value in values:
        by_version.setdefault(row_version(value), []).append(value)
    tables: list[pa.Table] = []
    errors: list[str] = []
    for version, group in by_version.items():
        _parse_halving(group, version, tables, errors)
    return tables, errors


def _parse_halving(values: Sequence[bytes], version: str, tables: list[pa.Table], errors: list[str]) -> None:
    try:
        tables.append(parse_rows(values, version))
        return
    except (duckdb.Error, pa.ArrowException) as exc:
        if len(values) == 1:
            other = next(v for v in COLUMNS_BY_VERSION if v != version)
            try:
                tables.append(parse_rows(values, other))
            except (duckdb.Error, pa.ArrowException):
                errors.append(str(exc)[:300])
            return
    half = len(values) // 2
    _parse_halving(values[:half], version, tables, errors)
    _parse_halving(values[half:], version, tables, errors)


def unpack(table: pa.Table) -> pa.Table:
    """A packed table (`parse_rows`) with the file schema of its FOCUS version."""
    schema = ARROW_SCHEMAS[table_version(table)]
    return pa.Table.from_arrays([column.cast(schema.field(name).type) if name in PACKED_COLUMNS else column
                                 for name, column in zip(table.column_names, table.columns, strict=True)],
                                schema=schema)


def partition_keys(table: pa.Table) -> pa.Array:
    """Each row's "<billing period>/<charge date>" ("2026-11/2026-11-22"), from its UTC timestamps."""
    utc = ARROW_SCHEMA.field("ChargePeriodStart").type
    period = pc.strftime(table.column("BillingPeriodStart").cast(utc), format="%Y-%m")
    day = pc.strftime(table.column("ChargePeriodStart").cast(utc), format="%Y-%m-%d")
    return pc.binary_join_element_wise(period, day, "/").combine_chunks()


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A hidden temporary path next to `target` to write; when the block ends, the file (if written) is fsynced
    and renamed to `target`, and the rename fsynced, so that no reader ever sees a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not tmp.exists():
        return
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)  # the rename itself survives a crash


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(table: pa.Table, target: Path) -> None:
    """Write `table` to `target` so that no reader ever sees a partial file."""
    with replacing(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_tables(root: Path, period: str, day: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    """Write the rows of `tables` (file schema `schema`), streamed one table at a time, as one new file of a charge
    date; no file when they hold no row. Returns the rows written."""
    target = partition_dir(root, period, day) / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    rows = 0
    with replacing(target) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for table in tables:
                if table.num_rows:
                    writer = writer or pq.ParquetWriter(tmp, schema, compression="zstd")
                    writer.write_table(table)
                    rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    return rows


def write_partition(root: Path, period: str, day: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Decoded rows of one FOCUS version (`rows_table`) as one new file of a charge date: for tools and tests that
    have rows rather than messages. Returns the rows written."""
    table = rows_table(rows)
    return write_tables(root, period, day, [table], table.schema)


@dataclass(slots=True)
class Written:
    """What one flush did: rows written, rows dropped as already in the files, and the charge dates written to."""

    rows: int = 0
    duplicates: int = 0
    files: int = 0
    days: list[tuple[str, str]] = field(default_factory=list)


def write_rows(root: Path, tables: Sequence[pa.Table], ledger: RowLedger) -> Written:
    """Packed rows (`parse_rows`) -> one new request file per billing period x charge date x FOCUS version, without
    the rows the ledger says are already in the files. Streams table by table: memory beyond `tables` is one table
    unpacked. If a file cannot be written, the ledger forgets its day and the error is raised."""
    keyed = [(table, table_version(table), partition_keys(table)) for table in tables if table.num_rows]
    result = Written()
    for key, version in sorted({(k, v) for _, v, keys in keyed for k in keys.unique().to_pylist()}):
        period, day = key.split("/")

        def fresh_tables(period: str = period, day: str = day, key: str = key,
                         version: str = version) -> Iterator[pa.Table]:
            for table, table_v, keys in keyed:
                if table_v != version:
                    continue
                mask = pc.equal(keys, key)
                part = table if pc.all(mask).as_py() else table.filter(mask)
                if not part.num_rows:
                    continue
                keep = ledger.fresh(period, day, part.column("x_RowId").combine_chunks())
                kept = pc.sum(keep).as_py() or 0
                result.duplicates += part.num_rows - kept
                yield unpack(part if kept == part.num_rows else part.filter(keep))

        try:
            written = write_tables(root, period, day, fresh_tables(), ARROW_SCHEMAS[version])
        except BaseException:
            ledger.forget(period, day)
            raise
        ledger.written(period, day)
        if written:
            result.rows += written
            result.files += 1
            if (period, day) not in result.days:
                result.days.append((period, day))
    return result


@contextmanager
def writer_lock(data_dir: Path) -> Iterator[None]:
    """Held while writing or compacting request files (the exporter's jobs, `spendstream compact`), so a
    compaction never swaps away a file another process is adding. Readers take no lock."""
    path = data_dir / "focus" / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    (data_dir / SWAP_LOCK).touch()  # before the first file, so that readers find it (schemas/swap_lock.py)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class RowLedger:
    """Which row ids are already in the files, per charge date, loaded from the files on demand.

    Redelivered rows (the exporter or a worker restarted before committing, a partition that moved)
    carry the same x_RowId and are dropped here. A day's ids are held as 64-bit hashes, 8-16 bytes an
    id (`HashedIds`, shared with the pricing stage's usage dedupe) where a set of the id strings took
    about 147; a hash that matches is confirmed against the day's files and the ids of the write in
    progress, so two ids that share a hash are both written. Only the last few days touched are
    kept in memory; an older day is read back from its files when a late row for it arrives.
    Compaction keeps the rows of a day, so a day's ids are the same before and after it. Not
    thread-safe: one writer at a time, holding `writer_lock`.
    """

    def __init__(self, root: Path, max_days: int = LEDGER_DAYS) -> None:
        self._root = root
        self._max_days = max_days
        self._days: OrderedDict[tuple[str, str], HashedIds] = OrderedDict()
        #: per day: the ids `fresh` gave out since the day's last `written`, not in its files yet
        self._pending: dict[tuple[str, str], list[pa.Array]] = {}

    def _files(self, period: str, day: str) -> list[Path]:
        return sorted(partition_dir(self._root, period, day).glob("part-*.parquet"))

    def _ids(self, period: str, day: str) -> HashedIds:
        key = (period, day)
        if key not in self._days:
            self._days[key] = HashedIds(id_hash(row_id) for path in self._files(period, day)
                                        for row_id in pq.read_table(path, columns=["x_RowId"]).column(0).to_pylist())
            while len(self._days) > self._max_days:
                self._days.popitem(last=False)
        self._days.move_to_end(key)
        return self._days[key]

    def fresh(self, period: str, day: str, row_ids: pa.Array) -> pa.Array:
        """For each id (a string array), whether it is not in the files yet (a repeat within `row_ids` is not); records
        the fresh ones as being written, until `written` or `forget`."""
        ids = self._ids(period, day)
        strings = row_ids.to_pylist()
        out = [ids.add(id_hash(row_id)) for row_id in strings]
        matched = {strings[i] for i, new in enumerate(out) if not new}
        if matched:  # a redelivery, or rarely another id with the same hash: which, exactly
            known = self._known(period, day, matched)
            for i, row_id in enumerate(strings):
                if row_id in matched and row_id not in known:  # the first of it: new
                    out[i] = True
                    known.add(row_id)
        ids.seal_if_due()
        keep = pa.array(out, pa.bool_())
        self._pending.setdefault((period, day), []).append(row_ids.filter(keep))
        return keep

    def _known(self, period: str, day: str, row_ids: set[str]) -> set[str]:
        """Which of `row_ids` the day's files hold or `fresh` gave out since the last `written`."""
        wanted = pa.array(row_ids, pa.string())
        columns = [pq.read_table(path, columns=["x_RowId"]).column(0) for path in self._files(period, day)]
        found: set[str] = set()
        for column in [*columns, *self._pending.get((period, day), [])]:
            found.update(column.filter(pc.is_in(column, value_set=wanted)).to_pylist())
        return found

    def written(self, period: str, day: str) -> None:
        """The ids `fresh` gave out for a day are in its files now."""
        self._pending.pop((period, day), None)

    def forget(self, period: str, day: str) -> None:
        """Undo `fresh` for a day whose file was not written: its ids are read back from its files when next
        needed."""
        self._days.pop((period, day), None)
        self._pending.pop((period, day), None)


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
    # union_by_name: a day may hold files written before a column was added (x_SampleAdjustedCount)
    return (f"SELECT {', '.join(select)} FROM read_parquet('{source_glob}', hive_partitioning = false, "
            "union_by_name = true) "
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
