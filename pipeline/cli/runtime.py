"""`spendstream run`: the whole pipeline on one machine, each role in its own process.

Start order is downstream first: broker, topics, workers, then the collector that feeds
them. Stop is the reverse. A child that dies takes the whole run down with a clear line,
rather than leaving a half-working pipeline behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli.breaker_keeper import BreakerKeeper, restore_breakers
from pipeline.kafka.broker import BrokerError, EmbeddedBroker, port_is_free
from pipeline.kafka.topics import ensure_topics
from schemas.config import Config

STATUS_EVERY_S = 5.0
#: how long a clean stop waits for each stage to read what the broker holds
DRAIN_TIMEOUT_S = 30.0
LAG_REPORT_S = 1.5


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]


def _check_ports(config: Config, workers: int) -> None:
    """Fail before starting anything when a port is taken, naming the flag that changes it."""
    wanted = [(config.collector.grpc_port, "--grpc-port"), (config.collector.http_port, "--http-port")]
    wanted += [(config.metrics.port + i, "--metrics-port") for i in range(workers + 2)]
    for port, flag in wanted:
        if port and not port_is_free("0.0.0.0", port):
            raise BrokerError(f"port {port} is taken; change it with {flag}")


def _spawn(name: str, args: list[str], log_dir: Path) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    out = (log_dir / f"{name}.log").open("ab")
    # a session of its own: Ctrl-C reaches the supervisor only, which stops the roles in drain order
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    out.close()  # the child holds its own descriptor
    return Child(name, process)


def _stop(children: list[Child], timeout_s: float = 15.0) -> None:
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in reversed(children):
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def _wait_drained(ports: list[int], timeout_s: float) -> bool:
    """Wait until the consumers behind these metrics ports have read everything the broker holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scraped = [_scrape(port) for port in ports]
        if all(s and s.get("spendstream_consumer_lag", 0.0) == 0.0 for s in scraped):
            return True
        time.sleep(0.5)
    return False


def _drain(children: list[Child], config: Config, workers: int) -> None:
    """Stop downstream last, so a clean stop loses nothing the collector acknowledged: the collector stops
    taking spans, the workers finish what the broker holds, then the exporter writes it to the files."""
    by_name = {child.name: child for child in children}
    port = config.metrics.port
    if "collector" in by_name:
        _stop([by_name["collector"]])
    _wait_drained([port + 1 + i for i in range(workers)], DRAIN_TIMEOUT_S)
    time.sleep(LAG_REPORT_S)  # lag is reported once a second: the last batches' output reaches the exporter
    _stop([c for c in children if c.name.startswith("worker-")])
    if "exporter" in by_name:
        _wait_drained([port + 1 + workers], DRAIN_TIMEOUT_S)
        _stop([by_name["exporter"]])


def run_all(config: Config, *, workers: int, data_dir: Path, broker_port: int | None,
            config_path: str | None, log_level: str) -> int:
    """Run until Ctrl-C or SIGTERM; returns the exit code."""
    if workers < 1:
        raise BrokerError("--workers must be at least 1")
    _check_ports(config, workers)
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    broker = None
    if broker_port is not None:
        broker = EmbeddedBroker(broker_port, log_file=logs / "broker.log")
        broker.start()
    if broker is not None:
        config = replace(config, kafka=replace(config.kafka, bootstrap_servers=broker.bootstrap_servers))
    bootstrap = config.kafka.bootstrap_servers
    children: list[Child] = []
    keeper: BreakerKeeper | None = None
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        asyncio.run(ensure_topics(config.kafka, os.environ))
        if broker is not None:  # the embedded broker starts empty: the breakers in force come back from disk
            restore_breakers(config.kafka, data_dir)
            keeper = BreakerKeeper(config.kafka, data_dir)
            keeper.start()
        common = ["--kafka", bootstrap, "--log-level", log_level]
        if config_path:
            common += ["--config", config_path]
        for i in range(workers):
            children.append(_spawn(f"worker-{i + 1}", [
                "worker", *common, "--data-dir", str(data_dir), "--metrics-port", str(config.metrics.port + 1 + i),
            ], logs))
        children.append(_spawn("exporter", [
            "exporter", *common, "--data-dir", str(data_dir), "--metrics-port", str(config.metrics.port + 1 + workers),
        ], logs))
        children.append(_spawn("collector", [
            "collector", *common, "--host", config.collector.host, "--grpc-port", str(config.collector.grpc_port),
            "--http-port", str(config.collector.http_port), "--metrics-port", str(config.metrics.port),
        ], logs))
        _print_endpoints(config, bootstrap, broker is not None, workers, data_dir)
        last_status, next_status = "", time.monotonic() + STATUS_EVERY_S
        while not stopping:
            if time.monotonic() >= next_status:
                status = _flow_status(config.metrics.port, workers)
                if status and status != last_status:
                    print(status, flush=True)
                    last_status = status
                next_status = time.monotonic() + STATUS_EVERY_S
            for child in children:
                code = child.process.poll()
                if code is not None:
                    print(f"spendstream: {child.name} exited with code {code}; see {logs / child.name}.log",
                          file=sys.stderr)
                    return 1
            time.sleep(0.2)
        print("stopping…", flush=True)
        _drain(children, config, workers)
        return 0
    finally:
        _stop(children)
        if keeper is not None:
            keeper.stop()
        if broker is not None:
            broker.stop()


