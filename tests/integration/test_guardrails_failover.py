"""Budgets and alerts survive redelivery, a killed worker and a scale-out failover exactly.

Real broker, real worker processes. The spend is worked out by hand: every call costs exactly
3.20 EUR (an override of 1000 EUR per million input tokens, 3,200 tokens a call).
"""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.guardrails.stage import GUARDRAILS_GROUP
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.pricing.stage import PRICING_GROUP
from schemas.alert import decode_alert
from schemas.topics import TopicNames
from schemas.usage import TokenCounts, UsageEvent, encode_usage_batch
from tests.conftest import new_topics
from tests.integration.roles import produce_slowly, role
from tests.support import free_port, metric, metrics_text, read_topic

pytestmark = pytest.mark.integration
MESSAGES = 600
PER_MESSAGE = 5
TEAMS = ("search", "support", "research", "ads")
CALL_EUR = Decimal("3.2")
#: the first hours of this month: early enough that no projected-exhaustion alert is due
MONTH_START = datetime.now(UTC).replace(day=1, hour=0, minute=30, second=0, microsecond=0)
PERIOD = MONTH_START.strftime("%Y-%m")
POLICY = """
billing_currency: EUR
fx: {USD: 0.92}
pricing:
  overrides:
    - {provider: openai, model: gpt-4o, input_per_mtok: 1000, output_per_mtok: 0, currency: EUR}
budgets:
  - {scope: {team: search}, amount: 2000, on_exhausted: {prod: approved_only, non_prod: block}}
  - {scope: {team: support}, amount: 1500, alerts: [0.25, 0.5]}
  - {scope: {}, amount: 6000}
velocity: {scopes: []}
"""


def usage_messages() -> list[tuple[bytes, bytes]]:
    start = int(MONTH_START.timestamp()) * 10**9
    out = []
    for m in range(MESSAGES):
        team = TEAMS[m % len(TEAMS)]
        key = f"team={team}|use_case=u|env=prod|app=a|key="
        events = [UsageEvent(id=f"{m:08x}-{i:04x}", trace_id=f"{m:08x}", span_id=f"{i:04x}", parent_span_id=None,
                             start_time_unix_nano=start + (m * PER_MESSAGE + i) * 10**8,
                             end_time_unix_nano=start + (m * PER_MESSAGE + i) * 10**8 + 10**9, operation="chat",
                             provider="openai", request_model="gpt-4o", response_model=None,
                             tokens=TokenCounts(input_uncached=3200), attribution={"team": team, "env": "prod"},
                             attribution_key=key)
                  for i in range(PER_MESSAGE)]
        out.append((key.encode(), encode_usage_batch(events)))
    return out


def expected_totals() -> dict[str, Decimal]:
    per_team = CALL_EUR * PER_MESSAGE * MESSAGES / len(TEAMS)
    return {"global": per_team * len(TEAMS), "team=search": per_team, "team=support": per_team}


def write_config(tmp: Path, topics: TopicNames) -> Path:
    config = tmp / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{topics.prefix}'\n  partitions: 4\n{POLICY}")
    return config


def budget_totals(bootstrap: str, topics: TopicNames) -> dict[str, Decimal]:
    latest: dict[str, Any] = {}
    for record in read_topic(bootstrap, topics.guardrail_state):
        latest[record.key.decode()] = orjson.loads(record.value) if record.value else None
    return {scope: Decimal(state["periods"].get(PERIOD, "0")) for scope, state in latest.items()
            if state and not scope.startswith("@")}  # "@partition": the partition's own record


def alert_ids(bootstrap: str, topics: TopicNames) -> list[str]:
    return [decode_alert(r.value).alert_id for r in read_topic(bootstrap, topics.alerts)]


def wait_for_totals(bootstrap: str, topics: TopicNames, timeout_s: float = 120) -> dict[str, Decimal]:
    want = expected_totals()
    deadline = time.monotonic() + timeout_s
    totals: dict[str, Decimal] = {}
    while time.monotonic() < deadline:
        totals = budget_totals(bootstrap, topics)
        if all(totals.get(scope, Decimal(0)) >= amount for scope, amount in want.items()):
            time.sleep(2)  # anything redelivered late would show up now
            return budget_totals(bootstrap, topics)
        time.sleep(1)
    raise AssertionError(f"budget totals never reached {want}: {totals}")


