"""The `spendstream` command as a person runs it: run + demo end to end, topics, and its error lines."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.kafka.broker import EmbeddedBroker
from tests.conftest import new_topics
from tests.e2e.running import run_demo, spendstream, spendstream_run
from tests.support import free_port, metric, read_usage, usage_counted

pytestmark = pytest.mark.e2e


def test_run_then_demo_counts_every_call_and_stops_cleanly(tmp_path: Path) -> None:
    with spendstream_run(tmp_path, tmp_path / "run.out") as run:
        assert f"localhost:{run.grpc_port}" in run.banner
        sent = run_demo(run, 6)
        assert sent > 100
        deadline = time.monotonic() + 60
        counted = 0.0
        while time.monotonic() < deadline and counted < sent:
            counted = usage_counted(run.metrics_port + 1)
            time.sleep(0.5)
        # every model call once; the runaway agent's invoke_agent wrappers are not model calls
        assert counted == sent
        events = read_usage(run.bootstrap, "genai.usage", min_events=sent)
        assert len({e.id for e in events}) == sent
        assert {"customer-support", "search", "research", "unallocated"} <= {e.attribution["team"] for e in events}
        assert metric(run.metrics_port, "spendstream_collector_usage_events_published_total") == sent
        # the collector's endpoint shows the collector's metrics, not the workers'
        with urllib.request.urlopen(f"http://127.0.0.1:{run.metrics_port}/metrics", timeout=5) as response:
            names = {line.split()[2] for line in response.read().decode().splitlines() if line.startswith("# TYPE")}
        assert "spendstream_collector_spans_received_total" in names
        assert not {n for n in names if n.startswith("spendstream_") and not n.startswith("spendstream_collector")}
    assert (tmp_path / "logs" / "worker-1.log").exists()


def test_topics_is_idempotent(broker: EmbeddedBroker) -> None:
    config_dir = new_topics(broker.bootstrap_servers)  # an unrelated prefix exists already
    assert config_dir.prefix
    first = spendstream("topics", "--kafka", broker.bootstrap_servers, "--partitions", "3")
    second = spendstream("topics", "--kafka", broker.bootstrap_servers)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "genai.usage: created" in first.stdout or "genai.usage: exists" in first.stdout
    assert "genai.breaker.commands: exists" in second.stdout
    assert "genai.deadletter: exists" in second.stdout


def test_taken_port_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = spendstream("run", "--data-dir", str(tmp_path), "--grpc-port", str(port),
                             "--broker-port", str(free_port()))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--grpc-port" in lines[0] and str(port) in lines[0]


def test_unreachable_kafka_is_a_clear_error() -> None:
    result = spendstream("topics", "--kafka", f"127.0.0.1:{free_port()}", timeout=90)
    assert result.returncode == 1
    assert "cannot reach Kafka" in result.stderr


def test_bad_config_names_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text("billing_currency: USD\ncollector:\n  grpc_prot: 4317\n")
    result = spendstream("collector", "--config", str(config))
    assert result.returncode == 2
    assert "collector.grpc_prot (line 3): unknown key" in result.stderr


def test_price_explains_each_line() -> None:
    result = spendstream("price", "gpt-4o", "--input", "1000000", "--output", "100000", "--cache-read", "200000",
                         "--provider", "openai", "--at", "2026-11-01")
    assert result.returncode == 0, result.stderr
    # gpt-4o: 2.50 USD uncached input, 1.25 cached, 10 output per million tokens
    assert "input_tokens" in result.stdout and "800,000 x 2.5 USD / 1,000,000 = 2 USD" in result.stdout
    assert "list total               3.25 USD" in result.stdout


def test_price_with_an_override_and_fx(tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text("billing_currency: EUR\nfx: {USD: 0.9}\npricing:\n  overrides:\n"
                      "    - {model: gpt-4o, input_per_mtok: 2, output_per_mtok: 8}\n")
    result = spendstream("price", "gpt-4o", "--input", "1000000", "--output", "1000000", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "contracted total         10 USD" in result.stdout
    assert "billed                   9 EUR" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["price", "gpt-made-up", "--input", "1", "--output", "1"], "cannot price: 'gpt-made-up'"),
    (["price", "gpt-4o", "--input", "10", "--output", "1", "--cache-read", "20"], "exceed --input"),
    (["price", "gpt-4o", "--input", "-1", "--output", "1"], "--input must not be negative"),
    (["price", "gpt-4o", "--input", "1", "--output", "1", "--at", "yesterday"], "not a date"),
    (["report", "--data-dir", "/nonexistent"], "no FOCUS files under /nonexistent"),
])
def test_cli_errors_are_one_clear_line(args: list[str], message: str) -> None:
    result = spendstream(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_report_rejects_an_unknown_grouping(tmp_path: Path) -> None:
    from pipeline.export.files import focus_dir  # noqa: PLC0415

    day = focus_dir(tmp_path) / "billing_period=2026-11" / "charge_date=2026-11-01"
    day.mkdir(parents=True)
    (day / "part-1.parquet").write_bytes(b"")
    result = spendstream("report", "--data-dir", str(tmp_path), "--by", "colour")
    assert result.returncode == 1 and "--by: unknown colour" in result.stderr
