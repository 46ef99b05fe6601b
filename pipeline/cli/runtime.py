"""`spendstream run`: the whole pipeline on one machine, each role in its own process, supervised.

Start order is downstream first: broker, topics, workers, `spendstream authz` (gateways ask
it on --authz-port, Envoy on the next port), then the collector that feeds them. A role that
dies is started again after a backoff (1 s, doubling to 30 s; back to 1 s once it has run a
minute), with a line saying which role, why and where its log is: what the broker holds is
read again from the committed offsets, so nothing the collector acknowledged
is lost. The embedded broker is watched too: it keeps everything in memory, so when it dies
the run says so at once, starts a new one on the same port, creates the topics, publishes the
breakers in force again and restarts every role (calls acknowledged but not yet in the files
are lost with it: docs/architecture.md, "Supervision"). Ctrl-C drains: the collector stops first, the workers
and the exporter finish what the broker holds, the broker stops last. Each role logs to
`<data-dir>/logs/<role>.log`, rotated at 10 MB (3 kept).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Final

from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli.breaker_keeper import BreakerKeeper, restore_breakers
from pipeline.cli.startup import notice
from pipeline.export.exporter import EXPORTER_GROUP
from pipeline.guardrails.stage import GUARDRAILS_GROUP
from pipeline.kafka.broker import BrokerError, EmbeddedBroker, port_is_free
from pipeline.kafka.consumer import unread
from pipeline.kafka.topics import ensure_topics
from pipeline.pricing.stage import PRICING_GROUP
from schemas.config import Config
from schemas.topics import TopicNames

STATUS_EVERY_S = 5.0
#: how long a clean stop waits for the stages to get through what the broker holds (a role restarted just before
#: needs ~15 s to rejoin its group while the broker expires the dead member)
DRAIN_TIMEOUT_S = 90.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
#: a role that ran this long before it died starts again after FIRST_BACKOFF_S
STABLE_AFTER_S = 60.0
#: the embedded broker dying this many times within STABLE_AFTER_S stops the run: something is wrong with it
BROKER_DEATHS_TO_STOP = 3
#: `spendstream authz`'s default HTTP port (`run --authz-port`); its Envoy gRPC port is the next one
AUTHZ_PORT: Final = 9480


def next_backoff(backoff_s: float, ran_for_s: float) -> float:
    """The wait before restarting a role that died after running `ran_for_s`, given the last wait. Pure."""
    if ran_for_s >= STABLE_AFTER_S:
        return FIRST_BACKOFF_S
    return min(backoff_s * 2, MAX_BACKOFF_S)


def exit_reason(code: int) -> str:
    """`Popen.returncode` in words: a negative code is the signal that killed the process. Pure."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(slots=True)
