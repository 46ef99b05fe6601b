"""FOCUS Parquet files: their layout under the data dir, atomic writes, row-id ledger and rollups.

Layout (Hive-style, so DuckDB, Spark and FinOps tools read it with partition pruning):

    <data>/focus/request/billing_period=2026-11/charge_date=2026-11-22/part-<time>-<id>.parquet
    <data>/focus/hour/...   and   <data>/focus/day/...   (rollups, one file per charge date)

A file is written to a hidden temporary name, fsynced, then renamed into place: a reader sees a
whole file or none. Request-level files are always written (they are what rollups are built from).
Rows waiting to be written are held as packed Arrow tables (`pack_values`), not Python objects.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import operator
import os
import time
import uuid
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import duckdb
import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from msgspec.structs import astuple

from pipeline.pricing.dedupe import id_hash
from schemas.errors import SchemaError
from schemas.focus import (
    COLUMNS_BY_VERSION,
    CORRECTION_NULLS,
    CURRENCY_COLUMNS,
    CURRENCY_PATTERN,
    FOCUS_VERSION,
    FOCUS_VERSIONS,
    JSON_VALUES,
    MONEY_SCALE,
    PATTERNS,
    ROW_STRUCTS,
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
#: the rows a request file's row group holds at least (`_regrouped`), but the last: what a DuckDB parse of raw
#: values held, before the exporter packed rows in smaller batches (its PACK_ROWS)
ROW_GROUP_ROWS: Final = 8_192


def focus_dir(data_dir: Path, grain: str = "request") -> Path:
    return data_dir / "focus" / grain


def partition_of(row: Mapping[str, Any]) -> tuple[str, str]:
    """(billing period, charge date) of a row, from its UTC timestamps."""
    return row["BillingPeriodStart"][:7], row["ChargePeriodStart"][:10]


def partition_dir(root: Path, period: str, day: str) -> Path:
    return root / f"billing_period={period}" / f"charge_date={day}"


_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
#: the kinds whose values are text to check (PATTERNS) and convert (`_from_text`)
_TEXT_KINDS: Final = frozenset(PATTERNS)
#: PATTERNS as RE2 checks them in bulk (its end of text is `\z`, Python's `\Z`), a time's hours, minutes and seconds
#: in range too (its date apart: `_wrong_dates`), as `decode_row`'s datetime.fromisoformat wants them
_BULK_PATTERNS: Final[Mapping[str, str]] = {
    **{kind: pattern.replace(r"\Z", r"\z") for kind, pattern in PATTERNS.items()},
    "datetime": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z\z"}
_BULK_CURRENCY: Final = CURRENCY_PATTERN.replace(r"\Z", r"\z")
_PER_REQUEST: Final = frozenset({"x_RowId", "x_UsageId", "x_TraceId", "x_SpanId"})
#: columns whose values repeat from row to row, dictionary-encoded while rows wait to be written: every text,
#: JSON and time column but the per-request ids, and the unit prices
PACKED_COLUMNS: Final = frozenset(
    name for name, kind in _KINDS.items()
    if name not in _PER_REQUEST and (kind in ("string", "json", "datetime") or "UnitPrice" in name))


def _array(kind: str, values: Sequence[Any]) -> pa.Array:
    """A column of the files from its values as decoded: text for money, quantities and times (parsed by Arrow,
    in C++), a mapping for JSON."""
    array = _plain_array(kind, values)
    return _from_text(kind, array) if kind in _TEXT_KINDS else array


def _plain_array(kind: str, values: Sequence[Any]) -> pa.Array:
    """`_array`, but money, quantities and times are left as text."""
    if kind in _TEXT_KINDS:
        return pa.array(values, pa.string())
    if kind == "json":
        return pa.array([None if v is None else orjson.dumps(v) for v in values], pa.string())
    return pa.array(values, type=_ARROW_TYPES[kind])


def _from_text(kind: str, text: pa.Array) -> pa.Array:
    if kind == "datetime":
        return pc.strptime(text, format=_TIME_FORMAT, unit="s").cast(_ARROW_TYPES[kind])
    return text.cast(_ARROW_TYPES[kind])  # exact: a string -> decimal cast raises rather than rounds


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """FOCUS rows (as on Kafka, all of one FOCUS version) -> an Arrow table with that version's column types, in
    column order. Money and quantities may also be Decimals."""
    version = row_version(rows[0]) if rows else FOCUS_VERSION
    return pa.Table.from_arrays(
        [_array(kind, [_text(row.get(name)) for row in rows]) for name, kind in COLUMNS_BY_VERSION[version]],
        schema=ARROW_SCHEMAS[version])


def _text(value: Any) -> Any:
    return format(value, "f") if isinstance(value, Decimal) else value


@dataclass(frozen=True, slots=True)
class Packed:
    """A packed table (`pack_values`), and the index among the values packed of each of its rows, ascending."""

    table: pa.Table
    indexes: Sequence[int]

    def between(self, start: int, end: int) -> pa.Table:
        """Its rows of the values from `start` to `end` (excluded): a slice, sharing the table's memory."""
        first = bisect_left(self.indexes, start)
        return self.table.slice(first, bisect_left(self.indexes, end) - first)


