"""`spendstream run` keeps running: a killed role is started again, a dead broker is reported and replaced,
and no call the collector acknowledged is lost (or counted twice) through a kill or a clean stop.

Load: a client thread sends distinct model-call spans over OTLP/gRPC and, like an OTLP exporter,
sends a request again until it is acknowledged. A call counts as acknowledged once its request was.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import duckdb
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from schemas.focus import request_files_glob
from tests.e2e.running import read_until, spendstream_run
from tests.support import make_request, make_span

pytestmark = pytest.mark.e2e
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
CALLS_PER_REQUEST = 20


class AcknowledgedLoad:
    """Distinct calls in requests of CALLS_PER_REQUEST, each request sent until acknowledged."""

    def __init__(self, grpc_port: int) -> None:
        self._export = grpc.insecure_channel(f"localhost:{grpc_port}").unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self.acknowledged: set[str] = set()
        self.retries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            trace_id = os.urandom(16)
            spans = [make_span({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 100,
                                "gen_ai.usage.output_tokens": 10}, trace_id=trace_id) for _ in range(CALLS_PER_REQUEST)]
            payload = make_request(spans, {"service.name": "load", "team.name": "load"}).SerializeToString()
            while True:  # an unacknowledged request is sent again, as exporters do
                try:
                    self._export(payload, timeout=5)
                    break
                except grpc.RpcError:
                    if self._stop.is_set():
                        return  # never acknowledged: not counted
                    self.retries += 1
                    time.sleep(0.2)
            self.acknowledged.update(f"{trace_id.hex()}-{s.span_id.hex()}" for s in spans)
            time.sleep(0.05)

    def __enter__(self) -> AcknowledgedLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive()


def role_pid(metrics_port: int, role: str) -> int:
    """The pid of the `spendstream <role>` child serving metrics on `metrics_port`."""
    wanted = [role.encode(), b"--metrics-port", str(metrics_port).encode()]
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in args for w in wanted) and b"pipeline" in args:
            return int(entry.name)
    raise AssertionError(f"no {role} process on metrics port {metrics_port}")


def broker_pid(broker_port: int) -> int:
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"/") and b"broker" in cmdline and f":{broker_port}".encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no broker on port {broker_port}")


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
            return True
    except OSError:
        return False


def kill_and_wait_back(metrics_port: int, role: str, within_s: float = 10.0) -> None:
    """SIGKILL the role; the supervisor must have it serving again within `within_s` (the issue's bound)."""
    old = role_pid(metrics_port, role)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if role_pid(metrics_port, role) != old and answers(metrics_port):
                return
        except AssertionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{role} was not back within {within_s:g} s")


def calls_in_files(data: Path, ids: set[str]) -> tuple[int, int]:
    """(distinct acknowledged calls in the files, rows of those calls minus distinct row ids: 0 if none twice)."""
    if not list((data / "focus" / "request").rglob("*.parquet")):
        return 0, 0
    with duckdb.connect() as con:
        con.execute("CREATE TEMP TABLE ids (id VARCHAR)")
        con.executemany("INSERT INTO ids VALUES (?)", [[i] for i in ids])
        found = con.execute(
            f"SELECT count(DISTINCT x_UsageId), count(*) - count(DISTINCT x_RowId) FROM read_parquet('"
            f"{request_files_glob(data)}', hive_partitioning = true) WHERE x_UsageId IN (SELECT id FROM ids)"
        ).fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def wait_in_files(data: Path, ids: set[str], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    found = (0, 0)
    while time.monotonic() < deadline:
        found = calls_in_files(data, ids)
        if found[0] == len(ids):
            break
        time.sleep(1)
    assert found == (len(ids), 0), f"{found[0]} of {len(ids)} acknowledged calls in the files, {found[1]} rows twice"


def test_killed_roles_come_back_and_no_acknowledged_call_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with spendstream_run(data, tmp_path / "run.log") as run, AcknowledgedLoad(run.grpc_port) as load:
        time.sleep(3)
        for role, port in (("worker", run.metrics_port + 1), ("exporter", run.metrics_port + 2),
                           ("collector", run.metrics_port)):
            kill_and_wait_back(port, role)
            time.sleep(3)  # traffic while it catches up
        assert run.process.poll() is None
    output = (tmp_path / "run.log").read_text()
    for role in ("worker-1", "exporter", "collector"):
        assert f"spendstream: {role} was killed by SIGKILL; starting it again" in output
    assert len(load.acknowledged) > 500
    wait_in_files(data, load.acknowledged)


def test_a_clean_stop_under_load_keeps_every_acknowledged_call(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with spendstream_run(data, tmp_path / "run.log") as run:
        load = AcknowledgedLoad(run.grpc_port).__enter__()
        deadline = time.monotonic() + 60  # a loaded machine acknowledges 60 calls in the 5 s a quiet one needs
        while len(load.acknowledged) <= 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        # the context's exit is Ctrl-C under load: the collector stops first, the rest drains
    load.__exit__()  # its last request is unacknowledged now: the collector is gone, and it does not count
    assert len(load.acknowledged) > 200
    found = calls_in_files(data, load.acknowledged)
    assert found == (len(load.acknowledged), 0), f"{found[0]} of {len(load.acknowledged)} in the files"


def test_a_dead_broker_is_reported_at_once_and_replaced(tmp_path: Path) -> None:
    data = tmp_path / "data"
    output = tmp_path / "run.log"
    with spendstream_run(data, output) as run:
        killed_at = time.monotonic()
        os.kill(broker_pid(run.broker_port), signal.SIGKILL)
        read_until(run.process, output, "spendstream: the embedded broker was killed by SIGKILL", timeout_s=5)
        assert time.monotonic() - killed_at < 5
        read_until(run.process, output, "a new embedded broker is running", timeout_s=60)
        with AcknowledgedLoad(run.grpc_port) as load:
            time.sleep(3)
        wait_in_files(data, load.acknowledged)
        assert run.process.poll() is None

