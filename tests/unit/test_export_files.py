"""The exporter's files without a broker: rows held packed, written once per x_RowId, compacted atomically."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.export import compaction, files, report
from pipeline.export.compaction import (
    STAGING_PREFIX,
    SwapUnsupported,
    closed_days,
    compact,
    compact_day,
    exchange,
)
from pipeline.export.files import (
    ARROW_SCHEMA,
    ARROW_SCHEMAS,
    DECODE_ROWS,
    DayIds,
    RowLedger,
    focus_dir,
    pack_values,
    partition_dir,
    schema_version,
    table_version,
    unpack,
    write_partition,
    write_rollup,
    write_rows,
)
from pipeline.guardrails import history
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.errors import SchemaError
from schemas.focus import COLUMNS_BY_VERSION, FOCUS_VERSION, decode_row
from schemas.swap_lock import SWAP_LOCK, swapping_request_files
from schemas.usage import TokenCounts, UsageEvent
from tests.poison import focus_poison

DAY_S = 86_400
#: 2026-11-20T00:00:00Z
NOV_20 = 1_795_132_800


def focus_values(calls: int, start_s: int = NOV_20, step_s: int = 60, tag: str = "a",
                 version: str = FOCUS_VERSION) -> list[bytes]:
    """The `genai.cost.focus` values of `calls` priced calls, `step_s` apart (3 rows a call)."""
    events = [UsageEvent(
        id=f"{tag}{m:031x}-{m:016x}", trace_id=f"{tag}{m:031x}", span_id=f"{m:016x}", parent_span_id=None,
        start_time_unix_nano=(start_s + m * step_s) * 10**9, end_time_unix_nano=(start_s + m * step_s + 1) * 10**9,
        operation="chat", provider="openai", request_model="gpt-4o", response_model="gpt-4o-2024-08-06",
        tokens=TokenCounts(input_uncached=100 + m, cache_read=64, output=20 + m % 9),
        attribution={"team": ("search", "ads")[m % 2], "use_case": "rag", "env": "prod", "ünicode": "✓"},
        attribution_key=f"team={('search', 'ads')[m % 2]}") for m in range(calls)]
    return [value for _, value in cost_records(events, PriceCatalog(), Billing(focus_version=version)).rows]


def expected_table(values: list[bytes], version: str = FOCUS_VERSION) -> pa.Table:
    """The file form of rows, built by hand from the decoded JSON (Decimal money, UTC times, JSON text)."""
    columns = COLUMNS_BY_VERSION[version]
    kinds = dict(columns)

    def convert(name: str, value: Any) -> Any:
        if value is None:
            return None
        if kinds[name] in ("money", "quantity"):
            return Decimal(value)
        if kinds[name] == "datetime":
            return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if kinds[name] == "json":
            return orjson.dumps(value).decode()
        return value

    rows = [{name: convert(name, row.get(name)) for name, _ in columns} for row in map(orjson.loads, values)]
    return pa.Table.from_pylist(rows, schema=ARROW_SCHEMAS[version])


def packed(values: list[bytes]) -> pa.Table:
    """The one packed table of FOCUS rows of one version, all valid."""
    tables, refused = pack_values(values)
    assert refused == []
    [rows] = tables
    assert rows.indexes == list(range(len(values)))
    return rows.table


def test_packed_rows_hold_exactly_the_values_of_the_messages() -> None:
    values = focus_values(40)
    table = packed(values)
    assert unpack(table).equals(expected_table(values))
    assert unpack(table).schema.metadata == ARROW_SCHEMA.metadata
    assert pa.types.is_dictionary(table.schema.field("Tags").type)
    assert table.schema.field("x_RowId").type == pa.string()  # unique per row: not worth a dictionary


def test_the_largest_values_a_row_may_carry_are_held_exactly() -> None:
    """What the exporter's decoder lets through (38 digits of money and quantity, int64, any JSON scalar in Tags),
    the files hold exactly."""
    row = orjson.loads(focus_values(1)[0])
    row.update(BilledCost="-" + "9" * 20 + "." + "9" * 18, PricingQuantity="9" * 32 + ".999999",
               x_RequestCount=2**63 - 1, Tags={"n": 2**63 - 1, "f": 1e308, "b": True, "none": None, "s": "é"},
               ChargePeriodStart="2026-02-28T23:59:59Z")
    value = orjson.dumps(row)
    assert unpack(packed([value])).equals(expected_table([value]))


def test_a_packed_row_takes_a_tenth_of_a_dict_row() -> None:
    """The exporter holds up to exporter.max_buffered_rows of these (docs/architecture.md gives the figures)."""
    values = focus_values(3000)
    table = packed(values)
    per_row = table.nbytes / table.num_rows
    assert per_row < 700, per_row  # measured ~620 B (FOCUS 1.4); a decoded dict row is ~7.6 KB, its JSON ~2.9 KB


def test_values_that_are_not_rows_the_files_hold_are_left_out_one_by_one_with_the_decoders_reason() -> None:
    values = focus_values(10)
    bad_money = values[3].replace(b'"BilledCost":"', b'"BilledCost":"x')
    no_row_id = orjson.dumps({k: v for k, v in orjson.loads(values[4]).items() if k != "x_RowId"})
    mixed = [*values[:3], bad_money, no_row_id, b"\xff\xfe", *values[5:]]
    [rows], refused = pack_values(mixed)
    assert [index for index, _ in refused] == [3, 4, 5]
    for index, reason in refused:
        with pytest.raises(SchemaError) as error:
            decode_row(mixed[index])
        assert reason == str(error.value)
    assert unpack(rows.table).equals(expected_table([*values[:3], *values[5:]]))
    assert rows.indexes == [0, 1, 2, *range(6, len(mixed))]
    assert pack_values([b"{}"])[0] == []


#: (model, provider): rows of several sellers, model families and price details
MODELS = (("anthropic.claude-3-5-haiku-20241022-v1:0", "aws.bedrock"), ("gpt-4o", "azure.ai.openai"),
          ("gemini-2.5-flash", "gcp.vertex_ai"), ("claude-sonnet-4-5", "anthropic"), ("gpt-4o-mini", "openai"))


def mixed_values(version: str, calls: int = 200) -> list[bytes]:
    """A realistic mix of one FOCUS version's rows: several models, providers, teams and two billing periods (the
    calls straddle a month's end), cache reads, odd tags, and the rarer shapes: a correction, an older worker's row
    without the added columns, a sampled call's row, a row tagged ProviderName, tags of every JSON scalar."""
    events = [UsageEvent(
        id=f"m{version}{m:029x}-{m:016x}", trace_id=f"{m:032x}", span_id=f"{m:016x}", parent_span_id=None,
        start_time_unix_nano=(NOV_20 + 11 * DAY_S - 3 * 3600 + m * 97) * 10**9,
        end_time_unix_nano=(NOV_20 + 11 * DAY_S - 3 * 3600 + m * 97 + 2) * 10**9, operation="chat",
        provider=MODELS[m % len(MODELS)][1], request_model=MODELS[m % len(MODELS)][0], response_model=None,
        tokens=TokenCounts(input_uncached=10 + m * 37, cache_read=(0, 64, 2048)[m % 3], output=1 + m % 500),
        attribution={"team": ("search", "ads", "Ünïcode ✓", 'quote"d')[m % 4], "env": ("prod", "dev")[m % 2]},
        attribution_key=f"team={m % 4}") for m in range(calls)]
    values = [value for _, value in cost_records(events, PriceCatalog(), Billing(focus_version=version)).rows]
    rows = [orjson.loads(value) for value in values[:5]]
    rows[0].update(ChargeClass="Correction", ConsumedQuantity=None, PricingQuantity=None,
                   BilledCost="-" + rows[0]["BilledCost"], EffectiveCost="-" + rows[0]["EffectiveCost"])
    del rows[1]["x_SampleAdjustedCount"]
    rows[2]["x_SampleAdjustedCount"] = "8"
    rows[3]["Tags"] = {**rows[3]["Tags"], "ProviderName": "x"}
    rows[4]["Tags"] = {"n": -(2**63), "f": 0.1, "e": 1e-7, "b": False, "none": None, "s": "\u00e9\n"}
    return [*map(orjson.dumps, rows), *values[5:]]


