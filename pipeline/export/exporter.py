"""The exporter: `genai.cost.focus` -> FOCUS Parquet files under the data dir.

At-least-once with dedupe: rows are buffered, written as whole files (atomically), and only
then are their offsets committed. A crash before the commit redelivers rows that are already
in files; the RowLedger drops them by x_RowId, so every row is in the files exactly once.

Memory is bounded by `exporter.max_buffered_rows`, the rows being written included: messages
wait as fetched until PACK_ROWS of them do (or a flush starts), then are decoded and validated,
once, straight into packed Arrow tables (`files.pack_values`, ~620 bytes a FOCUS 1.4 row). A
full buffer is flushed and nothing more is fetched until it is written. The blocking work
(Parquet writes and fsyncs, the ledger's loads, DuckDB rollups, compaction) runs in a thread,
one job at a time, so the event loop keeps heartbeating and fetching meanwhile; a job commits
exactly the offsets of the rows it wrote.
A message that is not a FOCUS row the files can hold is dead-lettered (`invalid_focus_row`)
and skipped; its dead letter is published before the offsets are committed. The rows of a
partition taken away by a rebalance are dropped from the buffer uncommitted: its new owner
reads them again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.export.compaction import SwapUnsupported, compact
from pipeline.export.files import (
    RowLedger,
    focus_dir,
    pack_values,
    write_rollup,
    write_rows,
    writer_lock,
)
from pipeline.kafka.consumer import REBALANCE_TIMEOUT_MS, commit_processed, group_consumer
from pipeline.kafka.producer import BatchProducer
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.observability.rejections import Rejections
from schemas.codec import Record
from schemas.config import Config
from schemas.errors import SchemaError
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
EXPORTER_GROUP = "spendstream-exporter"
#: records per fetch
FETCH_RECORDS: Final = 5_000
#: fetched records wait (~3.3 KB each) until this many do, then are packed together, every partition's at once: a
#: pack costs ~2-3 ms however few its rows (a few calls into Arrow a column), ~12-15 us a row besides (decoded
#: `files.DECODE_ROWS` at a time); 4,096 or 8,192 at once cost no less a row
PACK_ROWS: Final = 2_048
#: the first compaction pass runs this long after start (or after compact_every_s, if sooner)
FIRST_COMPACTION_S: Final = 30.0
#: a revoke waits this long at most for the write in progress, so that its offsets are committed before the
#: partitions move (within the group's rebalance timeout)
REVOKE_WAIT_S: Final = REBALANCE_TIMEOUT_MS / 2000


@dataclass(slots=True)
class _Flush:
    """The rows one flush writes, as packed tables per partition; and the offset after the last record read of each
    partition, committed once they are written."""

    tables: dict[TopicPartition, list[pa.Table]]
    offsets: dict[TopicPartition, int]
    #: the dead letters of the messages read with them, published before the commit
    letters: list[Record] = field(default_factory=list)


class FocusExporter(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, config: Config, data_dir: Path) -> None:
        self._config = config
        self._data_dir = data_dir
        self._root = focus_dir(data_dir)
        self._ledger = RowLedger(self._root)
        #: per partition: records not yet packed, packed tables, the offset after the last record read
        self._records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        self._tables: dict[TopicPartition, list[pa.Table]] = {}
        self._offsets: dict[TopicPartition, int] = {}
        self._buffered = 0  # rows in _records and _tables
        self._unpacked = 0  # rows in _records
        self._first_buffered = 0.0
        #: the job in the writer thread (a flush, then its commit; or a compaction pass) and the rows it holds
        self._job: asyncio.Task[None] | None = None
        self._job_rows = 0
        self._rejections = Rejections("exporter", log)
        self._next_compaction = time.monotonic() + min(FIRST_COMPACTION_S, config.exporter.compact_every_s)
        self.rows_written = 0
        self.duplicates = 0
        self.rows_read = 0

    @property
    def held_rows(self) -> int:
        """Rows in memory: buffered, and being written."""
        return self._buffered + self._job_rows

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:  # uncommitted: the partition's next owner reads them again
            self._buffered -= len(self._records.pop(tp, [])) + sum(t.num_rows for t in self._tables.pop(tp, []))
            self._offsets.pop(tp, None)
        self._unpacked = sum(len(records) for records in self._records.values())
        metrics.EXPORTER_BUFFERED.set(self.held_rows)
        if self._job is not None:  # let the write in progress commit while the partitions are still ours
            await asyncio.wait({self._job}, timeout=REVOKE_WAIT_S)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then flush what is buffered and commit it."""
        kafka = self._config.kafka
        settings = self._config.exporter
        consumer = group_consumer(kafka, EXPORTER_GROUP, max_poll_records=FETCH_RECORDS)
        consumer.subscribe([TopicNames(kafka.topic_prefix).cost_focus], listener=self)
        producer = BatchProducer.of(kafka, os.environ)  # dead letters only
        await producer.start()
        await consumer.start()
        observed = ConsumerMetrics(consumer, EXPORTER_GROUP, "exporter")
        try:
            while not stop.is_set():
                self._reap()
                room = settings.max_buffered_rows - self.held_rows
                if room <= 0:  # full: write, and fetch nothing more until it is written
                    if self._job is None:
                        self._start(self._flush(consumer, producer))
                    assert self._job is not None
                    await asyncio.wait({self._job}, timeout=0.5)
                    continue
                batches = await consumer.getmany(timeout_ms=500, max_records=min(FETCH_RECORDS, room))
                await observed.after_fetch(batches)
                owned = consumer.assignment()  # a rebalance during after_fetch may have taken partitions away
                for tp, records in batches.items():
                    if tp in owned:
                        self._take(tp, records)
                if self._job is None and self._due():
                    self._start(self._flush(consumer, producer))
                elif self._job is None and settings.compact_every_s and time.monotonic() >= self._next_compaction:
                    self._start(self._compact())
            if self._job is not None:
                await asyncio.wait({self._job})
                self._reap()
            await self._flush(consumer, producer)
        finally:
            if self._job is not None:  # an error: let the thread finish its file before the consumer goes
                await asyncio.wait({self._job})
            await consumer.stop()
            await producer.stop()

    def _take(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Hold the records until PACK_ROWS wait."""
        if not self._offsets:
            self._first_buffered = time.monotonic()
        self._records.setdefault(tp, []).extend(records)
        self._unpacked += len(records)
        self._buffered += len(records)
        self.rows_read += len(records)
        self._offsets[tp] = records[-1].offset + 1
        if self._unpacked >= PACK_ROWS:
            self._pack()
        metrics.EXPORTER_BUFFERED.set(self.held_rows)

    def _pack(self) -> None:
        """Pack every waiting record's FOCUS row into tables, one a partition and FOCUS version, PACK_ROWS records at
        a time (across partitions); dead-letter the records that are not rows the files can hold."""
        waiting, self._records, self._unpacked = self._records, {}, 0
        records = [record for part in waiting.values() for record in part]
        ends = list(itertools.accumulate(len(part) for part in waiting.values()))  # each partition's, in `records`
        for start in range(0, len(records), PACK_ROWS):
            chunk = records[start:start + PACK_ROWS]
            packed, refused = pack_values([record.value or b"" for record in chunk])
            for index, reason in refused:
                self._rejections.add(chunk[index], "invalid_focus_row", SchemaError(reason))
            self._buffered -= len(refused)
            self.rows_read -= len(refused)
            for tp, end, size in zip(waiting, ends, map(len, waiting.values()), strict=True):
                first, last = max(end - size, start) - start, min(end, start + len(chunk)) - start
                if first < last:
                    self._tables.setdefault(tp, []).extend(
                        table for table in (rows.between(first, last) for rows in packed) if table.num_rows)

    def _due(self) -> bool:
        settings = self._config.exporter
        return bool(self._offsets) and (self._buffered >= settings.max_rows_per_file
                                        or time.monotonic() - self._first_buffered >= settings.flush_seconds)

    def _start(self, job: Coroutine[Any, Any, None]) -> None:
        self._job = asyncio.create_task(job)

    def _reap(self) -> None:
        """Forget a finished job; raise its error (a file that could not be written stops the exporter, uncommitted)."""
        if self._job is not None and self._job.done():
            job, self._job = self._job, None
            self._job_rows = 0
            metrics.EXPORTER_BUFFERED.set(self.held_rows)
            job.result()

    def _flush(self, consumer: AIOKafkaConsumer, producer: BatchProducer) -> Coroutine[Any, Any, None]:
        """Hand every buffered row to a write (the buffer starts empty): the coroutine writing them, then
        committing what was read. Taken at once, so rows read meanwhile wait for the next flush."""
        self._pack()
        flush = _Flush(self._tables, self._offsets, self._rejections.take())
        self._tables, self._offsets = {}, {}
        self._job_rows, self._buffered = self._buffered, 0
        return self._write_and_commit(consumer, producer, flush)

    async def _write_and_commit(self, consumer: AIOKafkaConsumer, producer: BatchProducer, flush: _Flush) -> None:
        """Write the rows not yet in the files, rebuild the rollups of the days touched, publish the dead letters,
        then commit what was read: nothing is committed before it is in a file or on `genai.deadletter`."""
        if flush.offsets:
            await asyncio.to_thread(self._write, flush)
            await producer.send_all(TopicNames(self._config.kafka.topic_prefix).deadletter, flush.letters)
            await commit_processed(consumer, flush.offsets, "exporter", log)

    def _write(self, flush: _Flush) -> None:
        """The writer thread's part of a flush."""
        tables = [table for tps in flush.tables.values() for table in tps]
        flush.tables = {}
        with writer_lock(self._data_dir):
            written = write_rows(self._root, tables, self._ledger)
            rollup = self._config.exporter.rollup
            if rollup != "request":
                for period, day in written.days:
                    write_rollup(self._data_dir, rollup, period, day)
        del tables
        pa.default_memory_pool().release_unused()
        self.rows_written += written.rows
        self.duplicates += written.duplicates
        metrics.EXPORTER_ROWS.inc(written.rows)
        metrics.EXPORTER_DUPLICATES.inc(written.duplicates)
        metrics.EXPORTER_FILES.inc(written.files)
        log.info("exporter: %d rows in files, %d duplicates dropped", self.rows_written, self.duplicates)

    async def _compact(self) -> None:
        """A compaction pass over the closed charge dates, in the writer thread."""
        every = self._config.exporter.compact_every_s
        try:
            done = await asyncio.to_thread(compact, self._data_dir, time.time(),
                                           self._config.collector.max_lateness_s, self._config.exporter.rollup)
        except SwapUnsupported as exc:
            log.warning("exporter: compaction is off: %s", exc)
            self._next_compaction = float("inf")
            return
        self._next_compaction = time.monotonic() + every
        metrics.EXPORTER_COMPACTED_FILES.inc(sum(c.files_before - c.files_after for c in done))
