"""100,000 distinct attribution keys: series on every metrics endpoint and memory of every role.

    .venv/bin/python bench/cardinality.py [--keys 100000] [--steps 4]

Starts `spendstream run` (embedded broker, collector, one worker, exporter) with a label budget
(`metrics.max_label_values: 50`, `max_scopes: 50`, `max_series: 2000`) and sends model calls
whose attribution never repeats: every call has its own key and app, and teams and use cases
come from pools of 2,000 and 5,000. First a baseline of 1,000 keys, then the rest in steps;
after each, once the worker has priced everything, it counts the series each role exposes and
reads each role's resident memory (VmRSS). Then one call with an event time 10 minutes later
moves stage 2's clock past the velocity window, so the idle scopes are forgotten, and as many
new keys again arrive after it: memory must be reused, not grow by the same amount again.
Prints both figures per step as a ratio to the baseline; draws bench/results/cardinality.svg.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.roles import children_rss_mb
from tests.e2e.running import read_until
from tests.support import free_port, make_request, make_span

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RESULTS = Path(__file__).parent / "results"
SERIES_BUDGET = 2_000
CONFIG = f"metrics: {{max_label_values: 50, max_scopes: 50, max_series: {SERIES_BUDGET}}}\n"
SPANS_PER_REQUEST = 500
ROLES = ("collector", "worker", "exporter")


def payload(first: int, count: int, at_ns: int) -> bytes:
    spans = []
    for i in range(first, first + count):
        span = make_span({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                          "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 800 + i % 400,
                          "gen_ai.usage.output_tokens": 120, "gen_ai.virtual_key": f"key-{i}",
                          "team.name": f"team-{i % 2000}", "feature.name": f"use-case-{i % 5000}",
                          "service.name": f"app-{i}"})
        span.start_time_unix_nano, span.end_time_unix_nano = at_ns - 10**9, at_ns
        spans.append(span)
    wire: bytes = make_request(spans, {"deployment.environment.name": "prod"}).SerializeToString()
    return wire


def scrape(port: int) -> dict[str, float]:
    """Series count, plus the value of the few samples the bench reads."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {"series": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out["series"] += 1
            if sample.name in ("spendstream_worker_usage_priced_total", "spendstream_guardrails_scopes"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def send(endpoint: str, first: int, count: int, at_ns: int) -> None:
    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary(EXPORT, request_serializer=None,
                               response_deserializer=ExportTraceServiceResponse.FromString)
    for start in range(first, first + count, SPANS_PER_REQUEST):
        call(payload(start, min(SPANS_PER_REQUEST, first + count - start), at_ns), timeout=60)
    channel.close()


def wait_priced(port: int, total: int) -> None:
    deadline = time.monotonic() + 300
    while scrape(port).get("spendstream_worker_usage_priced_total", 0) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker did not price {total:,} calls in 5 minutes")
        time.sleep(0.5)
    time.sleep(6)  # stage 2 and the gauges catch up (readings every 5 s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spendstream-cardinality-"))
    (tmp / "spendstream.yaml").write_text(CONFIG)
    grpc_port, metrics_port = free_port(), free_port()
    ports = {role: metrics_port + i for i, role in enumerate(ROLES)}
    output = tmp / "run.log"
    with output.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--config", str(tmp / "spendstream.yaml"), "--data-dir",
             str(tmp / "data"), "--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--broker-port",
             str(free_port()), "--metrics-port", str(metrics_port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    endpoint = f"localhost:{grpc_port}"
    rows: list[tuple[str, dict[str, float], dict[str, float], float]] = []

    def measure(label: str, priced: int) -> None:
        wait_priced(ports["worker"], priced)
        series = {role: scrape(port)["series"] for role, port in ports.items()}
        rss = children_rss_mb(run.pid)
        scopes = scrape(ports["worker"]).get("spendstream_guardrails_scopes", 0)
        rows.append((label, series, rss, scopes))
        print(f"  {label:<34} series " + "  ".join(f"{r} {series[r]:>5,.0f}" for r in ROLES)
              + "   RSS " + "  ".join(f"{r} {rss.get(r, 0):>5,.0f} MB" for r in ROLES)
              + f"   stage-2 scopes {scopes:>7,.0f}", flush=True)

    try:
        read_until(run, output, "try it:", timeout_s=60)
        time.sleep(5)
        now = time.time_ns()
        print(f"{args.keys:,} distinct attribution keys, series budget {SERIES_BUDGET:,} per metric family")
        baseline = 1_000
        send(endpoint, 0, baseline, now)
        measure(f"{baseline:,} keys (baseline)", baseline)
        step = (args.keys - baseline) // args.steps
        sent = baseline
        for i in range(args.steps):
            count = args.keys - sent if i == args.steps - 1 else step
            send(endpoint, sent, count, now)
            sent += count
            measure(f"{sent:,} keys", sent)
        # one call 10 minutes of event time later: stage 2 sweeps the scopes whose window has passed
        send(endpoint, args.keys, 1, now + 600 * 10**9)
        time.sleep(62)  # the sweep runs once a minute of event time, checked as ticks arrive
        measure(f"{sent:,} keys, window passed", sent + 1)
        # as many new keys again, after the window: memory freed by the sweep is reused, not added to
        send(endpoint, args.keys + 1, args.keys, now + 600 * 10**9)
        measure(f"{2 * args.keys:,} keys (2nd {args.keys:,} later)", 2 * args.keys + 1)
    finally:
        run.terminate()
        run.wait(timeout=30)

    base_series, base_rss = rows[0][1], rows[0][2]
    last_label, last_series, last_rss, _ = rows[-1]
    print(f"at {last_label} vs the baseline: series " + "  ".join(
        f"{r} {last_series[r] / base_series[r]:.2f}x" for r in ROLES) + "   RSS " + "  ".join(
        f"{r} {last_rss.get(r, 0) / base_rss.get(r, 1):.2f}x" for r in ROLES))
    worst = max(series for _, s, _, _ in rows for series in s.values())
    print(f"largest endpoint: {worst:,.0f} series (the budget bounds each labelled family at {SERIES_BUDGET:,})")
    chart = {f"{label}: worker series": s["worker"] for label, s, _, _ in rows}
    chart.update({f"{label}: worker RSS MB": r.get("worker", 0) for label, _, r, _ in rows})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cardinality.svg").write_text(bar_chart(
        "distinct attribution keys: worker metric series and resident memory (MB)", chart))
    print(f"chart: {RESULTS / 'cardinality.svg'}")


if __name__ == "__main__":
    main()