def test_the_files_hold_exactly_the_rows_the_decoder_reads(tmp_path: Path) -> None:
    """What the exporter writes (one decode a value, columns built from the structs, checked in bulk) is, column
    by column and value by value, what a file written from the rows `decode_row` reads holds (`write_partition`,
    `rows_table`): the same schema (FOCUS version in its metadata), the same decimals, times, texts and JSON."""
    values = {version: mixed_values(version) for version in ("1.4", "1.2")}
    tables, refused = pack_values([*values["1.4"], *values["1.2"]])
    assert refused == []
    root = focus_dir(tmp_path)
    written = write_rows(root, [rows.table for rows in tables], RowLedger(root))
    assert written.days == [("2026-11", "2026-11-30"), ("2026-12", "2026-12-01")]
    for version, version_values in values.items():
        paths = [path for path in sorted(root.rglob("part-*.parquet"))
                 if schema_version(pq.read_schema(path)) == version]
        held = pa.concat_tables(pq.ParquetFile(path).read() for path in paths).sort_by("x_RowId")
        decoded = tmp_path / "decoded" / version
        write_partition(decoded, "p", "d", [decode_row(value) for value in version_values])
        [path] = decoded.rglob("part-*.parquet")
        expected = pq.ParquetFile(path).read().sort_by("x_RowId")
        assert held.schema.equals(expected.schema, check_metadata=True)
        assert held.schema.metadata == ARROW_SCHEMAS[version].metadata
        assert held.equals(expected), version


