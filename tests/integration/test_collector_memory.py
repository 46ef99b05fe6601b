"""A collector process under 16 parallel gzip bombs: every one is refused (413) and its memory stays bounded.

The bound (docs/architecture.md, "The edge"): with the default limits (16 MiB a request,
64 MiB in flight), the collector's peak resident memory during the bombs stays under
RSS before + PEAK_GROWTH_MIB, and after them under RSS before + AFTER_GROWTH_MIB.
Measured (2 cores, Python 3.11): before 64 MiB, peak 86 MiB, after 64 MiB. Before the fix the
same run peaked at 254 MiB and kept 97-119 MiB: each refused body stayed alive in a reference
cycle (exception → traceback → frame → body) until the garbage collector ran.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from pipeline.kafka.broker import EmbeddedBroker
from schemas.topics import TopicNames
from tests import otlp_wire as wire
from tests.dialects import DIALECTS
from tests.support import free_port, make_request, make_span

pytestmark = pytest.mark.integration
PARALLEL_BOMBS = 16
#: Peak growth allowed while 16 bombs of 1 GiB each are answered: the in-flight limit (64 MiB) plus
#: zlib windows and 16 connections' buffers.
PEAK_GROWTH_MIB = 96
#: What may stay resident afterwards (allocator arenas).
AFTER_GROWTH_MIB = 16


@cache
def gzip_bomb() -> bytes:
    return wire.gzip_bomb(1 << 30)


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB: resident now, and the peak so far."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf", **headers})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def collector_process(broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path) -> Iterator[tuple[int, int]]:
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n")
    http_port = free_port()
    log = (tmp_path / "collector.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "collector", "--kafka", broker.bootstrap_servers, "--config", str(config),
         "--grpc-port", str(free_port()), "--http-port", str(http_port), "--metrics-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                post(http_port, b"", {})
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "collector.log").read_text()
                assert time.monotonic() < deadline, "collector did not start"
                time.sleep(0.2)
        yield process.pid, http_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_16_parallel_bombs_are_refused_and_memory_stays_bounded(collector_process: tuple[int, int]) -> None:
    pid, port = collector_process
    good = make_request([make_span(DIALECTS[0].attrs) for _ in range(200)]).SerializeToString()
    for _ in range(20):  # warm up: the normal path has run, so its caches are in the baseline
        assert post(port, good, {}) == 200
    before, _ = memory_mib(pid)
    bomb = gzip_bomb()
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(post(port, bomb, {"Content-Encoding": "gzip"})))
               for _ in range(PARALLEL_BOMBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert answers == [413] * PARALLEL_BOMBS
    assert post(port, good, {}) == 200
    after, peak = memory_mib(pid)
    print(f"collector RSS: before {before:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB "
          f"({PARALLEL_BOMBS} parallel 1 GiB gzip bombs of {len(bomb) / 1e6:.1f} MB)")
    assert peak - before < PEAK_GROWTH_MIB
    assert after - before < AFTER_GROWTH_MIB
    assert os.path.exists(f"/proc/{pid}")
