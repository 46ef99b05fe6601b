"""`spendstream run` and `spendstream demo` as subprocesses, for the end-to-end tests that need both."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SPENDSTREAM = [sys.executable, "-m", "pipeline"]
#: metrics ports `spendstream run --workers 1` takes from --metrics-port on: collector, worker, exporter
METRICS_PORTS = 3


def spendstream(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI from this work tree (also from another working directory), with `env` added to the environment."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*SPENDSTREAM, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=environ, cwd=cwd)


@dataclass(frozen=True)
class RunningPipeline:
    process: subprocess.Popen[str]
    banner: str
    grpc_port: int
    broker_port: int
    metrics_port: int  # the collector's; the worker's is +1, the exporter's +2
    authz_port: int  # its /metrics too

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


def read_until(process: subprocess.Popen[str], output: Path, marker: str, timeout_s: float) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = output.read_text()
        if marker in seen:
            return seen
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} in output:\n{seen}")


@contextmanager
def spendstream_run(data_dir: Path, output: Path, *extra: str) -> Iterator[RunningPipeline]:
    """`spendstream run` on free ports, up to its banner; stopped with Ctrl-C on exit, which must exit 0."""
    ports = {flag: free_port() for flag in ("--broker-port", "--grpc-port", "--http-port")}
    metrics_port, authz_port = free_port(METRICS_PORTS), free_port(2)  # authz: HTTP, then Envoy's gRPC
    with output.open("w") as out:
        run = subprocess.Popen(
            [*SPENDSTREAM, "run", "--data-dir", str(data_dir), "--metrics-port", str(metrics_port),
             "--authz-port", str(authz_port), *extra,
             *[x for flag, port in ports.items() for x in (flag, str(port))]],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        banner = read_until(run, output, "try it:", timeout_s=60)
        yield RunningPipeline(run, banner, ports["--grpc-port"], ports["--broker-port"], metrics_port, authz_port)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 0  # the drain may wait for a role restarted just before
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def demo(pipeline: RunningPipeline, duration_s: float, history_s: float = 0,
         otel_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`spendstream demo` against the pipeline (no replayed history unless asked); with `otel_env`, the endpoint
    comes from those OTEL_EXPORTER_OTLP_* variables instead of --endpoint."""
    target = [] if otel_env else ["--endpoint", f"localhost:{pipeline.grpc_port}"]
    done = spendstream("demo", *target, "--duration", f"{duration_s:g}", "--rate", "40", "--history",
                       f"{history_s:g}", timeout=180, env=otel_env)
    assert done.returncode == 0, done.stderr
    return done


def run_demo(pipeline: RunningPipeline, duration_s: float, otel_env: dict[str, str] | None = None) -> int:
    """Send demo traffic to the pipeline; returns how many model calls the demo sent."""
    done = demo(pipeline, duration_s, otel_env=otel_env)
    sent = re.search(r"sent (\d+) model calls", done.stdout)
    assert sent, done.stdout
    return int(sent.group(1))