def test_pack_values_refuses_what_decode_row_refuses_with_its_reason() -> None:
    """The typed gate is msgspec's struct plus the bulk checks: every poison value is left out, with
    `decode_row`'s reason, and the rows around it are kept."""
    valid, *others = focus_values(3)
    tagged = orjson.loads(valid)

    def changed(**columns: Any) -> bytes:
        return orjson.dumps({**tagged, **columns})

    poison = [value for _, value in focus_poison(valid)] + [
        changed(BilledCost="0." + "1" * 19), changed(BilledCost="1e5"), changed(BilledCost="+1"),
        changed(ListUnitPrice=" 1"), changed(PricingQuantity="1.1234567"),
        changed(ChargePeriodStart="2026-02-29T00:00:00Z"),
        changed(ChargePeriodEnd="2026-11-20T24:00:00Z"), changed(ChargePeriodEnd="2026-11-20T23:59:60Z"),
        changed(BillingPeriodStart="0000-01-01T00:00:00Z"), changed(ChargePeriodStart="2026-04-31T00:00:00Z"),
        changed(ConsumedQuantity=None), changed(BillingCurrency="usd"), changed(PricingCurrency="USD\n"),
        changed(x_Allocated=1),
        changed(Tags={"nested": {"a": 1}}), changed(SkuPriceDetails=[1]), changed(x_RequestCount=1.5),
        changed(ChargeCategory="Purchase"), changed(x_RowId=""),
        # Python's `$` matches before a trailing newline, RE2's (and focus_row.schema.json's) does not
        changed(BilledCost="1.5\n"), changed(ChargePeriodStart="2026-11-20T10:00:00Z\n"),
    ]
    for value in poison:
        with pytest.raises(SchemaError) as error:
            decode_row(value)
        [rows], refused = pack_values([valid, value, *others])
        assert refused == [(1, str(error.value))], value[:200]
        assert unpack(rows.table).equals(expected_table([valid, *others]))


def test_a_pack_decoded_a_chunk_at_a_time_keeps_each_values_place_and_refusal() -> None:
    """Values are decoded and converted DECODE_ROWS at a time: a refused value (by msgspec, a bulk check or its JSON)
    or a row of the other version in any chunk leaves the others' order and the reasons as one chunk would."""
    values = focus_values(DECODE_ROWS + 30)  # 3 rows a call: more than three chunks
    row = orjson.loads(values[0])
    values[3] = b"{}"
    values[DECODE_ROWS + 1] = orjson.dumps({**row, "Tags": {"nested": {"a": 1}}})
    values[2 * DECODE_ROWS - 1] = orjson.dumps({**row, "BillingCurrency": "USD\n"})
    values[2 * DECODE_ROWS + 5:2 * DECODE_ROWS + 8] = focus_values(1, tag="v", version="1.2")
    poisoned = [3, DECODE_ROWS + 1, 2 * DECODE_ROWS - 1]
    [rows_1_4, rows_1_2], refused = pack_values(values)
    assert [index for index, _ in refused] == poisoned
    for index, reason in refused:
        with pytest.raises(SchemaError) as error:
            decode_row(values[index])
        assert reason == str(error.value)
    older = set(range(2 * DECODE_ROWS + 5, 2 * DECODE_ROWS + 8))
    kept = [i for i in range(len(values)) if i not in older and i not in poisoned]
    assert rows_1_4.indexes == kept
    assert unpack(rows_1_4.table).equals(expected_table([values[i] for i in kept]))
    assert unpack(rows_1_2.table).equals(expected_table([values[i] for i in sorted(older)], "1.2"))


