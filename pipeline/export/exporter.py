"""The exporter: `genai.cost.focus` -> FOCUS Parquet files under the data dir.

At-least-once with dedupe: rows are buffered, written as whole files (atomically), and only
then are their offsets committed. A crash before the commit redelivers rows that are already
in files; the RowLedger drops them by x_RowId, so every row is in the files exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.export.files import RowLedger, focus_dir, partition_of, write_partition, write_rollup
from pipeline.kafka.consumer import group_consumer
from pipeline.observability import metrics
from pipeline.observability.consumers import ConsumerMetrics
from schemas.config import Config
from schemas.focus import decode_row
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
EXPORTER_GROUP = "spendstream-exporter"


class FocusExporter:
    def __init__(self, config: Config, data_dir: Path) -> None:
        self._config = config
        self._data_dir = data_dir
        self._root = focus_dir(data_dir)
        self._ledger = RowLedger(self._root)
        self._buffer: list[dict[str, Any]] = []
        self._first_buffered = 0.0
        self.rows_written = 0
        self.duplicates = 0
        self.invalid = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then flush what is buffered and commit it."""
        kafka = self._config.kafka
        consumer = group_consumer(kafka, EXPORTER_GROUP, TopicNames(kafka.topic_prefix).cost_focus,
                                  max_poll_records=20_000)
        await consumer.start()
        observed = ConsumerMetrics(consumer, EXPORTER_GROUP, "exporter")
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
                await observed.after_fetch(batches)
                for records in batches.values():
                    for record in records:
                        self._take(record.value, record.topic, record.partition, record.offset)
                if self._due():
                    self.flush()
                    await consumer.commit()
            self.flush()
            await consumer.commit()
        finally:
            await consumer.stop()

    def _take(self, value: bytes | None, topic: str, partition: int, offset: int) -> None:
        try:
            row = decode_row(value or b"")
        except ValueError as exc:
            self.invalid += 1
            metrics.EXPORTER_INVALID.inc()
            log.warning("exporter: skipping a message that is not a FOCUS row (%s[%d]@%d): %s",
                        topic, partition, offset, exc)
            return
        if not self._buffer:
            self._first_buffered = time.monotonic()
        self._buffer.append(row)

    def _due(self) -> bool:
        settings = self._config.exporter
        return bool(self._buffer) and (len(self._buffer) >= settings.max_rows_per_file
                                       or time.monotonic() - self._first_buffered >= settings.flush_seconds)

    def flush(self) -> None:
        """Write every buffered row not yet in the files; rebuild the rollups of the days touched."""
        if not self._buffer:
            return
        by_day: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for row in self._buffer:
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
        log.info("exporter: %d rows in files, %d duplicates dropped", self.rows_written, self.duplicates)