def _scrape(port: int) -> dict[str, float]:
    """Sum of each sample name on a local metrics endpoint; empty if it does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            outcome = sample.labels.get("outcome")
            key = f"{sample.name}:{outcome}" if outcome else sample.name
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _flow_status(metrics_port: int, workers: int) -> str:
    """One line on what flowed so far, read from the roles' own metrics."""
    collector = _scrape(metrics_port)
    if not collector:
        return ""
    worker_totals = [_scrape(metrics_port + 1 + i) for i in range(workers)]
    priced = sum(w.get("spendstream_worker_usage_priced_total", 0.0) for w in worker_totals)
    unpriced = sum(w.get("spendstream_worker_usage_unpriced_total", 0.0) for w in worker_totals)
    in_files = _scrape(metrics_port + 1 + workers).get("spendstream_exporter_rows_total", 0.0)
    alerts = sum(w.get("spendstream_alerts_total", 0.0) for w in worker_totals)
    commands = sum(w.get("spendstream_breaker_commands_total", 0.0) for w in worker_totals)
    received = collector.get("spendstream_collector_spans_received_total", 0.0)
    published = collector.get("spendstream_collector_usage_events_published_total", 0.0)
    rejected = sum(v for k, v in collector.items() if k.startswith("spendstream_collector_spans_total:rejected"))
    unallocated = collector.get("spendstream_collector_spans_total:unallocated", 0.0)
    if not received:
        return ""
    return (f"flow: {received:,.0f} spans received → {published:,.0f} model calls on Kafka "
            f"({unallocated:,.0f} unallocated, {rejected:,.0f} rejected) → "
            f"{priced:,.0f} priced ({unpriced:,.0f} unpriced → genai.deadletter) → {in_files:,.0f} FOCUS rows "
            f"in files; {alerts:,.0f} alerts, {commands:,.0f} breaker commands")


def _print_endpoints(config: Config, bootstrap: str, embedded: bool, workers: int, data_dir: Path) -> None:
    m = config.metrics.port
    lines = [
        "spendstream is running",
        f"  OTLP/gRPC    localhost:{config.collector.grpc_port}   (OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:"
        f"{config.collector.grpc_port})",
        f"  OTLP/HTTP    http://localhost:{config.collector.http_port}/v1/traces",
        f"  Kafka        {bootstrap}{'   (embedded broker, in memory)' if embedded else ''}",
        f"  metrics      http://localhost:{m}/metrics (collector)"
        + "".join(f", :{m + 1 + i} (worker-{i + 1})" for i in range(workers)) + f", :{m + 1 + workers} (exporter)",
        f"  FOCUS files  {data_dir / 'focus'}   (spendstream report --data-dir {data_dir})",
        f"  data, logs   {data_dir}",
        "  breakers     spendstream breaker list --kafka " + bootstrap,
        "try it:        spendstream demo      stop: Ctrl-C",
    ]
    print("\n".join(lines), flush=True)