def test_the_rows_of_a_range_of_values_are_a_slice_of_their_versions_table() -> None:
    """The exporter packs several partitions' messages at once and keeps each partition's rows apart."""
    values = [*focus_values(4), *focus_values(2, tag="c", version="1.2"), *focus_values(4, tag="d")]
    values[2] = b"{}"
    [rows_1_4, rows_1_2], refused = pack_values(values)
    assert [index for index, _ in refused] == [2]
    assert unpack(rows_1_4.between(0, 15)).equals(expected_table([*values[:2], *values[3:12]]))
    assert unpack(rows_1_2.between(0, 15)).equals(expected_table(values[12:15], "1.2"))
    assert unpack(rows_1_4.between(15, 30)).equals(expected_table(values[18:30]))
    assert unpack(rows_1_2.between(15, 30)).equals(expected_table(values[15:18], "1.2"))
    assert rows_1_2.between(18, 30).num_rows == 0


def test_small_tables_are_written_as_few_row_groups_holding_the_same_rows(tmp_path: Path) -> None:
    """A flush holds a slice of each pack for each partition, a few hundred rows each under steady traffic: written
    a row group each, they cost ~3x the CPU and make files that readers scan slowly."""
    values = focus_values(3000, step_s=1)  # 9,000 rows, one charge date
    table = packed(values)
    slices = [table.slice(start, 300) for start in range(0, table.num_rows, 300)]
    root = focus_dir(tmp_path)
    assert write_rows(root, slices, RowLedger(root)).rows == 9000
    [path] = root.rglob("part-*.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # 28 slices (8,400 rows >= ROW_GROUP_ROWS), 2 more
    assert pq.ParquetFile(path).read().cast(ARROW_SCHEMA).equals(expected_table(values))


def test_rows_of_both_focus_versions_are_held_and_written_apart(tmp_path: Path) -> None:
    """A topic may carry FOCUS 1.2 and 1.4 rows (a worker switched focus.version): each keeps its own columns, in a
    file of its own; a 1.4 row whose tags name ProviderName (which makes the quick version guess say 1.2) is held
    as 1.4, not dropped."""
    rows_1_4 = focus_values(10)
    rows_1_2 = focus_values(10, tag="c", version="1.2")
    tagged = orjson.loads(focus_values(1, tag="d")[0])
    tagged["Tags"] = {**tagged["Tags"], "ProviderName": "x"}
    packed_rows, refused = pack_values([*rows_1_4[:15], *rows_1_2, orjson.dumps(tagged), *rows_1_4[15:]])
    assert refused == []
    tables = [rows.table for rows in packed_rows]
    by_version: dict[str, list[Any]] = {}
    for table in tables:
        by_version.setdefault(table_version(table), []).append(unpack(table))
    assert sorted(by_version) == ["1.2", "1.4"]
    assert pa.concat_tables(by_version["1.2"]).equals(expected_table(rows_1_2, "1.2"))
    assert pa.concat_tables(by_version["1.4"]).num_rows == 31
    written = write_rows(focus_dir(tmp_path), tables, RowLedger(focus_dir(tmp_path)))
    assert (written.rows, written.files, written.days) == (61, 2, [("2026-11", "2026-11-20")])
    versions = sorted(pq.read_schema(p).metadata[b"FocusVersion"] for p in focus_dir(tmp_path).rglob("*.parquet"))
    assert versions == [b"1.2", b"1.4"]


def read_files(root: Path) -> tuple[int, int, Decimal, int]:
    """(rows, distinct x_RowId, sum of BilledCost, files) of the request files under `root`."""
    files = sorted(root.glob("billing_period=*/charge_date=*/part-*.parquet"))
    if not files:
        return 0, 0, Decimal(0), 0
    with duckdb.connect() as con:
        result = con.execute("SELECT count(*), count(DISTINCT x_RowId), sum(BilledCost) FROM read_parquet(?)",
                             [[str(f) for f in files]]).fetchone()
    assert result is not None
    return int(result[0]), int(result[1]), Decimal(result[2]), len(files)


def test_the_first_and_last_times_a_row_may_carry_are_filed_under_their_own_utc_dates(tmp_path: Path) -> None:
    """A far-future time (a broken or hostile clock) or one of year 1 is still a time `decode_row` takes: its row is
    written under its own billing period and charge date, and held exactly."""
    early, late, _ = focus_values(1)

    def at(value: bytes, period: str, time_: str) -> bytes:
        return orjson.dumps({**orjson.loads(value), "BillingPeriodStart": period, "ChargePeriodStart": time_,
                             "ChargePeriodEnd": time_})

    values = [at(early, "0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
              at(late, "9999-12-01T00:00:00Z", "9999-12-31T23:59:59Z")]
    for value in values:
        decode_row(value)
    root = focus_dir(tmp_path)
    assert write_rows(root, [packed(values)], RowLedger(root)).days == [("0001-01", "0001-01-01"),
                                                                        ("9999-12", "9999-12-31")]
    for value, (period, day) in zip(values, [("0001-01", "0001-01-01"), ("9999-12", "9999-12-31")], strict=True):
        [path] = partition_dir(root, period, day).glob("part-*.parquet")
        assert pq.ParquetFile(path).read().cast(ARROW_SCHEMA).equals(expected_table([value]))


def test_rows_are_written_per_charge_date_once_whatever_is_redelivered(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    values = focus_values(200, step_s=900)  # 200 calls over ~2 days: 3 charge dates
    ledger = RowLedger(root)
    first = write_rows(root, [packed(values[:300]), packed(values[300:])], ledger)
    assert first.rows == 600 and first.duplicates == 0
    assert first.days == [("2026-11", "2026-11-20"), ("2026-11", "2026-11-21"), ("2026-11", "2026-11-22")]
    again = write_rows(root, [packed(values[100:400] + values[100:110])], ledger)
    assert (again.rows, again.duplicates, again.files) == (0, 310, 0)
    fresh_ledger = RowLedger(root)  # a restarted exporter reads the ids back from the files
    assert write_rows(root, [packed(values)], fresh_ledger).duplicates == 600
    rows, distinct, total, files = read_files(root)
    assert rows == distinct == 600 and files == 3
    assert total == sum(Decimal(orjson.loads(v)["BilledCost"]) for v in values)


def test_a_write_that_fails_leaves_no_file_and_forgets_its_row_ids(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = focus_dir(tmp_path)
    values = focus_values(20)
    ledger = RowLedger(root)

    def full_disk(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pq.ParquetWriter, "write_table", full_disk)
        with pytest.raises(OSError, match="No space"):
            write_rows(root, [packed(values)], ledger)
    assert not list(root.rglob("*.parquet*"))
    assert write_rows(root, [packed(values)], ledger).rows == 60


@pytest.mark.parametrize("hashing", ["real", "every_id_collides"])
def test_a_row_repeated_in_one_flush_or_redelivered_is_written_once_and_colliding_ids_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashing: str) -> None:
    """The ledger holds hashes; a matching hash is confirmed exactly, against the files and the rows of the write in
    progress (the same row in two tables of one flush: two partitions, or a redelivery read twice)."""
    if hashing == "every_id_collides":
        monkeypatch.setattr(files, "id_hash", lambda row_id: 7)
    root = focus_dir(tmp_path)
    values = focus_values(40)
    ledger = RowLedger(root)
    first = write_rows(root, [packed(values[:80]), packed(values[60:])], ledger)
    assert (first.rows, first.duplicates) == (120, 20)
    assert write_rows(root, [packed(values)], ledger).duplicates == 120
    assert write_rows(root, [packed(values)], RowLedger(root)).duplicates == 120
    more = focus_values(10, tag="b")
    assert write_rows(root, [packed(more), packed(more)], ledger).rows == 30
    rows, distinct, _, _ = read_files(root)
    assert rows == distinct == 150


def test_the_ledger_holds_about_8_bytes_a_row_id(tmp_path: Path) -> None:
    """A day's ids read back from its files cost a 64-bit hash each, not a string in a set (~145 bytes an id)."""
    root = focus_dir(tmp_path)
    write_rows(root, [packed(focus_values(4_000, step_s=20))], RowLedger(root))  # 12,000 rows, one day
    ledger = RowLedger(root)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert write_rows(root, [packed(focus_values(1, tag="late"))], ledger).rows == 3
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 12_000 < 16


def small_files(root: Path, values: list[bytes], per_file: int) -> RowLedger:
    """Write `values` as files of `per_file` rows, as many flushes would."""
    ledger = RowLedger(root)
    for start in range(0, len(values), per_file):
        write_rows(root, [rows.table for rows in pack_values(values[start:start + per_file])[0]], ledger)
    return ledger


def test_compaction_merges_a_days_files_into_one_with_the_same_rows_in_order(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    values = focus_values(300, step_s=60)  # one charge date
    ledger = small_files(root, values, 45)
    before = read_files(root)
    assert before[3] == 20
    directory = partition_dir(root, "2026-11", "2026-11-20")
    schema = pq.read_schema(next(directory.glob("part-*.parquet")))
    order = [row_id for path in sorted(directory.glob("part-*.parquet"))
             for row_id in pq.read_table(path, columns=["x_RowId"]).column(0).to_pylist()]
    result = compact_day(root, "2026-11", "2026-11-20")
    assert result is not None and (result.files_before, result.files_after, result.rows) == (20, 1, 900)
    assert read_files(root) == (*before[:3], 1)
    [merged] = directory.glob("part-*.parquet")
    assert pq.read_table(merged).column("x_RowId").to_pylist() == order
    assert pq.read_schema(merged).equals(schema, check_metadata=True)  # what a flush writes
    assert not list(directory.parent.glob(f"{STAGING_PREFIX}*"))
    assert compact_day(root, "2026-11", "2026-11-20") is None  # one file: nothing to do
    # the ledger, in memory or read back from the merged file, still knows every row
    assert write_rows(root, [packed(values)], ledger).duplicates == 900
    assert write_rows(root, [packed(values)], RowLedger(root)).duplicates == 900


def test_a_day_of_5_s_flushes_compacts_to_one_file_and_its_rollup_is_rebuilt_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet day: a call every 6 minutes, each flushed alone (a 5 s flush holds one call), 240 files. Compaction
    leaves one file with the same rows and BilledCost, and rebuilds the hourly rollup from it, also when the
    rollup was left behind (a flush that died between its request file and its rollup)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this is about: 240 fsyncs take long
    root = focus_dir(tmp_path)
    small_files(root, focus_values(240, step_s=360), 3)
    before = read_files(root)
    assert before[:2] == (720, 720) and before[3] == 240
    rollup = write_rollup(tmp_path, "hour", "2026-11", "2026-11-20")
    small_files(root, focus_values(1, start_s=NOV_20 + 3_600, tag="b"), 3)  # its rollup not rebuilt: behind
    [result] = compact(tmp_path, NOV_20 + 2 * DAY_S, 0, rollup="hour")
    assert (result.files_before, result.files_after) == (241, 1)
    rows, distinct, billed, files = read_files(root)
    assert (rows, distinct, files) == (723, 723, 1)
    assert billed == before[2] + sum(Decimal(orjson.loads(v)["BilledCost"])
                                     for v in focus_values(1, start_s=NOV_20 + 3_600, tag="b"))
    with duckdb.connect() as con:
        hours, rolled = con.execute("SELECT count(DISTINCT ChargePeriodStart), sum(BilledCost) FROM read_parquet(?)",
                                    [str(rollup)]).fetchone() or (0, 0)
    assert rolled == billed and hours == 24


def test_compacted_files_hold_at_most_compacted_rows_and_full_ones_stay(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(compaction, "COMPACTED_ROWS", 256)
    root = focus_dir(tmp_path)
    values = focus_values(300, step_s=60)
    small_files(root, values, 30)
    directory = partition_dir(root, "2026-11", "2026-11-20")
    assert compact_day(root, "2026-11", "2026-11-20") is not None
    sizes = sorted(pq.read_metadata(p).num_rows for p in directory.glob("part-*.parquet"))
    assert sizes == [132, 256, 256, 256]
    assert all(pq.read_metadata(p).num_row_groups == max(1, pq.read_metadata(p).num_rows // 64)
               for p in directory.glob("part-*.parquet") if pq.read_metadata(p).num_rows == 256)
    full = {p.name: p.stat().st_ino for p in directory.glob("part-*.parquet") if pq.read_metadata(p).num_rows == 256}
    write_rows(root, [packed(focus_values(5, tag="b"))], RowLedger(root))  # a late row: a new small file
    result = compact_day(root, "2026-11", "2026-11-20")
    assert result is not None and result.files_after == 4
    assert {p.name: p.stat().st_ino for p in directory.glob("part-*.parquet") if p.name in full} == full
    assert read_files(root)[:2] == (915, 915)


def test_compaction_merges_the_files_of_each_focus_version_apart(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    small_files(root, focus_values(60), 30)
    small_files(root, focus_values(60, tag="c", version="1.2"), 30)
    before = read_files(root)
    result = compact_day(root, "2026-11", "2026-11-20")
    assert result is not None and (result.files_before, result.files_after) == (12, 2)
    assert read_files(root) == (*before[:3], 2)
    directory = partition_dir(root, "2026-11", "2026-11-20")
    assert sorted(pq.read_schema(p).metadata[b"FocusVersion"] for p in directory.glob("*.parquet")) == [b"1.2", b"1.4"]


def test_a_pass_that_fails_before_its_swap_leaves_the_day_as_it_was(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = focus_dir(tmp_path)
    small_files(root, focus_values(60), 30)
    before = read_files(root)

    def broken(a: Path, b: Path) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(compaction, "exchange", broken)
    with pytest.raises(OSError):
        compact_day(root, "2026-11", "2026-11-20")
    assert read_files(root) == before
    assert not list(root.rglob(f"{STAGING_PREFIX}*"))


def test_a_crashed_passes_leftover_is_removed_by_the_next(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    small_files(root, focus_values(60), 30)
    leftover = partition_dir(root, "2026-11", "2026-11-20").with_name(f"{STAGING_PREFIX}charge_date=2026-11-20")
    leftover.mkdir()
    (leftover / "part-1-compacted-0000.parquet").write_bytes(b"half a file")
    assert compact_day(root, "2026-11", "2026-11-20") is not None
    assert not leftover.exists()
    assert read_files(root)[:2] == (180, 180)


def test_only_days_past_the_lateness_are_closed(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    for day in ("2026-11-19", "2026-11-20", "not-a-date"):
        (root / "billing_period=2026-11" / f"charge_date={day}").mkdir(parents=True)
    nov_21 = NOV_20 + DAY_S
    assert closed_days(root, nov_21 + 3599, 3600) == [("2026-11", "2026-11-19")]
    assert closed_days(root, nov_21 + 3600, 3600) == [("2026-11", "2026-11-19"), ("2026-11", "2026-11-20")]


def test_a_pass_compacts_closed_days_only(tmp_path: Path) -> None:
    root = focus_dir(tmp_path)
    small_files(root, focus_values(300, step_s=900), 60)  # Nov 20-23
    done = compact(tmp_path, NOV_20 + 2 * DAY_S + 3600, 3600)
    assert [c.day for c in done] == ["2026-11-20", "2026-11-21"]
    assert [len(list(d.glob("part-*"))) for d in sorted(root.glob("*/charge_date=*"))][:2] == [1, 1]
    assert read_files(root)[:2] == (900, 900)


#: set to 1 to let the swap tests skip where the test's temporary directory cannot exchange two directories (NFS,
#: not Linux); unset, that fails them: compaction's one-step swap must never stop being tested unnoticed
ALLOW_NO_EXCHANGE_ENV = "SPENDSTREAM_TEST_ALLOW_NO_EXCHANGE"


def exchange_or_allowed_skip(first: Path, second: Path) -> None:
    """`exchange(first, second)`; where the filesystem cannot, a failure naming what to do, or a skip when
    ALLOW_NO_EXCHANGE_ENV says so."""
    try:
        exchange(first, second)
    except SwapUnsupported as exc:
        missing = f"this filesystem cannot exchange directories ({exc}): compaction's swap cannot be tested here"
        if os.environ.get(ALLOW_NO_EXCHANGE_ENV) == "1":
            pytest.skip(missing)
        pytest.fail(f"{missing}; run the tests with TMPDIR on a local Linux filesystem, or set "
                    f"{ALLOW_NO_EXCHANGE_ENV}=1 to skip them knowingly")


def test_the_swap_shows_readers_one_whole_set_of_files_never_both_nor_neither(tmp_path: Path) -> None:
    """Two sets of the same 600 rows (20 small files, 1 merged) traded under one name by `exchange`, while a reader
    globs and counts: it sees 600 every time, or a file gone between listing and opening (run again)."""
    day = tmp_path / "billing_period=2026-11" / "charge_date=2026-11-20"
    other = day.with_name(f"{STAGING_PREFIX}{day.name}")
    values = focus_values(200)
    for index in range(20):
        part = unpack(packed(values[index * 30:(index + 1) * 30]))
        (day / f"part-{index:02d}.parquet").parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, day / f"part-{index:02d}.parquet")
    other.mkdir()
    pq.write_table(unpack(packed(values)), other / "part-merged.parquet")
    exchange_or_allowed_skip(other, day)
    exchange(other, day)
    seen: list[int] = []
    vanished = 0
    done = threading.Event()

    def swap() -> None:
        for _ in range(2000):
            exchange(other, day)
        done.set()

    swapper = threading.Thread(target=swap)
    swapper.start()
    while not done.is_set():
        try:
            seen.append(sum(pq.read_metadata(path).num_rows
                            for path in tmp_path.glob("billing_period=*/charge_date=*/part-*.parquet")))
        except FileNotFoundError:
            vanished += 1
    swapper.join()
    assert seen and set(seen) == {600}, {n: seen.count(n) for n in set(seen)}


def test_spendstream_compact_merges_closed_days_and_with_all_the_open_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.cli.main import main  # noqa: PLC0415

    root = focus_dir(tmp_path)
    today = int(time.time()) // DAY_S * DAY_S
    small_files(root, focus_values(40, start_s=today - 2 * DAY_S, step_s=60), 30)
    small_files(root, focus_values(40, start_s=today, step_s=1, tag="b"), 30)
    main(["compact", "--data-dir", str(tmp_path)])
    closed = datetime.fromtimestamp(today - 2 * DAY_S, UTC).date()
    assert capsys.readouterr().out == f"charge_date={closed}: 4 files -> 1 (120 rows)\n"
    main(["compact", "--data-dir", str(tmp_path)])
    assert capsys.readouterr().out.startswith("nothing to compact")
    main(["compact", "--data-dir", str(tmp_path), "--all"])
    opened = datetime.fromtimestamp(today, UTC).date()
    assert capsys.readouterr().out == f"charge_date={opened}: 4 files -> 1 (120 rows)\n"
    assert read_files(root)[:2] == (240, 240)


@pytest.mark.parametrize("locked", [True, False])
def test_the_report_and_the_workers_history_never_read_across_a_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     locked: bool) -> None:
    """`spendstream report` and the worker's history query a day whose two sets of files (10 small, 1 merged) are
    swapped back and forth as compaction swaps them: holding the swap lock shared, each answer is the whole day's.
    Without it (the control), DuckDB reads part of a day or fails: it skips or cannot open files that a swap took
    away after it listed them."""
    if not locked:
        monkeypatch.setattr(report, "reading_request_files", lambda _: contextlib.nullcontext())
        monkeypatch.setattr(history, "reading_request_files", lambda _: contextlib.nullcontext())
    values = focus_values(100)
    day = partition_dir(focus_dir(tmp_path), "2026-11", "2026-11-20")
    other = day.with_name(f"{STAGING_PREFIX}{day.name}")
    day.mkdir(parents=True)
    other.mkdir()
    for index in range(10):
        pq.write_table(unpack(packed(values[index * 30:(index + 1) * 30])), day / f"part-{index}.parquet")
    pq.write_table(unpack(packed(values)), other / "part-merged.parquet")
    total = sum(Decimal(orjson.loads(v)["BilledCost"]) for v in values)
    (tmp_path / SWAP_LOCK).touch()  # as the exporter does before its first file: else a reader may run unlocked
    exchange_or_allowed_skip(other, day)
    done = threading.Event()

    def swap() -> None:
        while not done.is_set():
            with swapping_request_files(tmp_path):
                exchange(other, day)
            time.sleep(0.001)  # flock is not fair: without a gap the swapper starves the readers for seconds

    swapper = threading.Thread(target=swap)
    swapper.start()
    answers: list[Decimal] = []
    failures = 0
    try:
        for _ in range(400 if not locked else 20):
            try:
                answers.append(report.make_report(tmp_path, []).total_cost)
                answers.append(sum((s.cost for s in history.recorded_spend(tmp_path, NOV_20, DAY_S)), Decimal(0)))
            except duckdb.IOException:
                failures += 1
            if not locked and (failures or set(answers) - {total}):
                break
    finally:
        done.set()
        swapper.join()
    if locked:
        assert answers and set(answers) == {total} and failures == 0
    else:
        assert failures or set(answers) - {total}, "no unlocked query met a swap: the control proves nothing"


def test_a_days_ids_stay_a_few_sorted_runs_however_many_flushes_add_to_it() -> None:
    # a flush's hashes are a run of their own; runs merge as a binary counter does, so a day of n ids is at most
    # ~log2(n / flush) runs and each hash is copied O(log n) times (one pending array merged anew every flush
    # had cost a copy of it per flush: per row, linear in the day's size)
    rng = np.random.default_rng(7)
    day = DayIds(rng.integers(-(2**63), 2**63 - 1, 5_000, dtype=np.int64))
    added = [rng.integers(-(2**63), 2**63 - 1, 100, dtype=np.int64) for _ in range(1_000)]
    for hashes in added:
        assert not day.holds(hashes).any()
        day.add(hashes)
    assert len(day.runs) <= 12  # log2(105,000 / 100) + 2
    assert all(len(older) > 2 * len(newer) for older, newer in zip(day.runs, day.runs[1:], strict=False))
    assert all(bool(np.all(run[:-1] <= run[1:])) for run in day.runs)
    assert day.holds(np.concatenate(added)).all()
    assert not day.holds(rng.integers(-(2**63), 2**63 - 1, 1_000, dtype=np.int64)).any()
