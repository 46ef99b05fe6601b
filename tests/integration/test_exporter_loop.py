"""The exporter's event loop during a big flush, in-process on the real broker.

The flush is held in the writer thread (its `write_rows` waits for the test to let it go), so
what the loop does meanwhile is certain rather than a race: it keeps running, fetching and
heartbeating (the member outlives a session timeout without losing its partitions), and a
rebalance in the middle of the flush commits nothing the files do not hold, while the rows
written for a partition that moved are dropped by the row ledger when they come back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.export import exporter as exporter_module
from pipeline.export.exporter import EXPORTER_GROUP, FocusExporter
from pipeline.export.files import RowLedger, Written, write_rows
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import SESSION_TIMEOUT_MS
from pipeline.kafka.producer import BatchProducer
from schemas.config import Config, ExporterConfig, KafkaConfig
from schemas.topics import TopicNames
from tests.integration.focus_traffic import focus_messages, produce
from tests.support import read_topic

pytestmark = pytest.mark.integration
CALLS = 10_000  # 30,000 rows


class Exporter(FocusExporter):
    """The exporter, counting the rebalances that take partitions from it; with `flush_soon`, it flushes what it
    has at once (the tests run with flush_seconds of an hour, so that only they decide when the first flush is)."""

    def __init__(self, config: Config, data_dir: Path) -> None:
        super().__init__(config, data_dir)
        self.revocations = 0
        self.flush_soon = False
        #: rows read when the first flush was handed to the writer thread
        self.read_at_first_flush: int | None = None

    def _due(self) -> bool:
        return super()._due() or (self.flush_soon and bool(self._offsets))

    def _flush(self, consumer: AIOKafkaConsumer, producer: BatchProducer) -> Coroutine[Any, Any, None]:
        if self.read_at_first_flush is None:
            self.read_at_first_flush = self.rows_read
        return super()._flush(consumer, producer)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.revocations += bool(revoked)
        await super().on_partitions_revoked(revoked)


@dataclass
class HeldFlush:
    """Holds the first flush in the writer thread until `release` is set, and notes what the loop did meanwhile."""

    exporter: Exporter | None = None
    ticks: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    ticks_during: int = -1
    rows_read_during: int = -1
    held_rows: int = 0
    held_ids: set[str] = field(default_factory=set)

    def wrap(self, write_rows: Callable[[Path, Sequence[pa.Table], RowLedger], Written]) -> Callable[..., Written]:
        def held(root: Path, tables: Sequence[pa.Table], ledger: RowLedger) -> Written:
            if not self.started.is_set():
                assert self.exporter is not None
                # counted from the hand-off, not from here: the loop may fetch the rest before the thread gets here
                ticks, read = self.ticks, self.exporter.read_at_first_flush or 0
                self.held_rows = sum(t.num_rows for t in tables)
                self.held_ids = {row_id for t in tables for row_id in t.column("x_RowId").to_pylist()}
                self.started.set()
                self.release.wait(timeout=60)  # if the flush blocked the loop, nothing could set it
                self.ticks_during, self.rows_read_during = self.ticks - ticks, self.exporter.rows_read - read
            return write_rows(root, tables, ledger)
        return held

    async def probe(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1


@dataclass
class CommitCheck:
    """Checks every offset commit of the exporter's consumer against the files: each row below a committed offset
    must already be in a file."""

    data: Path
    ids_by_offset: dict[TopicPartition, list[str]]
    commits: int = 0
    uncovered: list[str] = field(default_factory=list)

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, broker: EmbeddedBroker, topics: TopicNames,
                data: Path) -> CommitCheck:
        ids: dict[TopicPartition, list[str]] = {}
        for record in sorted(read_topic(broker.bootstrap_servers, topics.cost_focus),
                             key=lambda r: (r.partition, r.offset)):
            ids.setdefault(TopicPartition(record.topic, record.partition), []).append(
                record.value.split(b'"x_RowId":"')[1].split(b'"')[0].decode())
        check = cls(data, ids)
        commit = AIOKafkaConsumer.commit

        async def checked(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int] | None = None) -> None:
            committed = offsets if offsets is not None else {
                tp: await consumer.position(tp) for tp in consumer.assignment()}
            in_files = ids_in_files(check.data)
            check.uncovered += [row_id for tp, offset in committed.items()
                                for row_id in check.ids_by_offset[tp][:offset] if row_id not in in_files]
            check.commits += 1
            await commit(consumer, offsets)

        monkeypatch.setattr(AIOKafkaConsumer, "commit", checked)
        return check

    def assert_covered(self) -> None:
        assert self.commits > 1
        assert len(self.uncovered) == 0, f"{len(self.uncovered)} rows committed before they were in a file"


def exporter_config(broker: EmbeddedBroker, topics: TopicNames, **exporter: Any) -> Config:
    return Config(kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix=topics.prefix),
                  exporter=ExporterConfig(flush_seconds=3600, **exporter))


def rows_in_files(data: Path) -> tuple[int, int]:
    files = [str(f) for f in (data / "focus" / "request").rglob("part-*.parquet")]
    if not files:
        return 0, 0
    with duckdb.connect() as con:
        result = con.execute("SELECT count(*), count(DISTINCT x_RowId) FROM read_parquet(?)", [files]).fetchone()
    assert result is not None
    return int(result[0]), int(result[1])


def ids_in_files(data: Path) -> set[str]:
    files = [str(f) for f in (data / "focus" / "request").rglob("part-*.parquet")]
    if not files:
        return set()
    with duckdb.connect() as con:
        return {str(row[0]) for row in con.execute("SELECT x_RowId FROM read_parquet(?)", [files]).fetchall()}


async def wait_for(condition: Callable[[], bool], what: str, running: asyncio.Task[None],
                   timeout_s: float = 120) -> None:
    """Wait until `condition` holds; fail with `what` after `timeout_s`, or at once if the exporter ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition() and loop.time() < deadline:
        if running.done():
            running.result()
            raise AssertionError(f"{what}: the exporter stopped")
        await asyncio.sleep(0.05)
    assert condition(), what


