"""The exporter's buffer without a broker: fetched records wait, then are packed PACK_ROWS at a time across partitions,
each partition keeping exactly its own rows; the records that are not FOCUS rows are dead-lettered where they were."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from pipeline.export import exporter as exporter_module
from pipeline.export.exporter import FocusExporter
from pipeline.export.files import table_version, unpack
from schemas.config import Config
from tests.unit.test_export_files import expected_table, focus_values

TOPIC = "genai.cost.focus"


def records(partition: int, values: list[bytes], first: int = 0) -> list[ConsumerRecord[bytes, bytes]]:
    """`values` as fetched from a partition, from offset `first` on."""
    return [ConsumerRecord(TOPIC, partition, offset, 0, 0, b"key", value, None, 3, len(value), [])
            for offset, value in enumerate(values, first)]


def test_each_partition_keeps_its_own_rows_packed_across_partitions_and_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "PACK_ROWS", 7)  # batches that cut through partitions and fetches
    exporter = FocusExporter(Config(), tmp_path)
    first, second = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    ours = [*focus_values(3), *focus_values(2, tag="c", version="1.2")]  # 15 rows, both FOCUS versions
    ours[4] = b"{}"
    theirs = focus_values(4, tag="d")
    theirs[3] = orjson.dumps({**orjson.loads(theirs[3]), "BilledCost": "1e5"})
    exporter._take(first, records(0, ours[:5]))  # waits: fewer than PACK_ROWS
    assert exporter._tables == {}
    exporter._take(second, records(1, theirs[:6]))
    exporter._take(first, records(0, ours[5:], 5))
    exporter._take(second, records(1, theirs[6:], 6))
    exporter._pack()  # what a flush does first

    def held(tp: TopicPartition, version: str) -> pa.Table:
        return pa.concat_tables([unpack(table) for table in exporter._tables[tp] if table_version(table) == version])

    assert held(first, "1.4").equals(expected_table([*ours[:4], *ours[5:9]]))
    assert held(first, "1.2").equals(expected_table(ours[9:], "1.2"))
    assert held(second, "1.4").equals(expected_table([*theirs[:3], *theirs[4:]]))
    assert exporter.held_rows == exporter.rows_read == 8 + 6 + 11
    letters = [orjson.loads(value)["fields"] for _, value in exporter._rejections.take()]
    assert [(letter["partition"], letter["offset"]) for letter in letters] == [(0, 4), (1, 3)]
    assert exporter._offsets == {first: 15, second: 12}


def test_a_revoke_drops_the_waiting_records_of_the_partitions_taken_away(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A revoked partition's records not yet packed are dropped uncommitted (its next owner reads them again): none
    of its rows is packed, nor counted as waiting, so packing waits for PACK_ROWS of the partitions still ours."""
    monkeypatch.setattr(exporter_module, "PACK_ROWS", 7)
    exporter = FocusExporter(Config(), tmp_path)
    kept, revoked = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    ours, theirs = focus_values(2), focus_values(1, tag="d")  # 6 rows and 3
    exporter._take(kept, records(0, ours[:3]))
    exporter._take(revoked, records(1, theirs))  # 6 waiting
    asyncio.run(exporter.on_partitions_revoked([revoked]))
    assert exporter.held_rows == 3
    assert exporter._offsets == {kept: 3}
    exporter._take(kept, records(0, ours[3:], 3))  # 6 waiting: still fewer than PACK_ROWS
    assert exporter._tables == {}
    exporter._pack()
    assert list(exporter._tables) == [kept]
    assert pa.concat_tables(unpack(table) for table in exporter._tables[kept]).equals(expected_table(ours))
