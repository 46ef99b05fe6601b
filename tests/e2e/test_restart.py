"""A restart remembers the month: stop `spendstream run` cleanly (Ctrl-C) and start it on the same data dir;
the budget totals are the same to the cent, the kill switch tripped before the stop is still in force and
listed, and a budget added by a reload mid-period counts the whole period's spend."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli.breaker_keeper import snapshot_path
from tests.e2e.running import RunningPipeline, spendstream, spendstream_run

pytestmark = pytest.mark.e2e
CONFIG = """
budgets:
  - {scope: {team: search}, amount: 1000}
pricing:
  overrides:
    - {provider: openai, model: gpt-4o, input_per_mtok: 1.5, output_per_mtok: 0}
"""
#: added while the pipeline runs: a scope shape nothing watched before, so only the files know its spend
ADDED_BUDGET = "  - {scope: {team: ads, env: prod}, amount: 500}\n"


def send(run: RunningPipeline, team: str, calls: int) -> None:
    """`calls` model calls of 1,000 input tokens: 0.0015 USD each."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"{team}-svc", "team.name": team,
                                                        "feature.name": "chat", "deployment.environment.name": "prod"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"localhost:{run.grpc_port}", insecure=True, timeout=30), schedule_delay_millis=50))
    tracer = provider.get_tracer("restart")
    for _ in range(calls):
        tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 0}).end()
    provider.shutdown()


def budgets(run: RunningPipeline) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{run.metrics_port + 1}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {s.labels["scope"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "spendstream_budget_spent"}


def wait_for_budgets(run: RunningPipeline, expected: dict[str, float], timeout_s: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    seen = budgets(run)
    while time.monotonic() < deadline and any(abs(seen.get(k, 0) - v) > 1e-12 for k, v in expected.items()):
        time.sleep(0.5)
        seen = budgets(run)
    return seen


def test_a_clean_restart_keeps_the_month_and_the_kill_switch(tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text(CONFIG)
    data = tmp_path / "data"
    with spendstream_run(data, tmp_path / "first.log", "--config", str(config)) as run:
        send(run, "search", 40)
        send(run, "ads", 20)
        before = wait_for_budgets(run, {"team=search": 0.06})
        assert before == {"team=search": pytest.approx(0.06, abs=1e-12)}
        tripped = spendstream("breaker", "trip", "--kafka", run.bootstrap, "--scope", "team=ads", "--action", "block",
                              "--reason", "incident 42", "--ttl", "7d")
        assert tripped.returncode == 0, tripped.stderr
        kept = snapshot_path(data)  # the runtime keeps the breakers in force in the data dir
        deadline = time.monotonic() + 30
        while not (kept.exists() and "manual|team=ads" in kept.read_text()):
            assert time.monotonic() < deadline, "the tripped breaker never reached the data dir"
            time.sleep(0.1)
    # the context manager stopped it with Ctrl-C and checked it exited 0
    with spendstream_run(data, tmp_path / "second.log", "--config", str(config)) as run:
        after = wait_for_budgets(run, before)
        assert after == before  # the month-to-date total, to the last digit
        listed = spendstream("breaker", "list", "--kafka", run.bootstrap)
        assert "manual|team=ads" in listed.stdout and "incident 42" in listed.stdout

        config.write_text(CONFIG.replace("budgets:\n", "budgets:\n" + ADDED_BUDGET))  # reloaded within seconds
        reloaded = wait_for_budgets(run, {"team=search": 0.06, "env=prod,team=ads": 0.03})
        assert reloaded == {"team=search": pytest.approx(0.06, abs=1e-12),
                            "env=prod,team=ads": pytest.approx(0.03, abs=1e-12)}