class Child:
    """A supervised role: its command line, the running process, and when to start it again after a crash."""
    name: str
    args: list[str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S / 2  # doubled before the first restart
    restart_at_s: float | None = None
    restarts: int = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the role writes its own rotated log (--log-file); stdout/stderr get only what bypasses logging
        with (self.log_dir / f"{self.name}.out").open("ab") as out:
            # a session of its own: Ctrl-C reaches the supervisor only, which stops the roles in drain order
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline", *self.args, "--log-file", str(self.log)],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_s = time.monotonic()
        self.restart_at_s = None

    def supervise(self, now_s: float) -> None:
        """Notice a crash (and schedule the restart), or restart when the backoff is over."""
        if self.process is None:
            if self.restart_at_s is not None and now_s >= self.restart_at_s:
                self.restarts += 1
                self.start()
                notice(f"{self.name} started again (restart {self.restarts})")
            return
        code = self.process.poll()
        if code is None:
            return
        self.process = None
        self.backoff_s = next_backoff(self.backoff_s, now_s - self.started_s)
        self.restart_at_s = now_s + self.backoff_s
        notice(f"{self.name} {exit_reason(code)}; starting it again in {self.backoff_s:g} s "
               f"(see {self.log})")


def _check_ports(config: Config, workers: int, authz_port: int) -> None:
    """Fail before starting anything when a port is taken, naming the flag that changes it."""
    wanted = [(config.collector.grpc_port, "--grpc-port"), (config.collector.http_port, "--http-port")]
    wanted += [(config.metrics.port + i, "--metrics-port") for i in range(workers + 2)]
    wanted += [(authz_port, "--authz-port"), (authz_port + 1, "--authz-port")]
    for port, flag in wanted:
        if port and not port_is_free("0.0.0.0", port):
            raise BrokerError(f"port {port} is taken; change it with {flag}")


def _stop(children: list[Child], timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; a stopped role is not started again."""
    running = [c.process for c in reversed(children) if c.process is not None]
    for child in children:
        child.process = child.restart_at_s = None
    for process in running:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _unread(config: Config) -> int:
    """Records the stages have not committed yet: usage not priced, spend not added, rows not in the files."""
    names = TopicNames(config.kafka.topic_prefix)

    async def count() -> int:
        return sum(await asyncio.gather(unread(config.kafka, PRICING_GROUP, names.usage),
                                        unread(config.kafka, GUARDRAILS_GROUP, names.spend),
                                        unread(config.kafka, EXPORTER_GROUP, names.cost_focus)))

    return asyncio.run(count())


def _drain(children: list[Child], config: Config) -> None:
    """Stop downstream last, so a clean stop loses nothing the collector acknowledged: the collector stops
    taking spans, then the workers and the exporter run (and are restarted if they die) until every stage has
    committed what the broker holds — the exporter commits only what is in the files — and stop."""
    _stop([c for c in children if c.name == "collector"])
    rest = [c for c in children if c.name != "collector"]
    try:
        left = _wait_drained(rest, config)
    except KafkaError as exc:  # nothing more can be drained from a broker that is gone
        notice(f"cannot drain, the broker does not answer ({exc})")
    else:
        if left:
            notice(f"stopped with {left:,} records not yet through (waited {DRAIN_TIMEOUT_S:g} s); "
                   "with the embedded broker they are lost")
    _stop(rest)


def _wait_drained(roles: list[Child], config: Config) -> int:
    """Keep the roles running until nothing is left unread or DRAIN_TIMEOUT_S passed; returns what is left."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    left, said = _unread(config), 0.0
    while left and time.monotonic() < deadline:
        if time.monotonic() - said >= STATUS_EVERY_S:
            print(f"draining: {left:,} records not yet through the workers and the exporter", flush=True)
            said = time.monotonic()
        for role in roles:
            role.supervise(time.monotonic())
        time.sleep(0.5)
        left = _unread(config)
    return left


def _roles(config: Config, *, workers: int, data_dir: Path, config_path: str | None, log_level: str,
           log_format: str, authz_port: int) -> list[Child]:
    """The roles in start order (downstream first)."""
    logs = data_dir / "logs"
    common = ["--kafka", config.kafka.bootstrap_servers, "--log-level", log_level, "--log-format", log_format]
    if config_path:
        common += ["--config", config_path]
    port = config.metrics.port
    roles = [Child(f"worker-{i + 1}", ["worker", *common, "--data-dir", str(data_dir),
                                       "--metrics-port", str(port + 1 + i)], logs) for i in range(workers)]
    roles.append(Child("exporter", ["exporter", *common, "--data-dir", str(data_dir),
                                    "--metrics-port", str(port + 1 + workers)], logs))
    roles.append(Child("authz", ["authz", *common, "--port", str(authz_port), "--grpc-port", str(authz_port + 1)],
                       logs))
    roles.append(Child("collector", ["collector", *common, "--host", config.collector.host,
                                     "--grpc-port", str(config.collector.grpc_port),
                                     "--http-port", str(config.collector.http_port), "--metrics-port", str(port)],
                       logs))
    return roles


class _EmbeddedKafka:
    """The embedded broker with what must be put back when it is started again: the topics and the breakers in
    force (kept in the data dir by the BreakerKeeper)."""

    def __init__(self, config: Config, broker: EmbeddedBroker, data_dir: Path) -> None:
        self._config = config
        self.broker = broker
        self._data_dir = data_dir
        self._keeper: BreakerKeeper | None = None
        self.deaths: list[float] = []

    def start(self) -> None:
        self.broker.start()
        asyncio.run(ensure_topics(self._config.kafka, os.environ))
        restore_breakers(self._config.kafka, self._data_dir)
        self._keeper = BreakerKeeper(self._config.kafka, self._data_dir)
        self._keeper.start()

    def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None
        self.broker.stop()

    def died(self) -> int | None:
        """The broker's exit code if it is no longer running."""
        return self.broker.exit_code()


def run_all(config: Config, *, workers: int, data_dir: Path, broker_port: int | None,
            config_path: str | None, log_level: str, log_format: str, authz_port: int = AUTHZ_PORT) -> int:
    """Run until Ctrl-C or SIGTERM; returns the exit code."""
    if workers < 1:
        raise BrokerError("--workers must be at least 1")
    _check_ports(config, workers, authz_port)
    data_dir = data_dir.resolve()
    embedded = None
    if broker_port is not None:
        broker = EmbeddedBroker(broker_port, log_file=data_dir / "logs" / "broker.log")
        config = replace(config, kafka=replace(config.kafka, bootstrap_servers=broker.bootstrap_servers))
        embedded = _EmbeddedKafka(config, broker, data_dir)
    roles = _roles(config, workers=workers, data_dir=data_dir, config_path=config_path, log_level=log_level,
                   log_format=log_format, authz_port=authz_port)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if embedded is not None:
            embedded.start()
        else:
            asyncio.run(ensure_topics(config.kafka, os.environ))
        for role in roles:
            role.start()
        _print_endpoints(config, config.kafka.bootstrap_servers, embedded is not None, workers, data_dir,
                         config_path=config_path, authz_port=authz_port)
        last_status, next_status = "", time.monotonic() + STATUS_EVERY_S
        while not stopping:
            now = time.monotonic()
            if now >= next_status:
                status = _flow_status(config.metrics.port, workers)
                if status and status != last_status:
                    print(status, flush=True)
                    last_status = status
                next_status = now + STATUS_EVERY_S
            code = None if embedded is None else embedded.died()
            if embedded is not None and code is not None and not _restart_broker(embedded, roles, code, now):
                return 1
            for role in roles:
                role.supervise(now)
            time.sleep(0.2)
        print("stopping…", flush=True)
        _drain(roles, config)
        return 0
    finally:
        _stop(roles)
        if embedded is not None:
            embedded.stop()


def _restart_broker(embedded: _EmbeddedKafka, roles: list[Child], code: int, now_s: float) -> bool:
    """The embedded broker died: say so, start a new one and every role again. False (stop the run) when it keeps
    dying or cannot start."""
    embedded.deaths = [t for t in embedded.deaths if now_s - t < STABLE_AFTER_S] + [now_s]
    notice(f"the embedded broker {exit_reason(code)}; everything it held in memory is gone "
           "(calls acknowledged but not yet in the FOCUS files are lost)")
    if len(embedded.deaths) >= BROKER_DEATHS_TO_STOP:
        notice(f"the broker died {len(embedded.deaths)} times within {STABLE_AFTER_S:g} s; stopping "
               f"(see {embedded.broker.log_file})")
        return False
    _stop(roles, timeout_s=5.0)  # their clients hold the old broker's groups and offsets
    embedded.stop()
    try:
        embedded.start()
    except BrokerError as exc:
        notice(f"the broker could not be started again: {exc}")
        return False
    for role in roles:
        role.start()
    notice("a new embedded broker is running with the topics and the breakers in force; every role "
           "was started again")
    return True


#: the samples the flow line reads, per role: asking for them alone (`name[]`) spares a worker rendering its
#: thousands of labelled series every few seconds (under load that was a fifth of its CPU)
_COLLECTOR_FLOW: Final = ("spendstream_collector_spans_received_total",
                          "spendstream_collector_usage_events_published_total", "spendstream_collector_spans_total")
_WORKER_FLOW: Final = ("spendstream_worker_usage_priced_total", "spendstream_worker_usage_unpriced_total",
                       "spendstream_alerts_total", "spendstream_breaker_commands_total")
_EXPORTER_FLOW: Final = ("spendstream_exporter_rows_total",)


def _scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each of these sample names on a local metrics endpoint; empty if it does not answer (yet)."""
    query = urllib.parse.urlencode([("name[]", name) for name in names])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?{query}", timeout=1) as response:
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
    collector = _scrape(metrics_port, _COLLECTOR_FLOW)
    if not collector:
        return ""
    worker_totals = [_scrape(metrics_port + 1 + i, _WORKER_FLOW) for i in range(workers)]
    priced = sum(w.get("spendstream_worker_usage_priced_total", 0.0) for w in worker_totals)
    unpriced = sum(w.get("spendstream_worker_usage_unpriced_total", 0.0) for w in worker_totals)
    in_files = _scrape(metrics_port + 1 + workers, _EXPORTER_FLOW).get("spendstream_exporter_rows_total", 0.0)
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


def _print_endpoints(config: Config, bootstrap: str, embedded: bool, workers: int, data_dir: Path, *,
                     config_path: str | None, authz_port: int) -> None:
    m = config.metrics.port
    lines = [
        "spendstream is running",
        f"  OTLP/gRPC    localhost:{config.collector.grpc_port}   (OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:"
        f"{config.collector.grpc_port})",
        f"  OTLP/HTTP    http://localhost:{config.collector.http_port}/v1/traces",
        f"  Kafka        {bootstrap}{'   (embedded broker, in memory)' if embedded else ''}",
        f"  metrics      http://localhost:{m}/metrics (collector)"
        + "".join(f", :{m + 1 + i} (worker-{i + 1})" for i in range(workers)) + f", :{m + 1 + workers} (exporter)",
        f"  authz        http://localhost:{authz_port}/check (NGINX, Traefik; /metrics, /healthz), "
        f"gRPC localhost:{authz_port + 1} (Envoy)",
        f"  FOCUS files  {data_dir / 'focus'}   (spendstream report --data-dir {data_dir})",
        f"  data, logs   {data_dir}",
        f"  config       {config_path or 'built-in defaults'}   (each role's log says which settings came from "
        "SPENDSTREAM_* variables)",
        "  breakers     spendstream breaker list --kafka " + bootstrap,
        "try it:        spendstream demo      stop: Ctrl-C",
    ]
    print("\n".join(lines), flush=True)