def wait_in_groups(ports: list[int], timeout_s: float = 60) -> None:
    """Until every worker owns partitions in both its consumer groups (pricing, guardrails): each shows the
    consumer lag of its partitions, which it only has once assigned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            texts = [metrics_text(port) for port in ports]
        except OSError:  # a metrics endpoint not up yet
            texts = []
        if texts and all(f'spendstream_consumer_lag{{group="{group}"' in text for text in texts
                         for group in (PRICING_GROUP, GUARDRAILS_GROUP)):
            return
        time.sleep(0.2)
    raise AssertionError(f"workers on ports {ports} never all owned partitions of both groups")


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


THRESHOLDS = {f"budget_threshold|team=search|{PERIOD}|{p}" for p in ("50%", "80%", "100%")}


def test_three_threshold_alerts_once_each_through_a_killed_worker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    topics = new_topics(broker.bootstrap_servers, partitions=4)
    config = write_config(tmp_path, topics)
    port = free_port()
    worker = role("worker", broker, config, tmp_path, port)
    feeder = threading.Thread(target=produce_slowly,
                              args=(broker.bootstrap_servers, topics.usage, usage_messages(), 8.0))
    try:
        feeder.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it once it has priced a third of the stream
            time.sleep(0.2)
            try:
                if metric(port, "spendstream_worker_usage_priced_total") > MESSAGES * PER_MESSAGE / 3:
                    break
            except OSError:
                continue
        worker.kill()
        worker.wait()
        worker = role("worker", broker, config, tmp_path, port)
        totals = wait_for_totals(broker.bootstrap_servers, topics)
        assert {k: totals[k] for k in expected_totals()} == expected_totals()
        ids = alert_ids(broker.bootstrap_servers, topics)
        search = {i for i in ids if i.startswith("budget_threshold|team=search|")}
        assert search == THRESHOLDS
        commands = [orjson.loads(r.value) for r in read_topic(broker.bootstrap_servers, topics.breaker_commands)]
        assert {(c["breaker_id"], c["state"]) for c in commands} == {("budget|team=search|monthly", "open")}
    finally:
        feeder.join(timeout=30)
        stop(worker)


Outcome = tuple[dict[str, Decimal], set[str]]  # budget totals per scope, alert ids


def run_group(broker: EmbeddedBroker, tmp: Path, *, workers: int, kill_one: bool) -> Outcome:
    tmp.mkdir()
    topics = new_topics(broker.bootstrap_servers, partitions=4)
    config = write_config(tmp, topics)
    ports = [free_port() for _ in range(workers)]
    group = [role("worker", broker, config, tmp, port, instance=str(i)) for i, port in enumerate(ports)]
    wait_in_groups(ports)  # both in the group before the stream starts, so each owns partitions
    feeder = threading.Thread(target=produce_slowly,
                              args=(broker.bootstrap_servers, topics.usage, usage_messages(), 10.0))
    try:
        feeder.start()
        if kill_one:
            time.sleep(5)
            group[1].kill()
            group[1].wait()
        totals = wait_for_totals(broker.bootstrap_servers, topics)
        if kill_one:
            assert metric(ports[0], "spendstream_guardrails_scopes_restored_total") > 0, \
                "the survivor took over no state from the changelog"
        return totals, set(alert_ids(broker.bootstrap_servers, topics))
    finally:
        feeder.join(timeout=30)
        stop(*group)


def test_scale_out_failover_gives_what_one_worker_gives(broker: EmbeddedBroker, tmp_path: Path) -> None:
    one_totals, one_alerts = run_group(broker, tmp_path / "one", workers=1, kill_one=False)
    two_totals, two_alerts = run_group(broker, tmp_path / "two", workers=2, kill_one=True)
    assert {k: one_totals[k] for k in expected_totals()} == expected_totals()
    assert two_totals == one_totals
    assert two_alerts == one_alerts
    assert one_alerts > THRESHOLDS
    assert {f"budget_threshold|team=support|{PERIOD}|{p}" for p in ("25%", "50%")} < one_alerts
