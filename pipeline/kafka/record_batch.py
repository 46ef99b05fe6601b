"""Kafka record batches (message format v2, KIP-98) encoded whole, for `BatchProducer`. Pure.

aiokafka's batch builder takes records one call at a time into a growing buffer, then copies that buffer
twice more to compress it: in the worker, making FOCUS rows (~3 KB each, 2.5 a call), those copies cost
about as much CPU as zstd itself. Here a batch's records are laid out in one join and
compressed once, all records stamped with the batch's time (a timestamp delta of 0). The bytes are those
aiokafka's DefaultRecordBatchBuilder makes of the same records stamped with that time
(tests/unit/test_record_batch.py), but for zstd's level: ZSTD_LEVEL, not 3.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from aiokafka.codec import gzip_encode, lz4_encode, snappy_encode, zstd_encode
from aiokafka.record.util import calc_crc32c, encode_varint

#: a record: key and value, either may be None (a None value is a tombstone on a compacted topic)
KeyValue = tuple[bytes | None, bytes | None]

#: Kafka's codec names (`kafka.compression`) and their codes in a batch's attributes
CODECS: Final = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
#: zstd level 1, not Kafka's default 3: on FOCUS rows ~20% less of zstd's CPU for 3% more bytes (~90 B a row,
#: not ~87.5)
ZSTD_LEVEL: Final = 1
_COMPRESS: Final[dict[int, Callable[[bytes], bytes]]] = {
    1: gzip_encode, 2: snappy_encode, 3: lz4_encode, 4: lambda data: zstd_encode(data, level=ZSTD_LEVEL)}
#: baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes, lastOffsetDelta, firstTimestamp,
#: maxTimestamp, producerId, producerEpoch, baseSequence, recordCount
_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
_CRC_FROM: Final = 21  # the crc covers the batch from its attributes on
_CRC_AT: Final = 17
_LENGTH_FROM: Final = 12  # batchLength counts the bytes after itself
#: producerId, producerEpoch, baseSequence: an idempotent producer's, set once the batch is about to be sent
_PRODUCER_STATE: Final = struct.Struct(">qhi")
_PRODUCER_STATE_AT: Final = 43


def _varint(value: int) -> bytes:
    """A zigzag varint, as Kafka writes lengths and deltas (aiokafka's encoder)."""
    out = bytearray()
    encode_varint(value, out.append)
    return bytes(out)


#: the varints of 0 to 8,191, looked up: every offset delta and most lengths; -1 is a null key or value
_SMALL: Final = 8192
_VARINTS: Final = tuple(_varint(n) for n in range(_SMALL))
_NULL: Final = _varint(-1)


def _varint_of(value: int) -> bytes:
    return _VARINTS[value] if 0 <= value < _SMALL else _varint(value)


def _sized(data: bytes | None) -> bytes:
    """A key or value field's length prefix."""
    return _NULL if data is None else _varint_of(len(data))


#: a record's bytes besides its key and value, at most (length, attributes, deltas, field lengths, headers)
RECORD_OVERHEAD: Final = 21


def record_batches(records: Sequence[KeyValue], max_bytes: int) -> list[Sequence[KeyValue]]:
    """The records cut into runs of at most `max_bytes` each, uncompressed (a longer record goes alone)."""
    out: list[Sequence[KeyValue]] = []
    start = size = 0
    for end, (key, value) in enumerate(records):
        grown = size + RECORD_OVERHEAD + (len(key) if key is not None else 0) + (len(value) if value is not None else 0)
        if grown > max_bytes and end > start:
            out.append(records[start:end])
            start, grown = end, grown - size
        size = grown
    if start < len(records):
        out.append(records[start:] if start else records)
    return out


def encode_record_batch(records: Sequence[KeyValue], codec: int, timestamp_ms: int) -> bytes:
    """One v2 record batch of `records` (at least one), every record stamped `timestamp_ms`, its records
    compressed with `codec` (CODECS), even should that not make them smaller, as aiokafka does. Base offset 0
    and no producer id (base sequence 0, as aiokafka writes it): the broker assigns offsets, and an idempotent
    producer's state is set by `with_producer_state`."""
    parts: list[bytes] = []
    keys: dict[bytes | None, bytes] = {}  # a key's field: most records of a batch share a few keys
    for offset, (key, value) in enumerate(records):
        key_field = keys.get(key)
        if key_field is None:
            key_field = keys[key] = _sized(key) + (key or b"")
        value_size, data = _sized(value), value or b""
        offset_delta = _varint_of(offset)
        # attributes (none), timestamp delta (0), offset delta, key, value, no headers
        size = 2 + len(offset_delta) + len(key_field) + len(value_size) + len(data) + 1
        parts += (_varint_of(size), b"\x00\x00", offset_delta, key_field, value_size, data, b"\x00")
    body = b"".join(parts)
    if codec:
        body = _COMPRESS[codec](body)
    header = _HEADER.pack(0, _HEADER.size - _LENGTH_FROM + len(body), -1, 2, 0, codec, len(records) - 1,
                          timestamp_ms, timestamp_ms, -1, -1, 0, len(records))
    crc = calc_crc32c(header[_CRC_FROM:] + body)
    return b"".join((header[:_CRC_AT], crc.to_bytes(4, "big"), header[_CRC_FROM:], body))


def with_producer_state(batch: bytes, producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
    """`batch` (encode_record_batch's) stamped with an idempotent producer's id, epoch and first sequence, as
    aiokafka stamps its own batches before sending them; the crc, which covers them, made anew."""
    data = bytearray(batch)
    _PRODUCER_STATE.pack_into(data, _PRODUCER_STATE_AT, producer_id, producer_epoch, base_sequence)
    data[_CRC_AT:_CRC_FROM] = calc_crc32c(bytes(data[_CRC_FROM:])).to_bytes(4, "big")
    return bytes(data)