def pack_values(values: Sequence[bytes]) -> tuple[list[Packed], list[tuple[int, str]]]:
    """`genai.cost.focus` values (JSON objects) of any FOCUS version -> packed tables, one a version (none when no
    value is left), and the values left out: (index in `values`, why), in order.

    A value is kept if and only if it is a FOCUS row the files can hold: what `decode_row` accepts, but for one
    case: an object repeating a money, quantity, time, currency or JSON column's key, with an invalid first value
    and a valid last one, is kept with the last (decode_row checks each; only a hostile producer writes such keys).
    Each is decoded once, into a `ROW_STRUCTS` struct (its types checked by msgspec as it decodes); the patterns of
    money, quantities and times, real dates and the correction nulls are then checked column by column (RE2, in
    C++), and a value refused says what `decode_row` says of it. A packed table takes about 620 bytes a FOCUS 1.4
    row, where a decoded row takes about 7.6 KB: repeating columns are dictionary-encoded (`PACKED_COLUMNS`);
    `unpack` gives the file schema back (the version is in the table's metadata)."""
    with _collector_paused():
        return _pack(values)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off: a batch's decoded rows are thousands of new tuples that live until
    packed, which it would scan again and again (a third of the packing's time), and hold no cycles."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


#: values decoded and turned into Arrow columns this many at a time, so that their decoded objects (~5 KB a value,
#: scattered over the heap) are still in the CPU's caches when converted and freed: 2,048 at once took ~40 % longer
DECODE_ROWS: Final = 256
#: the Arrow type of a struct field's values as converted (`_Columns`): money, quantities and times as text, to be
#: checked and converted by Arrow (`_packed`); JSON apart (`_Columns._json_array`)
_DECODED_TYPES: Final[Mapping[str, pa.DataType]] = {**_ARROW_TYPES, **{kind: pa.string() for kind in PATTERNS}}


#: a JSON null as a struct holds it (a JSON column's type is msgspec.Raw, which takes no None)
_NULL_JSON: Final = msgspec.Raw(b"null")


class _Columns:
    """The Arrow columns of the values of one FOCUS version a pack decoded (`ROW_STRUCTS`), converted DECODE_ROWS
    values at a time, the values' indexes in the pack, and which of them hold a JSON value `JSON_VALUES` refuses."""

    def __init__(self, version: str) -> None:
        columns = COLUMNS_BY_VERSION[version]
        self._names = [name for name, _ in columns]
        #: a struct's fields but the JSON ones, as a tuple (its fields are the columns, in order), and their Arrow
        #: struct type: a chunk's are converted by one call into Arrow (a call a column took a fifth more)
        self._fields = operator.itemgetter(*[i for i, (_, kind) in enumerate(columns) if kind != "json"])
        self._type = pa.struct([(name, _DECODED_TYPES[kind]) for name, kind in columns if kind != "json"])
        self._structs: list[pa.StructArray] = []
        self._json_chunks: dict[str, list[pa.Array]] = {name: [] for name, kind in columns if kind == "json"}
        self.indexes: list[int] = []
        #: positions (among this version's values) of those with a JSON value JSON_VALUES refuses
        self.wrong_json: list[int] = []
        #: a JSON value as written -> as the files hold it (None: null, or refused: `_wrong`)
        self._json: dict[bytes, bytes | None] = {}
        self._wrong: set[bytes] = set()

    def add(self, indexes: Sequence[int], rows: Sequence[Any]) -> None:
        first = len(self.indexes)
        self.indexes += indexes
        self._structs.append(pa.array(list(map(self._fields, map(astuple, rows))), self._type))
        for name, chunks in self._json_chunks.items():
            chunks.append(self._json_array(list(map(operator.attrgetter(name), rows)), first))

    def _json_array(self, values: Sequence[msgspec.Raw], first: int) -> pa.Array:
        """A JSON column from its raw values, as `_plain_array` makes it from decoded ones. The values repeat (a
        team's tags, a price's details): each distinct one is decoded once a pack."""
        if values.count(_NULL_JSON) == len(values):  # most JSON columns are null on every row: no copy, no lookup
            return pa.nulls(len(values), pa.string())
        texts = list(map(bytes, values))
        for text in set(texts).difference(self._json):
            try:
                decoded = JSON_VALUES.decode(text)
            except (msgspec.DecodeError, RecursionError):
                decoded = None
                self._wrong.add(text)
            self._json[text] = None if decoded is None else orjson.dumps(decoded)
        if not self._wrong.isdisjoint(texts):
            self.wrong_json += [first + i for i, text in enumerate(texts) if text in self._wrong]
        return pa.array(list(map(self._json.__getitem__, texts)), pa.string())

    def arrays(self) -> list[pa.Array]:
        """The columns, in order."""
        flat = dict(zip(self._type.names, pa.concat_arrays(self._structs).flatten(), strict=True))
        return [flat[name] if name in flat else pa.concat_arrays(self._json_chunks[name]) for name in self._names]


#: FOCUS version -> the versions a value is decoded as, that one first
_TRIES: Final = {version: (version, *(v for v in FOCUS_VERSIONS if v != version)) for version in FOCUS_VERSIONS}


def _pack(values: Sequence[bytes]) -> tuple[list[Packed], list[tuple[int, str]]]:
    built: dict[str, _Columns] = {}
    refused: list[tuple[int, str]] = []
    #: each value is decoded as the version of the one before first (a topic's rows are nearly always of one
    #: version: `row_version`'s look through the whole value for a column name took a tenth of the packing's time);
    #: the first as `row_version` guesses, which is wrong for a 1.4 row with a tag named ProviderName
    guess = row_version(values[0]) if values else FOCUS_VERSION
    for start in range(0, len(values), DECODE_ROWS):
        chunk = values[start:start + DECODE_ROWS]
        try:  # nearly always: every value of the chunk a row of that version
            decoded = {guess: (list(range(start, start + len(chunk))), list(map(ROW_STRUCTS[guess].decode, chunk)))}
        except (msgspec.DecodeError, RecursionError):
            decoded, guess = _decoded_one_by_one(chunk, start, guess, refused)
        for version, (indexes, rows) in decoded.items():
            built.setdefault(version, _Columns(version)).add(indexes, rows)
    tables = []
    for version, columns in built.items():
        table, failed = _packed(columns, version)
        refused += [(columns.indexes[i], _refusal(values[columns.indexes[i]])) for i in failed]
        if table.num_rows:
            left_out = set(failed)
            tables.append(Packed(table, [index for i, index in enumerate(columns.indexes) if i not in left_out]))
    return tables, sorted(refused)


def _decoded_one_by_one(chunk: Sequence[bytes], start: int, guess: str, refused: list[tuple[int, str]],
                        ) -> tuple[dict[str, tuple[list[int], list[Any]]], str]:
    """The values of a chunk (the first at index `start`) decoded one by one, by version (each as the version of
    the one before first), and the version of the last; those no version decodes added to `refused`."""
    decoded: dict[str, tuple[list[int], list[Any]]] = {}
    for index, value in enumerate(chunk, start):
        for version in _TRIES[guess]:
            try:
                row = ROW_STRUCTS[version].decode(value)
            except (msgspec.DecodeError, RecursionError):
                continue
            indexes, rows = decoded.setdefault(version, ([], []))
            indexes.append(index)
            rows.append(row)
            guess = version
            break
        else:
            refused.append((index, _refusal(value)))
    return decoded, guess


def _packed(columns: _Columns, version: str) -> tuple[pa.Table, list[int]]:
    """The columns of decoded values of one FOCUS version -> a packed table of the values that pass the bulk checks,
    and the positions of those that do not. The repeating columns are dictionary-encoded first, so that a time or a
    unit price is checked and converted once a distinct value."""
    names = [name for name, _ in COLUMNS_BY_VERSION[version]]
    plain = {name: _encoded(array) if name in PACKED_COLUMNS else array
             for name, array in zip(names, columns.arrays(), strict=True)}
    failing = _failing(plain, version)  # a mask a failed check
    if columns.wrong_json:
        wrong = np.zeros(len(columns.indexes), np.bool_)
        wrong[columns.wrong_json] = True
        failing.append(pa.array(wrong))
    failed: list[int] = []
    if failing:
        ok = pc.invert(functools.reduce(pc.or_, failing))
        failed = [i for i, good in enumerate(ok.to_pylist()) if not good]
        # a dictionary still holds the refused values after a filter: encoded again, from the rows kept
        plain = {name: pc.dictionary_encode(array.filter(ok).dictionary_decode())
                 if isinstance(array, pa.DictionaryArray) and _KINDS[name] in _TEXT_KINDS else array.filter(ok)
                 for name, array in plain.items()}
    arrays = [_converted(kind, plain[name]) for name, kind in COLUMNS_BY_VERSION[version]]
    return pa.Table.from_arrays(arrays, names=names, metadata={"FocusVersion": version}), failed


def _encoded(array: pa.Array) -> pa.DictionaryArray:
    """A column dictionary-encoded; a column of nulls (a third of them, most of the time) without a hash table."""
    if array.null_count == len(array):
        return pa.nulls(len(array), pa.dictionary(pa.int32(), array.type))
    return pc.dictionary_encode(array)


def _converted(kind: str, array: pa.Array) -> pa.Array:
    """A column as packed: money, quantities and times converted from their text (a dictionary's values only)."""
    if kind not in _TEXT_KINDS:
        return array
    if isinstance(array, pa.DictionaryArray):
        return pa.DictionaryArray.from_arrays(array.indices, _from_text(kind, array.dictionary))
    return _from_text(kind, array)


def _failing(plain: Mapping[str, pa.Array], version: str) -> list[pa.Array]:
    """Which rows fail what `ROW_STRUCTS` leaves to bulk checks (`_BULK_PATTERNS`, currencies, real dates, and the
    quantities only a correction may leave null): a mask a failed check, none when every row passes (then one or
    two Arrow calls a checked column: a pack's fixed cost is its calls into Arrow). A dictionary-encoded column's
    values are checked once each."""
    failing = []
    quantities = [plain[name] for name in sorted(CORRECTION_NULLS)]
    if any(quantity.null_count for quantity in quantities):
        failing.append(pc.and_(pc.is_null(plain["ChargeClass"]),
                               functools.reduce(pc.or_, map(pc.is_null, quantities))))
    for name, kind in COLUMNS_BY_VERSION[version]:
        array = plain[name]
        pattern = _BULK_CURRENCY if name in CURRENCY_COLUMNS else _BULK_PATTERNS.get(kind)
        text = array.dictionary if isinstance(array, pa.DictionaryArray) else array
        if pattern is None or text.null_count == len(text):
            continue
        matched = pc.match_substring_regex(text, pattern)
        wrong = [pc.invert(pc.fill_null(matched, True))] if matched.false_count else []
        if kind == "datetime":
            wrong += _wrong_dates(text)
        if wrong and text is not array:
            wrong = [pc.fill_null(pc.take(mask, array.indices), False) for mask in wrong]
        failing += wrong
    return failing


def _wrong_dates(text: pa.Array) -> list[pa.Array]:
    """Which times have a date (checked to be "YYYY-MM-DD" digits) that is not a real one, as `_failing`: checked
    once a distinct date, since Arrow's strptime takes 2026-02-30 as March 2nd."""
    days = pc.utf8_slice_codeunits(text, 0, 10)
    wrong = [day for day in pc.unique(days).to_pylist() if day is not None and not _is_date(day)]
    return [pc.fill_null(pc.is_in(days, value_set=pa.array(wrong, pa.string())), False)] if wrong else []


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _refusal(value: bytes) -> str:
    """Why a value `pack_values` leaves out is not a FOCUS row the files can hold: what `decode_row` says. The bulk
    checks refuse what it refuses (tests/unit/test_export_files.py); should they ever drift apart, the value is
    still left out, never a pack's error."""
    try:
        decode_row(value)
    except SchemaError as exc:
        return str(exc)
    return "FOCUS row: a decimal or time the files cannot hold as written"


def table_version(table: pa.Table) -> str:
    """The FOCUS version of a packed table (`pack_values`) or of a file's table."""
    return schema_version(table.schema)


def schema_version(schema: pa.Schema) -> str:
    """The FOCUS version a table or file schema says it holds (FocusVersion metadata; the default without)."""
    return ((schema.metadata or {}).get(b"FocusVersion") or FOCUS_VERSION.encode()).decode()


def unpack(table: pa.Table) -> pa.Table:
    """A packed table (`pack_values`) with the file schema of its FOCUS version."""
    schema = ARROW_SCHEMAS[table_version(table)]
    return pa.Table.from_arrays([column.cast(schema.field(name).type) if name in PACKED_COLUMNS else column
                                 for name, column in zip(table.column_names, table.columns, strict=True)],
                                schema=schema)


def partition_keys(table: pa.Table) -> pa.Array:
    """Each row's "<billing period>/<charge date>" ("2026-11/2026-11-22"), from its UTC timestamps."""
    period = pc.utf8_slice_codeunits(_utc_dates(table.column("BillingPeriodStart")), 0, 7)
    return pc.binary_join_element_wise(period, _utc_dates(table.column("ChargePeriodStart")), "/").combine_chunks()


def _utc_dates(times: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each time's UTC date as text ("2026-11-22"), formatted once a distinct date (formatting each time took as
    long as writing the row)."""
    dates = pc.dictionary_encode(times.cast(ARROW_SCHEMA.field("ChargePeriodStart").type).cast(pa.date32()))
    return pa.chunked_array([pa.DictionaryArray.from_arrays(chunk.indices, chunk.dictionary.cast(pa.string()))
                             for chunk in dates.chunks], pa.dictionary(pa.int32(), pa.string())).cast(pa.string())


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


#: how every FOCUS file is written (`pq.ParquetWriter` options): zstd, and dictionary pages for every column but the
#: per-request ids, whose values never repeat: the writer built a dictionary for each until it gave up, which cost
#: ~10 % of a write and made request files ~1.7x larger
PARQUET_OPTIONS: Final[Mapping[str, Any]] = {"compression": "zstd",
                                             "use_dictionary": sorted(set(_KINDS) - _PER_REQUEST)}


def write_atomically(table: pa.Table, target: Path) -> None:
    """Write `table` to `target` so that no reader ever sees a partial file."""
    with replacing(target) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


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
                    writer = writer or pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS)
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
    """Packed rows (`pack_values`) -> one new request file per billing period x charge date x FOCUS version, without
    the rows the ledger says are already in the files. Streams table by table: memory beyond `tables` is one table
    unpacked. If a file cannot be written, the ledger forgets its day and the error is raised."""
    keyed = [(table, table_version(table), partition_keys(table)) for table in _regrouped(tables)]
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


def _regrouped(tables: Sequence[pa.Table]) -> list[pa.Table]:
    """Packed tables as fewer, of at least ROW_GROUP_ROWS rows each but a version's last, one FOCUS version each, in
    order and without copying: each is written as a Parquet row group of its own, and costs its calls into Arrow
    and Parquet (~1 ms a column) however few its rows. A partition's slice of a pack may hold a few hundred."""
    groups: dict[str, list[list[pa.Table]]] = {}
    for table in tables:
        if table.num_rows:
            version = groups.setdefault(table_version(table), [[]])
            if sum(t.num_rows for t in version[-1]) >= ROW_GROUP_ROWS:
                version.append([])
            version[-1].append(table)
    return [pa.concat_tables(group) for version in groups.values() for group in version]


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


class DayIds:
    """The row ids of one charge date as 64-bit hashes, 8 bytes an id: sorted runs, each older one more than twice
    the size of the next (a flush's hashes are a new run, merged with the one before while that is at most twice
    its size). So a day of n ids has at most ~log2(n / flush) runs, each hash is copied O(log n) times in all, in
    C, and a flush's hashes are looked up and added at once (numpy), not one by one in Python; one sorted pending
    array merged into the rest had cost a copy of it every flush, growing with the day."""

    __slots__ = ("runs",)

    def __init__(self, hashes: npt.NDArray[np.int64]) -> None:
        self.runs: list[npt.NDArray[np.int64]] = [np.sort(hashes)] if len(hashes) else []

    def holds(self, hashes: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of `hashes` it holds."""
        found = np.zeros(len(hashes), np.bool_)
        for run in self.runs:
            found |= _in_sorted(run, hashes)
        return found

    def add(self, hashes: npt.NDArray[np.int64]) -> None:
        if not len(hashes):
            return
        runs = self.runs
        runs.append(np.sort(hashes))
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            newer = runs.pop()
            merged = np.concatenate([runs.pop(), newer])
            merged.sort(kind="stable")  # in place; two sorted runs (numpy's stable sort of int64 is a radix sort)
            runs.append(merged)


def _in_sorted(sorted_hashes: npt.NDArray[np.int64], hashes: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of `hashes` are in `sorted_hashes`, by bisection."""
    if not len(sorted_hashes):
        return np.zeros(len(hashes), np.bool_)
    at = np.searchsorted(sorted_hashes, hashes).clip(max=len(sorted_hashes) - 1)
    found: npt.NDArray[np.bool_] = sorted_hashes[at] == hashes
    return found


def _hashes(row_ids: Iterable[str]) -> npt.NDArray[np.int64]:
    return np.fromiter(map(id_hash, row_ids), np.int64)


class RowLedger:
    """Which row ids are already in the files, per charge date, loaded from the files on demand.

    Redelivered rows (the exporter or a worker restarted before committing, a partition that moved)
    carry the same x_RowId and are dropped here. A day's ids are held as 64-bit hashes, 8 bytes an
    id (`DayIds`; the hash is `id_hash`, shared with the pricing stage's usage dedupe) where a set of
    the id strings took about 147; a hash that matches is confirmed against the day's files and the
    ids of the write in progress, so two ids that share a hash are both written. Only the last few
    days touched are kept in memory; an older day is read back from its files when a late row for it
    arrives. Compaction keeps the rows of a day, so a day's ids are the same before and after it. Not
    thread-safe: one writer at a time, holding `writer_lock`.
    """

    def __init__(self, root: Path, max_days: int = LEDGER_DAYS) -> None:
        self._root = root
        self._max_days = max_days
        self._days: OrderedDict[tuple[str, str], DayIds] = OrderedDict()
        #: per day: the ids `fresh` gave out since the day's last `written`, not in its files yet
        self._pending: dict[tuple[str, str], list[pa.Array]] = {}

    def _files(self, period: str, day: str) -> list[Path]:
        return sorted(partition_dir(self._root, period, day).glob("part-*.parquet"))

    def _ids(self, period: str, day: str) -> DayIds:
        key = (period, day)
        if key not in self._days:
            self._days[key] = DayIds(np.concatenate(
                [_hashes(pq.read_table(path, columns=["x_RowId"]).column(0).to_pylist())
                 for path in self._files(period, day)] or [np.empty(0, np.int64)]))
            while len(self._days) > self._max_days:
                self._days.popitem(last=False)
        self._days.move_to_end(key)
        return self._days[key]

    def fresh(self, period: str, day: str, row_ids: pa.Array) -> pa.Array:
        """For each id (a string array), whether it is not in the files yet (a repeat within `row_ids` is not); records
        the fresh ones as being written, until `written` or `forget`."""
        ids = self._ids(period, day)
        strings = row_ids.to_pylist()
        hashes = _hashes(strings)
        new = np.zeros(len(hashes), np.bool_)
        new[np.unique(hashes, return_index=True)[1]] = True  # the first of each hash
        new &= ~ids.holds(hashes)
        if not new.all():  # a redelivery, or rarely another id with the same hash: which, exactly
            matched = {strings[i] for i in np.flatnonzero(~new)}
            known = self._known(period, day, matched)
            for i, row_id in enumerate(strings):
                if row_id in matched and row_id not in known:  # the first of it: new
                    new[i] = True
                    known.add(row_id)
        ids.add(hashes[new])
        keep = pa.array(new, pa.bool_())
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
        table = con.sql(rollup_sql(grain, str(source / "part-*.parquet"), version)).to_arrow_table()
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