def test_the_loop_runs_fetches_and_heartbeats_while_a_big_flush_is_written(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = focus_messages(CALLS)
    produce(broker.bootstrap_servers, topics.cost_focus, messages)
    held = HeldFlush()
    monkeypatch.setattr(exporter_module, "write_rows", held.wrap(write_rows))
    commits = CommitCheck.install(monkeypatch, broker, topics, tmp_path / "data")
    # the first flush at 12,000 rows; room for all while it is held
    config = exporter_config(broker, topics, max_rows_per_file=12_000, max_buffered_rows=len(messages))

    async def scenario() -> Exporter:
        exporter = held.exporter = Exporter(config, tmp_path / "data")
        stop = asyncio.Event()
        probe = asyncio.create_task(held.probe())
        running = asyncio.create_task(exporter.run(stop))
        await asyncio.to_thread(held.started.wait, 60)
        assert held.started.is_set(), "no flush started"
        # held for longer than a session timeout: a member whose loop stood still would be thrown out
        await asyncio.sleep(1.5 * SESSION_TIMEOUT_MS / 1000)
        await wait_for(lambda: exporter.rows_read == len(messages), "the rest was not fetched during the flush",
                       running)
        held.release.set()
        await wait_for(lambda: exporter.rows_written == len(messages), "not every row was written", running)
        stop.set()
        await running
        probe.cancel()
        return exporter

    exporter = asyncio.run(scenario())
    assert held.ticks_during > 0, "the event loop stood still while the flush was written"
    assert held.rows_read_during > 0  # it kept fetching meanwhile (all of the rest, before the flush was let go)
    assert exporter.revocations == 0, "the member lost its partitions during the flush (missed heartbeats)"
    assert rows_in_files(tmp_path / "data") == (len(messages), len(messages))
    commits.assert_covered()


def test_a_rebalance_during_a_flush_commits_only_what_is_written_and_writes_nothing_twice(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the flush is held, a second member joins and takes a partition: the flush still writes every row it
    holds, but commits only the partition it kept. When the partition comes back, its rows are read again from
    its committed offset and the ledger drops them. At every commit, each committed offset is covered by the
    files."""
    messages = focus_messages(CALLS)
    produce(broker.bootstrap_servers, topics.cost_focus, messages)
    held = HeldFlush()
    monkeypatch.setattr(exporter_module, "write_rows", held.wrap(write_rows))
    data = tmp_path / "data"
    commits = CommitCheck.install(monkeypatch, broker, topics, data)
    # the first flush holds 20,000 of the 30,000 rows: some of each partition, whichever moves
    config = exporter_config(broker, topics, max_rows_per_file=20_000, max_buffered_rows=len(messages))

    async def scenario() -> Exporter:
        exporter = held.exporter = Exporter(config, data)
        stop = asyncio.Event()
        running = asyncio.create_task(exporter.run(stop))
        await asyncio.to_thread(held.started.wait, 60)
        assert held.started.is_set(), "no flush started"
        other = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False,
                                 group_id=f"{topics.prefix}{EXPORTER_GROUP}", session_timeout_ms=SESSION_TIMEOUT_MS,
                                 heartbeat_interval_ms=1000, auto_offset_reset="earliest")
        other.subscribe([topics.cost_focus])
        await other.start()
        await wait_for(lambda: bool(other.assignment()) and exporter.revocations > 0, "no rebalance", running)
        assert len(other.assignment()) == 1
        [moved] = other.assignment()
        assert held.held_ids & set(commits.ids_by_offset[moved]), "the flush holds no row of the partition that moved"
        held.release.set()
        await wait_for(lambda: exporter.rows_written >= held.held_rows, "the held flush was not written", running)
        await other.stop()  # the partition comes back, from its committed offset
        exporter.flush_soon = True
        await wait_for(lambda: rows_in_files(data)[1] == len(messages), "rows missing from the files", running)
        await wait_for(lambda: exporter.duplicates > 0, "the rows read again were not dropped", running)
        stop.set()
        await running
        return exporter

    exporter = asyncio.run(scenario())
    commits.assert_covered()
    assert rows_in_files(data) == (len(messages), len(messages))
    assert exporter.rows_written == len(messages)
