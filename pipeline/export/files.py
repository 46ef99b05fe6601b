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
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.pricing.dedupe import HashedIds, id_hash
from schemas.errors import SchemaError
from schemas.focus import (
    COLUMNS_BY_VERSION,
    CONSTANTS,
    CURRENCY_COLUMNS,
    FOCUS_VERSION,
    MONEY_SCALE,
    NULL_NUMBERS,
    REQUIRED_TEXT,
    decode_row,
    row_version,
)
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


#: how Arrow's JSON reader reads each kind: strictly typed (a number where text belongs, "5" for an integer or "yes"
#: for a boolean is an error); money, quantities and times as text, checked against their patterns before a cast
_READ_TYPES: Final[Mapping[str, pa.DataType]] = {
    "money": pa.string(), "quantity": pa.string(), "int": pa.int64(), "string": pa.string(),
    "datetime": pa.string(), "bool": pa.bool_()}
#: FOCUS version -> the columns Arrow reads (the JSON object columns are read by DuckDB: Arrow cannot keep an
#: object of any keys as text)
_READ_SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    version: pa.schema([pa.field(name, _READ_TYPES[kind]) for name, kind in columns if kind != "json"])
    for version, columns in COLUMNS_BY_VERSION.items()}
_JSON_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    version: tuple(name for name, kind in columns if kind == "json") for version, columns in COLUMNS_BY_VERSION.items()}
#: the checks of schemas.focus's decoder that typed reading leaves (patterns, constants, non-empty text)
_PATTERNS: Final[Mapping[str, str]] = {
    "money": r"^-?[0-9]{1,20}(\.[0-9]{1,18})?$", "quantity": r"^-?[0-9]{1,32}(\.[0-9]{1,6})?$",
    "datetime": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"}
#: the JSON types a Tags-like object's values may have without a closer look (a positive or huge integer or a float
#: is checked by the decoder: an integer must fit 64 bits)
_PLAIN_JSON_VALUES: Final = "['VARCHAR', 'BOOLEAN', 'NULL', 'BIGINT']"
#: a FOCUS row has about 10 objects; more brackets than this are left to the decoder (which limits nesting)
MAX_BRACKETS: Final = 64
_PER_REQUEST: Final = frozenset({"x_RowId", "x_UsageId", "x_TraceId", "x_SpanId"})
#: columns whose values repeat from row to row, dictionary-encoded while rows wait to be written: every text,
#: JSON and time column but the per-request ids, and the unit prices
PACKED_COLUMNS: Final = frozenset(
    name for name, kind in _KINDS.items()
    if name not in _PER_REQUEST and (kind in ("string", "json", "datetime") or "UnitPrice" in name))
_DUCKDB: Final = threading.local()  # a connection per thread: connecting costs ~75 ms, more than most parses


def parse_rows(values: Sequence[bytes], version: str = FOCUS_VERSION) -> pa.Table:
    """`genai.cost.focus` values (JSON objects) of one FOCUS version -> one packed table, checked as
    schemas.focus.decode_row checks a value. Raises SchemaError for the first value it refuses (`parse_rows_skipping`
    leaves such values out instead)."""
    tables, errors = parse_rows_skipping(values, version)
    if errors:
        raise errors[0][1]
    return _concat_packed(tables, version)


def _parse_bulk(values: Sequence[bytes], version: str) -> tuple[pa.Table, list[int]]:
    """Values of one FOCUS version -> (a packed table of those that pass every check, the indices of the others),
    parsed in bulk in C++ (Arrow's JSON reader and DuckDB, without the GIL), never a Python object a row: about 620
    bytes a FOCUS 1.4 row, where it takes about 7.6 KB as a Python dict. Repeating columns are dictionary-encoded
    (`PACKED_COLUMNS`); `unpack` gives the file schema back (the version is in the table's metadata). A value left
    out may still be valid (the checks here are sufficient, not necessary: an integer tag is left to the decoder).
    Raises pyarrow.ArrowInvalid or duckdb.Error when a value is not a JSON object on one line, lacks an object column,
    or has a value of the wrong JSON type."""
    data = b"\n".join(values)
    if data.count(b"\n") != len(values) - 1 or not all(values):
        raise pa.ArrowInvalid("a value is empty or spans lines")
    try:  # the usual batch: no field but the FOCUS columns
        read = _read_json(data, version, unexpected="error")
        unknown_fields = False
    except pa.ArrowInvalid:  # a field of a newer version, or a value that does not read at all
        read = _read_json(data, version, unexpected="ignore")
        unknown_fields = True
    if read.num_rows != len(values):
        raise pa.ArrowInvalid(f"{len(values)} values read as {read.num_rows} rows")
    text = pa.array(values, pa.binary()).cast(pa.string())  # raises for text that is not UTF-8
    objects, ok = _json_columns(text, version)
    if unknown_fields:  # what the readers take in a field they skip and the decoder does not: NaN or Infinity, nesting
        # deeper than a row's; left to the decoder (a string holding "NaN" is kept by it). A scan of every byte: only
        # for batches with such fields
        brackets = pc.add(pc.count_substring(text, "{"), pc.count_substring(text, "["))
        ok = pc.and_kleene(ok, pc.and_(pc.invert(pc.match_substring_regex(text, "NaN|Infinity")),
                                       pc.less_equal(brackets, MAX_BRACKETS)))
    arrays: dict[str, pa.Array] = {}
    for name, kind in COLUMNS_BY_VERSION[version]:
        if kind == "json":
            continue
        column = read.column(name).combine_chunks()
        ok = pc.and_kleene(ok, _valid(name, kind, column))
        arrays[name] = column
    ok = pc.fill_null(ok, False)
    suspects = pc.indices_nonzero(pc.invert(ok)).to_pylist()
    columns = []
    for name, kind in COLUMNS_BY_VERSION[version]:
        column = objects[name] if kind == "json" else arrays[name]
        column = column.filter(ok)
        if kind == "datetime":
            column = pc.strptime(column, format="%Y-%m-%dT%H:%M:%SZ", unit="s")
        columns.append(column.cast(_ARROW_TYPES[kind]))  # exact: text -> decimal raises rather than rounds
    return _packed(columns, version), suspects


def _read_json(data: bytes, version: str, unexpected: str) -> pa.Table:
    """Newline-delimited values -> the columns of `version` Arrow reads, strictly typed; `unexpected`: what a field
    of no such column does ("error" or "ignore")."""
    return pa_json.read_json(
        BytesIO(data), read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
        parse_options=pa_json.ParseOptions(explicit_schema=_READ_SCHEMAS[version],
                                           unexpected_field_behavior=unexpected))


def _valid(name: str, kind: str, column: pa.Array) -> pa.Array:
    """Per row: whether `column`'s value passes the decoder's checks that typed reading leaves (null: it does not)."""
    if name in CONSTANTS:
        return pc.equal(column, pa.scalar(CONSTANTS[name], column.type))
    if name in CURRENCY_COLUMNS:
        return pc.match_substring_regex(column, "^[A-Z]{3}$")
    if kind in _PATTERNS:
        valid = pc.match_substring_regex(column, _PATTERNS[kind])
        if kind == "datetime":  # a real date and time too
            valid = pc.and_kleene(valid, pc.is_valid(pc.strptime(column, format="%Y-%m-%dT%H:%M:%SZ", unit="s",
                                                                 error_is_null=True)))
    elif kind == "string":
        valid = pc.greater(pc.utf8_length(column), 0)
    else:
        valid = pc.is_valid(column)
    return valid if name in REQUIRED_TEXT or (kind != "string" and name not in NULL_NUMBERS) else \
        pc.or_kleene(pc.is_null(column), valid)


def _json_columns(text: pa.Array, version: str) -> tuple[dict[str, pa.Array], pa.Array]:
    """The JSON object columns of the values `text` as text (DuckDB), and per row whether each is null or an object
    of plain values. Raises duckdb.Error when a value lacks one."""
    names = _JSON_COLUMNS[version]
    structure = orjson.dumps(dict.fromkeys(names, "JSON")).decode()
    checks = " AND ".join(f'(r."{n}" IS NULL OR (json_type(r."{n}") = \'OBJECT\' AND '
                          f'list_has_all({_PLAIN_JSON_VALUES}, json_type(r."{n}", \'$.*\'))))' for n in names)
    connection = getattr(_DUCKDB, "connection", None)
    if connection is None:
        connection = _DUCKDB.connection = duckdb.connect(config={"threads": 1})
    source = pa.table({"v": text})
    parsed = connection.sql(f"SELECT r.*, {checks} AS ok FROM (SELECT json_transform_strict(v, '{structure}') AS r "
                            "FROM source)").to_arrow_table()
    del source
    return {n: _copied(parsed.column(n)).cast(pa.string()) for n in names}, _copied(parsed.column("ok"))


def _packed(columns: Sequence[pa.Array], version: str) -> pa.Table:
    names = [name for name, _ in COLUMNS_BY_VERSION[version]]
    return pa.Table.from_arrays(
        [pc.dictionary_encode(column) if name in PACKED_COLUMNS else column for name, column in zip(
            names, columns, strict=True)], names=names, metadata={"FocusVersion": version}).combine_chunks()


def _concat_packed(tables: Sequence[pa.Table], version: str) -> pa.Table:
    """One packed table of packed tables of one version (their dictionaries unified)."""
    if not tables:
        return _packed([pa.array([], type=_ARROW_TYPES[kind]) for _, kind in COLUMNS_BY_VERSION[version]], version)
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries().combine_chunks()


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


def parse_rows_skipping(values: Sequence[bytes], version: str | None = None,
                        ) -> tuple[list[pa.Table], list[tuple[int, SchemaError]]]:
    """Values of any FOCUS version (or all of `version`) -> packed tables (one or more a version, none when no value
    is left) and, for each value left out, its index and why (schemas.focus.decode_row's SchemaError). Values are
    grouped by `row_version`'s guess and parsed in bulk; a value the bulk checks leave out, or that fails a bulk parse
    (found by halving: one bad value among many costs a few parses), is decoded alone: refused, or built from its
    decoded row (as the version the decoder found: the guess is wrong for a 1.4 row with a tag named
    ProviderName)."""
    by_version: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        by_version.setdefault(version or row_version(value), []).append(index)
    tables: list[pa.Table] = []
    errors: list[tuple[int, SchemaError]] = []
    for group_version, indices in by_version.items():
        _parse_halving(values, indices, group_version, tables, errors)
    return tables, errors


def _parse_halving(values: Sequence[bytes], indices: Sequence[int], version: str, tables: list[pa.Table],
                   errors: list[tuple[int, SchemaError]]) -> None:
    try:
        table, suspects = _parse_bulk([values[i] for i in indices], version)
    except (duckdb.Error, pa.ArrowException):
        if len(indices) == 1:
            _decode_alone(values, indices[0], tables, errors)
            return
        half = len(indices) // 2
        _parse_halving(values, indices[:half], version, tables, errors)
        _parse_halving(values, indices[half:], version, tables, errors)
        return
    if table.num_rows:
        tables.append(table)
    for suspect in suspects:
        _decode_alone(values, indices[suspect], tables, errors)


def _decode_alone(values: Sequence[bytes], index: int, tables: list[pa.Table],
                  errors: list[tuple[int, SchemaError]]) -> None:
    """One value the bulk path refused or left out, decided by the decoder."""
    try:
        row = decode_row(values[index])
        table = rows_table([row])
    except SchemaError as exc:
        errors.append((index, exc))
        return
    except (pa.ArrowException, ValueError) as exc:  # the decoder and the files disagree: a bug, but not a stop
        errors.append((index, SchemaError(f"FOCUS row: accepted by the decoder, refused by the files: {exc}")))
        return
    tables.append(_packed(table.columns, table_version(table)))


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
    carry the same x_RowId and are dropped here. A day's ids are held as 64-bit hashes, about 8 bytes
    an id (`HashedIds`, shared with the pricing stage's usage dedupe) where a set of the id strings
    took about 145; a hash that matches is confirmed against the day's files and the ids before it in
    the same call, so two ids that share a hash are both written. Only the last few days touched are
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
