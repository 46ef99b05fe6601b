"""The exporter: `genai.cost.focus` -> FOCUS Parquet files under the data dir.

At-least-once with dedupe: rows are buffered, written as whole files (atomically), and only
then are their offsets committed. A crash before the commit redelivers rows that are already
in files; the RowLedger drops them by x_RowId, so every row is in the files exactly once.
A message that is not a FOCUS row the files can hold is dead-lettered (`invalid_focus_row`) and
skipped. The rows of a partition taken away by a rebalance are dropped from the buffer
uncommitted: its new owner reads them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from pipeline.export.files import RowLedger, focus_dir, partition_of, write_partition, write_rollup
from pipeline.kafka.consumer import commit_processed, group_consumer
from pipeline.kafka.producer import BatchProducer
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from pipeline.observability.rejections import Rejections
from schemas.config import Config
from schemas.errors import SchemaError
from schemas.focus import decode_row
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
EXPORTER_GROUP = "spendstream-exporter"


class FocusExporter(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, config: Config, data_dir: Path) -> None:
        self._config = config
        self._data_dir = data_dir
        self._root = focus_dir(data_dir)
        self._ledger = RowLedger(self._root)
        #: the rows read and not yet written, and the offset after the last of them, per partition
        self._buffer: dict[TopicPartition, list[dict[str, Any]]] = {}
        self._offsets: dict[TopicPartition, int] = {}
        self._buffered = 0
        self._first_read = 0.0
        self._rejections = Rejections("exporter", log)
        self.rows_written = 0
        self.duplicates = 0

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:  # uncommitted: the partition's next owner reads them again
            self._buffered -= len(self._buffer.pop(tp, []))
            self._offsets.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then flush what is buffered and commit it."""
        kafka = self._config.kafka
        consumer = group_consumer(kafka, EXPORTER_GROUP, max_poll_records=20_000)
        consumer.subscribe([TopicNames(kafka.topic_prefix).cost_focus], listener=self)
        producer = BatchProducer.of(kafka, os.environ)  # dead letters only
        await producer.start()
        await consumer.start()
        observed = ConsumerMetrics(consumer, EXPORTER_GROUP, "exporter")
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
                await observed.after_fetch(batches)
                owned = consumer.assignment()  # a rebalance during after_fetch may have taken partitions away
                for tp, records in batches.items():
                    if tp in owned:
                        self._take(tp, records)
                if self._due():
                    await self._flush_and_commit(consumer, producer)
            await self._flush_and_commit(consumer, producer)
        finally:
            await consumer.stop()
            await producer.stop()

    def _take(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        if not self._offsets:
            self._first_read = time.monotonic()
        rows = self._buffer.setdefault(tp, [])
        before = len(rows)
        for record in records:
            try:
                rows.append(decode_row(record.value or b""))
            except SchemaError as exc:
                self._rejections.add(record, "invalid_focus_row", exc)
        self._buffered += len(rows) - before
        self._offsets[tp] = records[-1].offset + 1

    def _due(self) -> bool:
        settings = self._config.exporter
        return bool(self._offsets) and (self._buffered >= settings.max_rows_per_file
                                        or time.monotonic() - self._first_read >= settings.flush_seconds)

    async def _flush_and_commit(self, consumer: AIOKafkaConsumer, producer: BatchProducer) -> None:
        """Write the buffered rows and publish the dead letters, then commit what was read: nothing is committed
        before it is in a file or on `genai.deadletter`."""
        offsets, self._offsets = self._offsets, {}
        self.flush()
        await producer.send_all(TopicNames(self._config.kafka.topic_prefix).deadletter, self._rejections.take())
        await commit_processed(consumer, offsets, "exporter", log)

    def flush(self) -> None:
        """Write every buffered row not yet in the files; rebuild the rollups of the days touched."""
        if not self._buffered:
            return
        by_day: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for rows in self._buffer.values():
            for row in rows:
                by_day[partition_of(row)].append(row)
        for (period, day), rows in sorted(by_day.items()):
            fresh = self._ledger.new_rows(period, day, rows)
            self.duplicates += len(rows) - len(fresh)
            metrics.EXPORTER_DUPLICATES.inc(len(rows) - len(fresh))
            if not fresh:
                continue
            try:
                write_partition(self._root, period, day, fresh)
            except BaseException:
                self._ledger.forget(period, day, fresh)
                raise
            self.rows_written += len(fresh)
            metrics.EXPORTER_ROWS.inc(len(fresh))
            metrics.EXPORTER_FILES.inc()
            if self._config.exporter.rollup != "request":
                write_rollup(self._data_dir, self._config.exporter.rollup, period, day)
        self._buffer.clear()
        self._buffered = 0
        log.info("exporter: %d rows in files, %d duplicates dropped", self.rows_written, self.duplicates)
