"""The Grafana dashboards against real data: a real Prometheus (Debian's `prometheus`, installed by
`make test`) scrapes every role of a `spendstream run` fed by `spendstream demo`; every PromQL
expression of every panel must parse and return data, and every panel is drawn into a PNG.

SPENDSTREAM_SCREENSHOTS=docs/img makes the drawing the README's screenshots.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.e2e.dashboards import DASHBOARDS, INSTANT_PANELS, Prometheus, load, panel_queries, render, variable_queries
from tests.e2e.running import demo, spendstream_run
from tests.support import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SCRAPE_S = 1
SCREENSHOTS = os.environ.get("SPENDSTREAM_SCREENSHOTS")


@dataclass(frozen=True)
class Observed:
    prometheus: Prometheus
    start: float
    end: float

    @property
    def variables(self) -> dict[str, str]:
        """What Grafana would substitute: every value of every variable, the whole run as the range."""
        return {"__rate_interval": f"{4 * SCRAPE_S}s", "__range": f"{int(self.end - self.start) + 1}s",
                "team": ".*", "env": ".*", "scope": ".*", "currency": "EUR"}


def _prometheus_config(path: Path, metrics_port: int, authz_port: int) -> None:
    # the job names the pipeline-health dashboard counts as "roles up" (as in deploy/prometheus.yml)
    jobs = {"collector": metrics_port, "worker": metrics_port + 1, "exporter": metrics_port + 2, "authz": authz_port}
    path.write_text(f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
                    "scrape_configs:\n" + "".join(
                        f"  - job_name: spendstream-{role}\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
                        for role, port in jobs.items()))


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"prometheus not ready:\n{log.read_text()}")


def _send_rejected_span(grpc_port: int) -> None:
    """A model call with a negative token count: the collector rejects and dead-letters it."""
    provider = TracerProvider(resource=Resource.create({"service.name": "broken-app", "team.name": "search"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"localhost:{grpc_port}",
                                                                     insecure=True)))
    span = provider.get_tracer("test").start_span("chat gpt-4o", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": -5, "gen_ai.usage.output_tokens": 10})
    span.end()
    provider.shutdown()


def _ask_authz(port: int) -> None:
    """A gateway's question with a key the config does not know: an `unknown_key` answer for the decisions panel."""
    ask = urllib.request.Request(f"http://127.0.0.1:{port}/check", headers={"authorization": "Bearer sk-not-a-key"})
    deadline = time.monotonic() + 60  # run's banner comes before authz has joined Kafka and listens
    while True:
        try:
            urllib.request.urlopen(ask, timeout=10)
        except urllib.error.HTTPError as refused:
            assert refused.code == 401
            return
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            pytest.fail("authz let an unknown key through")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no `prometheus` binary: `make test` installs Debian's package (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("dashboards")
    with spendstream_run(tmp / "data", tmp / "run.log", "--config", str(ROOT / "deploy" / "spendstream.yaml"),
                         "--partitions", "4") as pipeline:
        _prometheus_config(tmp / "prometheus.yml", pipeline.metrics_port, pipeline.authz_port)
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, log)
            start = time.time()
            _send_rejected_span(pipeline.grpc_port)
            _ask_authz(pipeline.authz_port)
            # screenshots get a longer run, so their lines have a shape
            demo(pipeline, 90 if SCREENSHOTS else 25, history_s=120)
            _ask_authz(pipeline.authz_port)  # again: the decisions panel draws a rate
            time.sleep(6 * SCRAPE_S)  # the last figures scraped, and a few idle scrapes after them
            yield Observed(Prometheus(url), start, time.time())
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_every_panel_query_parses_and_returns_data(observed: Observed) -> None:
    prom, variables = observed.prometheus, observed.variables
    empty, checked = [], 0
    for path in DASHBOARDS:
        board = load(path)
        for name, label, metric in variable_queries(board):
            assert prom.label_values(label, metric), f"{path.name}: variable ${name} has no values"
        for panel in board["panels"]:
            for expr, _ in panel_queries(panel, variables):
                checked += 1
                if panel["type"] in INSTANT_PANELS:
                    result = prom.instant(expr)  # raises on a parse error, naming the expression
                else:
                    result = prom.range(expr, observed.start, observed.end, SCRAPE_S)
                if not result:
                    empty.append(f"{path.name} / {panel['title']}: {expr}")
    assert checked >= 40, "every dashboard's queries were run"
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_a_broken_expression_is_reported_not_passed(observed: Observed) -> None:
    # the check above can fail: Prometheus answers a parse error for an expression it cannot read
    assert "parse error" in (observed.prometheus.query_errors("sum by (team (spendstream_requests_total)") or "")


def test_breakers_and_budgets_reach_the_dashboards(observed: Observed) -> None:
    prom = observed.prometheus
    opened = prom.instant(f"max_over_time(spendstream_breaker_state{{breaker='rate|team=research'}}"
                          f"[{observed.variables['__range']}])")
    assert opened and float(opened[0]["value"][1]) == 2, "the runaway opened its breaker, and Prometheus saw it"
    budgets = {r["metric"]["scope"] for r in prom.instant("spendstream_budget_used_ratio")}
    assert {"global", "team=customer-support", "team=search", "team=research"} <= budgets


def test_every_dashboard_renders_to_png(observed: Observed, tmp_path: Path) -> None:
    out_dir = Path(SCREENSHOTS or tmp_path)
    for path in DASHBOARDS:
        board = load(path)
        png = out_dir / f"dashboard-{path.stem}.png"
        drawn = render(board, observed.prometheus, observed.start, observed.end, observed.variables, png)
        assert drawn == len(board["panels"]), f"{path.name}: {len(board['panels']) - drawn} panels drew no data"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
