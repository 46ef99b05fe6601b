"""The exporter: rows/s from `genai.cost.focus` into Parquet files, and the memory of its row-id dedupe.

Both are measured in this run, against a baseline of the same run:
  throughput  `spendstream exporter` processes of two source trees (--base, default `main`, extracted with
              `git archive`; and this tree) each draining the same rows from its own topics on one embedded
              broker, timed from its start to its last row written (start-up included, the same for both):
              rows/s, and rows a CPU second of the exporter process (what a shared machine's load does not
              skew), also counted from its first fetch on (start-up left out: interpreter, imports and group join
              take ~1.5 CPU s, a fifth of the whole at 150k rows); rounds alternate base and head, so that the
              load hits both alike
  dedupe      the row ids of --rows-per-day rows arriving flush by flush (--flush-s apart): as the exporter
              held them before (a set of id strings a day) and as it holds them now (`DayIds`), tracemalloc
              after the day and at its peak; the exporter keeps LEDGER_DAYS days
Prints the ratios and writes bench/results/export.svg.

    .venv/bin/python bench/export.py [--rows 150000] [--rounds 2] [--base main] [--rows-per-day 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.chart import bar_chart
from pipeline.export.files import LEDGER_DAYS, DayIds
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from pipeline.pricing.dedupe import id_hash
from schemas.config import KafkaConfig
from schemas.topics import TopicNames
from tests.integration.focus_traffic import focus_messages, produce
from tests.support import free_port, metric

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METERS = ("input_tokens", "cache_read_tokens", "output_tokens")
#: messages the exporter has fetched
FETCHED = 'spendstream_batch_messages_sum{stage="exporter"}'


def source_tree(ref: str, into: Path) -> Path:
    """The files of `ref` of this repository, extracted under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(tree: Path, broker: EmbeddedBroker, messages: list[tuple[bytes, bytes]],
          work: Path) -> tuple[float, float, float]:
    """(rows/s, rows a CPU second, rows a CPU second after start-up) of one `spendstream exporter` of `tree`
    draining `messages` from topics of its own, from its start (interpreter, imports and group join included: the
    same for both trees) to its last row written; the third from the first poll that finds a fetch done, the rows
    of that fetch left out. The CPU figures do not depend much on what else the machine runs."""
    topics = TopicNames(f"bench{time.time_ns()}.")
    asyncio.run(ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix=topics.prefix,
                                          partitions=2), {}))
    produce(broker.bootstrap_servers, topics.cost_focus, messages)
    config = work / f"{topics.prefix}yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n")
    port = free_port()
    log = (work / f"{topics.prefix}log").open("wb")
    started = time.monotonic()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "exporter", "--kafka", broker.bootstrap_servers, "--config", str(config),
         "--data-dir", str(work / topics.prefix), "--metrics-port", str(port)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        written = 0.0
        fetched_at: tuple[float, float] | None = None  # (messages fetched, CPU seconds) at the first fetch seen
        deadline = time.monotonic() + 900
        while written < len(messages):
            if exporter.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"exporter of {tree} stopped at {written:.0f} rows: see {log.name}")
            time.sleep(0.1)  # each scrape costs the exporter CPU too
            try:
                if fetched_at is None and (fetched := metric(port, FETCHED)):
                    fetched_at = fetched, cpu_s(exporter.pid)
                written = metric(port, "spendstream_exporter_rows_total")
            except OSError:
                continue
        cpu = cpu_s(exporter.pid)
        assert fetched_at is not None
        return (written / (time.monotonic() - started), written / cpu,
                (written - fetched_at[0]) / (cpu - fetched_at[1]))
    finally:
        exporter.terminate()
        exporter.wait(timeout=60)


def row_id(row: int) -> str:
    """An x_RowId as the pricing stage makes them (usage id / meter), 3 rows a call."""
    call = row // 3
    return f"{call:032x}-{call * 7919 % 2**64:016x}/{METERS[row % 3]}"


def held(fill: Callable[[range], object], rows: int, per_flush: int) -> tuple[float, float]:
    """(bytes an id after the day, at the day's peak) of what `fill` keeps of the ids of `rows`, flush by flush."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for start in range(0, rows, per_flush):
            fill(range(start, min(start + per_flush, rows)))
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (now - base) / rows, (peak - base) / rows


def dedupe_memory(rows_per_day: int, flush_s: float) -> dict[str, tuple[float, float]]:
    per_flush = max(1, round(rows_per_day * flush_s / 86_400))
    old: set[str] = set()
    new = DayIds(np.empty(0, np.int64))

    def fill_old(rows: range) -> None:  # the exporter's RowLedger before: a set of the id strings a day
        old.update(row_id(row) for row in rows)

    def fill_new(rows: range) -> None:  # now: 64-bit hashes in sorted arrays, a flush's at once
        new.add(np.fromiter((id_hash(row_id(row)) for row in rows), np.int64))

    return {"set of id strings (before)": held(fill_old, rows_per_day, per_flush),
            "DayIds (now)": held(fill_new, rows_per_day, per_flush)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=150_000, help="FOCUS rows each exporter drains")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", default="main", help="git ref of the baseline exporter")
    parser.add_argument("--rows-per-day", type=int, default=1_000_000)
    parser.add_argument("--flush-s", type=float, default=5.0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    memory = dedupe_memory(args.rows_per_day, args.flush_s)
    print(f"row-id dedupe, {args.rows_per_day:,} rows a day flushed every {args.flush_s:g} s "
          f"(the exporter keeps {LEDGER_DAYS} days):")
    for name, (after, peak) in memory.items():
        print(f"  {name:28} {after:6.1f} B/id after the day, {peak:6.1f} B/id at its peak, "
              f"{after * args.rows_per_day * LEDGER_DAYS / 2**20:7.1f} MiB for {LEDGER_DAYS} days")
    (old_after, _), (new_after, _) = memory.values()
    print(f"  ratio: {old_after / new_after:.1f}x less")
    chart = {f"dedupe B/id: {name}": after for name, (after, _) in memory.items()}

    if not args.skip_throughput:
        messages = focus_messages(args.rows // 3)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            base = source_tree(args.base, work / "base")
            broker = EmbeddedBroker(free_port(), log_file=work / "broker.log")
            broker.start()
            try:
                rates: dict[str, list[tuple[float, float, float]]] = {args.base: [], "this tree": []}
                for round_ in range(args.rounds):
                    for name, tree in ((args.base, base), ("this tree", ROOT)):
                        rate, per_cpu_s, steady = drain(tree, broker, messages, work)
                        rates[name].append((rate, per_cpu_s, steady))
                        print(f"round {round_ + 1}: exporter of {name}: {rate:,.0f} rows/s, "
                              f"{per_cpu_s:,.0f} rows a CPU second, {steady:,.0f} after start-up "
                              f"({1e6 / steady:.1f} µs a row)")
            finally:
                broker.stop()
        for label, index in (("rows/s", 0), ("rows a CPU second", 1), ("rows a CPU second after start-up", 2)):
            best = {name: max(value[index] for value in values) for name, values in rates.items()}
            print(f"exporter {label}, best of {args.rounds}: {args.base} {best[args.base]:,.0f}, "
                  f"this tree {best['this tree']:,.0f}: {best['this tree'] / best[args.base]:.2f}x")
            chart |= {f"exporter {label}: {name}": rate for name, rate in best.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.svg").write_text(bar_chart("Exporter (this run)", chart))


if __name__ == "__main__":
    main()
