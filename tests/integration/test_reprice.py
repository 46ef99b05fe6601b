"""`spendstream reprice` on the real broker with a real worker and exporter: calls to a model nobody priced are
dead-lettered; once an override exists, reprice prices exactly those calls, once however often it runs, and the
files, the budget totals and `spendstream report` include them. `--restate` corrects rows after a retroactive
price change with correction rows that net the difference, once, in the files and the budgets, and the files
still pass focus-validator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consumer import unread
from schemas.config import KafkaConfig
from schemas.focus import REQUEST_FILES, request_files_glob
from schemas.topics import TopicNames
from schemas.usage import TokenCounts, UsageEvent, encode_usage_batch
from tests.focus_validator import validate, validator
from tests.integration.roles import role
from tests.integration.test_worker import produce
from tests.support import free_port, read_deadletters, usage_counted

pytestmark = pytest.mark.integration

CONFIG = """
kafka: {{topic_prefix: '{prefix}', partitions: 2}}
exporter: {{flush_seconds: 1}}
budgets:
  - {{scope: {{team: ml}}, amount: 1000}}
pricing:
  overrides:
    - {{provider: openai, model: gpt-4o, input_per_mtok: 1, output_per_mtok: 2}}
{added}"""
#: what the operator adds once the model's price is known: 1,000 input + 500 output tokens cost 0.005 USD
OVERRIDE = "    - {provider: vllm, model: acme-internal-70b, input_per_mtok: 2, output_per_mtok: 6}\n"
CALL_COST = Decimal("0.005")


def call(n: int, model: str, provider: str, start_ns: int) -> UsageEvent:
    trace, span = f"{n:032x}", f"{n:016x}"
    return UsageEvent(id=f"{trace}-{span}", trace_id=trace, span_id=span, parent_span_id=None,
                      start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + 10**9, operation="chat",
                      provider=provider, request_model=model, response_model=model,
                      tokens=TokenCounts(input_uncached=1000, output=500),
                      attribution={"team": "ml", "use_case": "rag"}, attribution_key="team=ml,use_case=rag")


def budget_spent(port: int) -> Decimal:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum((Decimal(str(s.value)) for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "spendstream_budget_spent" and s.labels.get("scope") == "team=ml"), Decimal(0))


def in_files(data: Path) -> dict[str, Decimal]:
    """usage id -> billed cost, from the FOCUS files."""
    if not any(data.glob(REQUEST_FILES)):
        return {}
    with duckdb.connect() as con:
        return {usage_id: cost for usage_id, cost in con.execute(
            f"SELECT \"x_UsageId\", sum(\"BilledCost\") FROM read_parquet('{request_files_glob(data)}', "
            "hive_partitioning = true) GROUP BY ALL").fetchall()}


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:  # a metrics endpoint not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def drained(bootstrap: str, topics: TopicNames) -> bool:
    """The exporter has written, and stage 2 added, everything published so far."""
    kafka = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=topics.prefix)
    return (asyncio.run(unread(kafka, "spendstream-exporter", topics.cost_focus)) == 0
            and asyncio.run(unread(kafka, "spendstream-guardrails", topics.spend)) == 0)


@pytest.fixture
def worker(broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path) -> Iterator[int]:
    """A worker (pricing and guardrails); yields its metrics port."""
    config = tmp_path / "spendstream.yaml"
    config.write_text(CONFIG.format(prefix=topics.prefix, added=""))
    port = free_port()
    process = role("worker", broker, config, tmp_path, port)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def exporter(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[None]:
    process = role("exporter", broker, tmp_path / "spendstream.yaml", tmp_path, free_port())
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def reprice(broker: EmbeddedBroker, config: Path, data: Path, since: str, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline", "reprice", "--kafka", broker.bootstrap_servers,
                           "--config", str(config), "--data-dir", str(data), "--since", since, *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reprice_prices_dead_lettered_calls_once_into_files_budgets_and_report(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path, worker: int,
) -> None:
    now = time.time_ns()
    known = [call(i, "gpt-4o", "openai", now - 60 * 10**9 + i) for i in range(1, 3)]
    unknown = [call(i, "acme-internal-70b", "vllm", now - 60 * 10**9 + i) for i in range(10, 13)]
    asyncio.run(produce(broker.bootstrap_servers, topics.usage,
                        [(e.attribution_key.encode(), encode_usage_batch([e])) for e in known + unknown]))
    data = tmp_path / "data"
    with exporter(broker, tmp_path):
        wait_for("the worker to price or dead-letter every call", lambda: usage_counted(worker) == 5)
        letters = read_deadletters(broker.bootstrap_servers, topics.deadletter, min_messages=3)
        assert sorted(letter["usage_id"] for letter in letters) == sorted(e.id for e in unknown)
        assert {letter["reason"] for letter in letters} <= {"unknown_model", "unknown_provider"}
        wait_for("the priced calls in the files", lambda: set(in_files(data)) == {e.id for e in known})
    before = sum(in_files(data).values(), Decimal(0))
    wait_for("the budget to count the priced calls", lambda: budget_spent(worker) == before)

    since = time.strftime("%Y-%m-%d", time.gmtime(now / 1e9 - 86_400))
    without = reprice(broker, tmp_path / "spendstream.yaml", data, since)
    assert "priced now: 0 calls" in without and "still unpriced: 3 calls" in without
    with_override = tmp_path / "with-override.yaml"
    with_override.write_text(CONFIG.format(prefix=topics.prefix, added=OVERRIDE))
    # twice while no exporter runs: the files cannot tell the second run what the first one did
    first = reprice(broker, with_override, data, since)
    assert f"priced now: 3 calls, {3 * CALL_COST} USD" in first, first
    assert "still unpriced: 0 calls" in first
    second = reprice(broker, with_override, data, since)
    assert "priced now: 0 calls" in second and "priced by an earlier reprice: 3 calls" in second, second
    wait_for("the budget to include the repriced calls", lambda: budget_spent(worker) == before + 3 * CALL_COST)

    with exporter(broker, tmp_path):
        wait_for("the repriced calls in the files", lambda: len(in_files(data)) == 5)
        third = reprice(broker, with_override, data, since)
        assert "priced now: 0 calls" in third and "priced by an earlier reprice: 3 calls" in third, third
        wait_for("every run's output to be consumed", lambda: drained(broker.bootstrap_servers, topics))
        time.sleep(6)  # a gauge snapshot (every 5 s) and an exporter flush (every 1 s): a second count would show
    files = in_files(data)
    assert set(files) == {e.id for e in known + unknown}
    assert all(files[e.id] == CALL_COST for e in unknown)
    assert sum(files.values(), Decimal(0)) == before + 3 * CALL_COST
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT count(*), count(DISTINCT \"x_RowId\") FROM read_parquet('"
                           f"{request_files_glob(data)}', hive_partitioning = true)").fetchone()
    assert rows is not None and rows[0] == rows[1]  # no row twice
    assert budget_spent(worker) == before + 3 * CALL_COST

    report = subprocess.run([sys.executable, "-m", "pipeline", "report", "--data-dir", str(data), "--by", "model",
                             "--format", "csv"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"acme-internal-70b,{3 * CALL_COST}," in report, report


def test_a_retroactive_override_gives_correction_rows_that_net_the_hand_computed_difference(
    broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path, worker: int,
) -> None:
    now = time.time_ns()
    calls = [call(i, "gpt-4o", "openai", now - 60 * 10**9 + i) for i in range(20, 22)]
    asyncio.run(produce(broker.bootstrap_servers, topics.usage,
                        [(e.attribution_key.encode(), encode_usage_batch([e])) for e in calls]))
    data = tmp_path / "data"
    since = time.strftime("%Y-%m-%d", time.gmtime(now / 1e9 - 86_400))
    # renegotiated after the fact: input at 3 USD per million instead of 1, from a day before the calls
    renegotiated = tmp_path / "renegotiated.yaml"
    renegotiated.write_text(CONFIG.format(prefix=topics.prefix, added=(
        f"    - {{provider: openai, model: gpt-4o, input_per_mtok: 3, output_per_mtok: 2, valid_from: '{since}'}}\n")))
    with exporter(broker, tmp_path):
        wait_for("the calls in the files", lambda: set(in_files(data)) == {e.id for e in calls})
    # 1,000 input tokens at 1 and 500 output tokens at 2 USD per million: 0.002 USD a call
    assert sum(in_files(data).values(), Decimal(0)) == Decimal("0.004")
    wait_for("the budget to count the calls", lambda: budget_spent(worker) == Decimal("0.004"))

    # twice while no exporter runs: the second run finds the same corrections, and counts none of them again
    for _ in range(2):
        # 2 calls x 1,000 input tokens x (3 - 1) USD / 1e6
        first = restate(broker, renegotiated, data, since)
        assert "correction rows: 2, net BilledCost 0.004 USD" in first, first
    wait_for("the budget to include the corrections", lambda: budget_spent(worker) == Decimal("0.008"))
    with exporter(broker, tmp_path):
        wait_for("the corrections in the files", lambda: sum(in_files(data).values(), Decimal(0)) == Decimal("0.008"))
        again = restate(broker, renegotiated, data, since)
        assert "correction rows: 0," in again, again
        wait_for("every run's output to be consumed", lambda: drained(broker.bootstrap_servers, topics))
        time.sleep(6)  # a gauge snapshot (every 5 s) and an exporter flush (every 1 s): a second count would show
    assert budget_spent(worker) == Decimal("0.008")
    with duckdb.connect() as con:
        corrections = con.execute(
            f"SELECT count(*), sum(\"BilledCost\"), count(DISTINCT \"x_RowId\"), "
            f"count(*) FILTER (WHERE \"ConsumedQuantity\" IS NULL AND \"x_Meter\" = 'input_tokens') "
            f"FROM read_parquet('{request_files_glob(data)}', hive_partitioning = true) "
            "WHERE \"ChargeClass\" = 'Correction'").fetchone()
    assert corrections == (2, Decimal("0.004"), 2, 2)
    report = subprocess.run([sys.executable, "-m", "pipeline", "report", "--data-dir", str(data), "--by", "model",
                             "--format", "csv"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "gpt-4o,0.008," in report, report  # billed totals include the corrections; requests stay 2

    exe = validator()
    merged = tmp_path / "focus.parquet"
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT * FROM read_parquet('{request_files_glob(data)}', hive_partitioning = false)) "
                    f"TO '{merged}' (FORMAT parquet)")
    result = validate(exe, merged, tmp_path, "1.4")
    assert "| Fail: 0 |" in result.summary and not result.failed_rules, result.output[-4000:]


def restate(broker: EmbeddedBroker, config: Path, data: Path, since: str) -> str:
    return reprice(broker, config, data, since, "--restate")
