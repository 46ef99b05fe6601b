"""Every call counted once: OTLP requests sent twice (gRPC, HTTP, mixed, and once ten minutes of event time
later, as exporters retry after a timeout or an UNAVAILABLE) reach the budgets, the cost metric, the FOCUS
topic and the files once; a budget at 75 % of its amount does not open its breaker."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import duckdb
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from schemas.focus import request_files_glob
from tests.e2e.running import RunningPipeline, spendstream_run
from tests.support import read_topic

pytestmark = pytest.mark.e2e
#: 1,000 input tokens at 1,000 USD per million: every call costs exactly 1 USD
CONFIG = """
budgets:
  - scope: {team: retry}
    amount: 40
    alerts: [0.5, 0.8, 1.0]
    on_exhausted: {prod: block, non_prod: block}
pricing:
  overrides:
    - {provider: openai, model: gpt-4o, input_per_mtok: 1000, output_per_mtok: 0}
"""
CALL: dict[str, str | int] = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
    "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 0}


def model_calls(n: int, start_ns: int) -> list[ReadableSpan]:
    """n finished model-call spans of team `retry`, made by the real SDK (exported below, twice)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "retrier", "team.name": "retry",
                                                        "feature.name": "chat", "deployment.environment.name": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("count-once")
    for i in range(n):
        span = tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=CALL, start_time=start_ns + i)
        span.end(end_time=start_ns + i + 10**9)
    provider.shutdown()
    return list(memory.get_finished_spans())


def export(exporter: GrpcExporter | HttpExporter, spans: Sequence[ReadableSpan]) -> None:
    assert exporter.export(spans) == SpanExportResult.SUCCESS


def samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def budget_spent(run: RunningPipeline) -> float:
    return sum(v for labels, v in samples(run.metrics_port + 1, "spendstream_budget_spent")
               if labels.get("scope") == "team=retry")


def test_every_request_sent_twice_is_counted_once(tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text(CONFIG)
    with spendstream_run(tmp_path / "data", tmp_path / "run.log", "--config", str(config)) as run:
        grpc = GrpcExporter(endpoint=f"localhost:{run.grpc_port}", insecure=True, timeout=30)
        http_line = re.search(r"OTLP/HTTP\s+http://localhost:(\d+)", run.banner)
        assert http_line, run.banner
        http_port = int(http_line.group(1))
        http = HttpExporter(endpoint=f"http://localhost:{http_port}/v1/traces", timeout=30)
        now = time.time_ns()
        over_grpc, over_http, mixed = model_calls(10, now - 10**9), model_calls(10, now), model_calls(5, now)
        late = model_calls(5, now - 600 * 10**9)  # started ten minutes ago
        export(grpc, late)
        for exporter, spans in ((grpc, over_grpc), (http, over_http), (grpc, mixed), (http, mixed)):
            export(exporter, spans)
        export(grpc, over_grpc)
        export(http, over_http)
        export(http, late)  # the retry, ten minutes of event time after the call
        sent = {f"{s.context.trace_id:032x}-{s.context.span_id:016x}" for s in (*over_grpc, *over_http, *mixed, *late)}
        assert len(sent) == 30

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and budget_spent(run) < 30:
            time.sleep(0.5)
        time.sleep(6)  # another gauge snapshot (every 5 s) and flush: a second count would show by now
        assert budget_spent(run) == 30.0
        billed = sum(v for labels, v in samples(run.metrics_port + 1, "spendstream_cost_billed_total")
                     if labels.get("team") == "retry")
        assert billed == 30.0
        duplicates = sum(v for _, v in samples(run.metrics_port + 1, "spendstream_worker_usage_duplicates_total"))
        assert duplicates == 30  # every call arrived twice

        rows = [orjson.loads(r.value) for r in read_topic(run.bootstrap, "genai.cost.focus")]
        ours = [row for row in rows if row["x_UsageId"] in sent]
        assert {row["x_UsageId"] for row in ours} == sent
        assert len(ours) == len({row["x_RowId"] for row in ours})  # no row twice on the topic
        assert sum(Decimal(row["BilledCost"]) for row in ours) == Decimal(30)
        commands = [orjson.loads(r.value) for r in read_topic(run.bootstrap, "genai.breaker.commands")]
        assert not [c for c in commands if c["source"] == "budget"], "a retry opened the budget breaker"
        alerts = {orjson.loads(r.value)["alert_id"] for r in read_topic(run.bootstrap, "genai.alerts")}
        assert {a for a in alerts if a.startswith("budget_threshold|team=retry")} == {
            a for a in alerts if a.startswith("budget_threshold|team=retry|") and a.endswith("|50%")}

    with duckdb.connect() as con:  # the files, after the clean stop: the same calls, once
        found = con.execute(
            f"SELECT count(DISTINCT \"x_UsageId\"), sum(\"BilledCost\") FROM read_parquet('"
            f"{request_files_glob(tmp_path / 'data')}', hive_partitioning = true) WHERE \"x_UsageId\" IN "
            f"({', '.join(repr(s) for s in sent)})").fetchone()
    assert found is not None
    count, total = found
    assert (count, total) == (30, Decimal(30))
