"""The exporter under a burst: 300k FOCUS rows already on the topic when it starts. Its memory is bounded by
`exporter.max_buffered_rows`, not by the burst, and every row is in the files once.

The bound (docs/architecture.md, "The exporter"): with the defaults (max_buffered_rows 100,000), the exporter
process's peak resident memory (VmHWM) stays under PEAK_RSS_MIB. Before the rows were held as Arrow tables
the same run peaked at 1,787 MiB and kept it (FOCUS 1.4 rows): each buffered row was a Python dict of ~7.6 KB, up to
200,000 of them (exporter.max_rows_per_file) plus a fetch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from pipeline.kafka.broker import EmbeddedBroker
from schemas.config import ExporterConfig
from tests.conftest import new_topics
from tests.integration.focus_traffic import focus_messages, memory_mib, produce
from tests.integration.roles import role
from tests.support import free_port, metric

pytestmark = pytest.mark.integration
CALLS = 100_000  # 3 rows a call
MAX_BUFFERED_ROWS = 100_000  # the default
#: the interpreter and its libraries (~110 MiB), a full buffer (100,000 x ~620 B), the records waiting to be packed
#: (up to ~7,000 x ~3.3 KB) and a batch of decoded rows (2,048 x ~5 KB), the row ids of 300k rows, and the
#: allocators' slack; measured 297-380 MiB on 2 shared cores. It was 461-522 while DuckDB parsed the rows (~60 MiB of
#: its own), and 648-662 while every parse read x_SampleAdjustedCount apart and parses took turns between the
#: default executor's threads, each keeping a DuckDB connection
PEAK_RSS_MIB = 560


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A broker of its own: the burst (~700 MB of rows before compression) is gone with it."""
    embedded = EmbeddedBroker(free_port(), log_file=tmp_path_factory.mktemp("broker") / "broker.log")
    embedded.start()
    yield embedded
    embedded.stop()


def test_a_burst_of_300k_rows_stays_under_the_memory_bound(own_broker: EmbeddedBroker, tmp_path: Path) -> None:
    assert ExporterConfig().max_buffered_rows == MAX_BUFFERED_ROWS
    topics = new_topics(own_broker.bootstrap_servers)
    messages = focus_messages(CALLS)
    want = len(messages)
    produce(own_broker.bootstrap_servers, topics.cost_focus, messages)
    del messages
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n")
    port = free_port()
    exporter = role("exporter", own_broker, config, tmp_path, port)
    try:
        written = 0.0
        most_held = 0.0
        deadline = time.monotonic() + 300
        while written < want and time.monotonic() < deadline:
            assert exporter.poll() is None, (tmp_path / "exporter.log").read_text()[-3000:]
            time.sleep(0.2)
            try:
                written = metric(port, "spendstream_exporter_rows_total")
                most_held = max(most_held, metric(port, "spendstream_exporter_buffered_rows"))
            except OSError:
                continue
        rss, peak = memory_mib(exporter.pid)
        print(f"exporter: {written:.0f} rows written, RSS now {rss:.0f} MiB, peak {peak:.0f} MiB")
        assert written == want, (tmp_path / "exporter.log").read_text()[-3000:]
        assert peak < PEAK_RSS_MIB, f"peak RSS {peak:.0f} MiB"
        assert 0 < most_held <= MAX_BUFFERED_ROWS
    finally:
        exporter.terminate()
        exporter.wait(timeout=60)
    files = str(tmp_path / "data" / "focus" / "request" / "*" / "*" / "part-*.parquet")
    with duckdb.connect() as con:
        [(rows, distinct)] = con.execute(f"SELECT count(*), count(DISTINCT x_RowId) FROM read_parquet('{files}')"
                                         ).fetchall()
    assert rows == distinct == want
