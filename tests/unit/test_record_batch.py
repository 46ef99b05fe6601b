"""Record batches encoded whole (pipeline.kafka.record_batch): the bytes aiokafka's own builder makes of the same
records, read back by aiokafka's reader, cut under the size bound."""

from __future__ import annotations

import gzip
import random
import types

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from pipeline.kafka import record_batch
from pipeline.kafka.record_batch import (
    CODECS,
    RECORD_OVERHEAD,
    KeyValue,
    encode_record_batch,
    record_batches,
    with_producer_state,
)

STAMP = 1_767_225_600_123


def _records(seed: int, count: int) -> list[KeyValue]:
    """Keys and values of every kind: null, empty, a few bytes, and past 8,191 bytes (a longer length varint)."""
    rnd = random.Random(seed)
    sizes = (0, 1, 127, 128, 8_191, 8_192, 20_000)
    out: list[KeyValue] = []
    while len(out) < count:
        key = rnd.choice((None, b"", b"team=a", b"k" * rnd.choice(sizes)))
        value = rnd.choice((None, b"", rnd.randbytes(rnd.choice(sizes)), b'{"BilledCost":"0.5"}' * 150))
        if key is not None or value is not None:
            out.append((key, value))
    return out


def _aiokafkas(records: list[KeyValue], codec: int) -> bytes:
    builder = BatchBuilder(1 << 30, codec)
    for key, value in records:
        assert builder.append(key=key, value=value, timestamp=STAMP) is not None
    return bytes(builder._build())


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_is_what_aiokafka_builds_of_its_records(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_batch, "ZSTD_LEVEL", 3)  # aiokafka's
    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: 0.0))  # a gzip stream holds its time
    for count in (1, 2, 300):  # 300: offset deltas past one varint byte
        records = _records(count, count)
        assert encode_record_batch(records, CODECS[codec], STAMP) == _aiokafkas(records, CODECS[codec])


@pytest.mark.parametrize("codec", CODECS)
def test_an_idempotent_producers_state_is_stamped_as_aiokafka_stamps_it(codec: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_batch, "ZSTD_LEVEL", 3)  # aiokafka's
    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: 0.0))
    records = _records(11, 50)
    builder = BatchBuilder(1 << 30, CODECS[codec])
    for key, value in records:
        assert builder.append(key=key, value=value, timestamp=STAMP) is not None
    builder._set_producer_state(4_321, 7, 1_000)
    stamped = with_producer_state(encode_record_batch(records, CODECS[codec], STAMP), 4_321, 7, 1_000)
    assert stamped == bytes(builder._build())
    batch = DefaultRecordBatch(bytearray(stamped))
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (4_321, 7, 1_000)


@pytest.mark.parametrize("codec", CODECS)
def test_aiokafka_reads_back_every_record_at_the_batch_time(codec: str) -> None:
    records = _records(7, 300) + [(b"team=a", b'{"BilledCost":"0.5"}' * 150)] * 100  # compressible
    batch = DefaultRecordBatch(bytearray(encode_record_batch(records, CODECS[codec], STAMP)))
    assert batch.validate_crc()
    assert batch.compression_type == CODECS[codec]
    assert [(r.offset, r.timestamp, r.key, r.value) for r in batch] == [
        (offset, STAMP, key, value) for offset, (key, value) in enumerate(records)]


def test_zstd_at_its_own_level_is_no_larger_than_a_few_percent() -> None:
    rows: list[KeyValue] = [(b"team=a", b'{"x_RowId":"%d","BilledCost":"0.000%d"}' % (n, n) * 40) for n in range(80)]
    ours, kafkas = encode_record_batch(rows, CODECS["zstd"], STAMP), _aiokafkas(rows, CODECS["zstd"])
    assert ours != kafkas  # another level
    assert len(ours) <= len(kafkas) * 1.1


def test_batches_hold_at_most_max_bytes_but_a_longer_record_goes_alone() -> None:
    records: list[KeyValue] = [(b"k", b"v" * 99), (None, b"v" * 99), (b"k", None), (b"kk", b"v" * 300),
                               (b"k", b"v" * 49), (b"k", b"v" * 49)]
    batches = record_batches(records, 200 + 3 * RECORD_OVERHEAD)
    assert [list(b) for b in batches] == [records[:3], records[3:4], records[4:]]
    assert record_batches([], 200) == []


def test_a_batch_handed_to_aiokafka_takes_the_producer_state_it_is_given() -> None:
    from pipeline.kafka.producer import _Encoded  # noqa: PLC0415  # the shape aiokafka's sender takes

    records = _records(12, 5)
    data = encode_record_batch(records, CODECS["zstd"], STAMP)
    encoded = _Encoded(data, len(records))
    encoded._set_producer_state(99, 1, 42)
    assert encoded._build() == with_producer_state(data, 99, 1, 42) != data
