"""Poison messages produced mid-stream into running roles on the real broker: each is dead-lettered once with its
reason and offset, the traffic around it is still priced, added up and written, and no process exits.

The tables are `tests/poison.py`'s (the decoders' unit tests use the same); each topic's whole table goes into
one running role, between good messages.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer

from collector.ingest import NestedCallFilter, ingest_request
from pipeline.gateway.client import READER_STAGE, BreakerClient
from pipeline.gateway.kill_switch import trip_command
from pipeline.guardrails.state import ScopeState
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.producer import partition_for
from pipeline.observability.metrics import MESSAGES_REJECTED
from pipeline.pricing import PriceCatalog, price_usage
from pipeline.pricing.focus import Billing, encoded_focus_rows
from schemas.config import Config, KafkaConfig
from schemas.guardrail_state import encode_state_value
from schemas.policy import Scope
from schemas.spend import SpendEntry, encode_spend
from schemas.topics import TopicNames
from schemas.usage import UsageEvent, encode_usage_batch
from tests.dialects import DIALECTS
from tests.e2e.running import spendstream_run
from tests.integration.roles import role
from tests.poison import breaker_poison, focus_poison, guardrail_state_poison, spend_poison, usage_poison
from tests.support import free_port, make_request, make_span, metric, read_deadletters, read_topic, usage_counted

pytestmark = pytest.mark.integration

Located = tuple[int, int]  # (partition, offset)


async def _produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]],
                   partition: int | None) -> list[Located]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        out = []
        for key, value in records:
            meta = await producer.send_and_wait(topic, value=value, key=key, partition=partition)
            out.append((meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]],
            partition: int | None = None) -> list[Located]:
    """Produce in order; returns where each record went."""
    return asyncio.run(_produce(bootstrap, topic, records, partition))


def wait_for(what: str, done: Callable[[], bool], process: subprocess.Popen[bytes] | None = None,
             timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"the role exited while waiting for {what}"
        try:
            if done():
                return
        except OSError:  # the metrics endpoint is not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def rejected(port: int, stage: str, reason: str) -> float:
    return metric(port, f'spendstream_messages_rejected_total{{reason="{reason}",stage="{stage}"}}')


def assert_dead_lettered_once(bootstrap: str, names: TopicNames, topic: str, where: Sequence[Located],
                              reason: str, stage: str) -> None:
    """Each message at `where` of `topic` is on genai.deadletter exactly once, with the reason and its place."""
    letters = [letter for letter in read_deadletters(bootstrap, names.deadletter, min_messages=len(where))
               if letter["fields"].get("topic") == topic]
    found = sorted((letter["fields"]["partition"], letter["fields"]["offset"]) for letter in letters)
    assert found == sorted(where)
    assert {(letter["reason"], letter["stage"]) for letter in letters} == {(reason, stage)}


def write_config(tmp: Path, names: TopicNames, extra: str = "") -> Path:
    config = tmp / "spendstream.yaml"
    config.write_text(f"kafka:\n  topic_prefix: '{names.prefix}'\n  partitions: 2\n{extra}")
    return config


def usage_events(n: int) -> list[UsageEvent]:
    return ingest_request(make_request([make_span(DIALECTS[0].attrs) for _ in range(n)]), Config(), None,
                          NestedCallFilter()).events


def usage_records(events: Sequence[UsageEvent]) -> list[tuple[bytes, bytes]]:
    return [(e.attribution_key.encode(), encode_usage_batch([e])) for e in events]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def test_the_pricing_stage_dead_letters_poison_and_prices_around_it(broker: EmbeddedBroker, topics: TopicNames,
                                                                    tmp_path: Path) -> None:
    bootstrap, port = broker.bootstrap_servers, free_port()
    events = usage_events(8)
    poison = usage_poison(encode_usage_batch(events[:1]))
    worker = role("worker", broker, write_config(tmp_path, topics), tmp_path, port)
    try:
        produce(bootstrap, topics.usage, usage_records(events[:4]))
        wait_for("the first calls priced", lambda: usage_counted(port) == 4, worker)
        where = produce(bootstrap, topics.usage, [(b"team=x|use_case=|env=|app=|key=", value) for _, value in poison])
        produce(bootstrap, topics.usage, usage_records(events[4:]))
        wait_for("every call priced and every poison rejected", lambda: usage_counted(port) == len(events)
                 and rejected(port, "pricing", "invalid_usage_message") == len(poison), worker)
        assert_dead_lettered_once(bootstrap, topics, topics.usage, where, "invalid_usage_message", "pricing")
        rows = [orjson.loads(r.value) for r in read_topic(bootstrap, topics.cost_focus)]
        assert {row["x_UsageId"] for row in rows} == {e.id for e in events}
        assert worker.poll() is None
    finally:
        stop(worker)


BUDGET = """budgets:
  - {scope: {team: search}, amount: 10, alerts: [0.5, 1.0]}
velocity: {scopes: []}
"""


def test_the_guardrail_stage_dead_letters_poison_spend_and_changelog_values(
        broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path) -> None:
    bootstrap, port = broker.bootstrap_servers, free_port()
    scope = b"team=search"
    partition = partition_for(scope, 2)
    bucket_s = int(time.time()) // 5 * 5

    def spend(offset: int, cost: str) -> bytes:
        return encode_spend("team=search", [SpendEntry(0, offset, bucket_s, Decimal(cost), 1, 10, Decimal(0))])

    # the changelog the worker restores on taking the partition over: 4 EUR spent, then poison for the same scope
    state = ScopeState(Scope.parse("team=search"))
    state.add([SpendEntry(0, 0, bucket_s, Decimal(4), 1, 10, Decimal(0))], 0)
    good_state = encode_state_value(state.to_value())
    changelog = produce(bootstrap, topics.guardrail_state,
                        [(scope, good_state), *[(scope, value) for _, value in guardrail_state_poison(good_state)]],
                        partition)[1:]
    worker = role("worker", broker, write_config(tmp_path, topics, BUDGET), tmp_path, port)
    try:
        produce(bootstrap, topics.spend, [(scope, spend(1, "1"))])  # 4 + 1: the 50 % alert
        wait_for("the 50 % alert", lambda: any(b"|50%" in r.value for r in read_topic(bootstrap, topics.alerts)),
                 worker)
        poison = spend_poison(spend(2, "1"))
        where = produce(bootstrap, topics.spend, [(scope, value) for _, value in poison])
        produce(bootstrap, topics.spend, [(scope, spend(3, "6"))])  # 4 + 1 + 6 = 11: over the budget
        wait_for("the 100 % alert", lambda: any(b"|100%" in r.value for r in read_topic(bootstrap, topics.alerts)),
                 worker)
        [alert] = [orjson.loads(r.value) for r in read_topic(bootstrap, topics.alerts) if b"|100%" in r.value]
        assert Decimal(alert["observed"]) == 11  # the changelog's 4 EUR survived the poison after it
        wait_for("every poison rejected", lambda: rejected(port, "guardrails", "invalid_spend_message") == len(poison)
                 and rejected(port, "guardrails", "invalid_guardrail_state") == len(changelog), worker)
        assert_dead_lettered_once(bootstrap, topics, topics.spend, where, "invalid_spend_message", "guardrails")
        assert_dead_lettered_once(bootstrap, topics, topics.guardrail_state, changelog, "invalid_guardrail_state",
                                  "guardrails")
        assert worker.poll() is None
    finally:
        stop(worker)


def focus_rows(events: Sequence[UsageEvent]) -> list[tuple[bytes, bytes]]:
    catalog = PriceCatalog()
    return [(e.attribution_key.encode(), value) for e in events
            for value, _ in encoded_focus_rows(price_usage(e, catalog), Billing())]


def test_the_exporter_dead_letters_poison_and_writes_the_rows_around_it(broker: EmbeddedBroker, topics: TopicNames,
                                                                       tmp_path: Path) -> None:
    bootstrap, port = broker.bootstrap_servers, free_port()
    before, after = focus_rows(usage_events(3)), focus_rows(usage_events(3))
    poison = focus_poison(before[0][1])
    exporter = role("exporter", broker, write_config(tmp_path, topics, "exporter: {flush_seconds: 0.5}\n"),
                    tmp_path, port)

    def row_ids() -> set[str]:
        files = list((tmp_path / "data" / "focus" / "request").rglob("part-*.parquet"))
        return {i for f in files for i in pq.read_table(f, columns=["x_RowId"]).column(0).to_pylist()}

    try:
        produce(bootstrap, topics.cost_focus, before)
        wait_for("the first rows in files", lambda: len(row_ids()) == len(before), exporter)
        where = produce(bootstrap, topics.cost_focus, [(b"team=x", value) for _, value in poison])
        produce(bootstrap, topics.cost_focus, after)
        expected = {orjson.loads(value)["x_RowId"] for _, value in before + after}
        wait_for("every row in files and every poison rejected", lambda: row_ids() == expected
                 and rejected(port, "exporter", "invalid_focus_row") == len(poison), exporter)
        assert_dead_lettered_once(bootstrap, topics, topics.cost_focus, where, "invalid_focus_row", "exporter")
        assert exporter.poll() is None
    finally:
        stop(exporter)


def test_breaker_clients_skip_poison_commands_and_follow_the_rest(broker: EmbeddedBroker, topics: TopicNames) -> None:
    bootstrap = broker.bootstrap_servers

    def trip(scope: str) -> tuple[bytes, bytes]:
        command = trip_command(Scope.parse(scope), "block", "runaway", ttl_s=600, downgrade={}, now_s=time.time())
        return command.breaker_id.encode(), command.encode()

    poison = [(b"manual|team=x", value) for _, value in breaker_poison(trip("team=a")[1])]
    counted = MESSAGES_REJECTED.labels(READER_STAGE, "invalid_breaker_command")

    async def main() -> list[set[str]]:
        client = BreakerClient(KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=topics.prefix))
        await _produce(bootstrap, topics.breaker_commands, [trip("team=a"), *poison], None)
        await client.start()  # reads the topic to its end: the state in force
        in_force = [{c.scope for c in client.board.in_force()}]
        await _produce(bootstrap, topics.breaker_commands, [*poison, trip("team=b")], None)
        deadline = time.monotonic() + 30
        while {c.scope for c in client.board.in_force()} != {"team=a", "team=b"} and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        in_force.append({c.scope for c in client.board.in_force()})
        await client.stop()
        return in_force

    before: Any = counted._value.get()
    assert asyncio.run(main()) == [{"team=a"}, {"team=a", "team=b"}]
    assert counted._value.get() - before == 2 * len(poison)


def test_spendstream_run_on_a_broker_that_keeps_the_poison_does_not_crash_loop(
        broker: EmbeddedBroker, topics: TopicNames, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    events = usage_events(2)
    poison = [value for name, value in usage_poison(encode_usage_batch(events[:1]))
              if name in ("events_of_ints", "tokens_as_strings", "attribution_as_list", "start_time_as_string")]
    config = write_config(tmp_path, topics)
    # the poison is on the broker before the run starts, between good calls, as after a crash loop's first exit
    produce(bootstrap, topics.usage, usage_records(events[:1]))
    where = produce(bootstrap, topics.usage, [(b"team=x|use_case=|env=|app=|key=", value) for value in poison])
    produce(bootstrap, topics.usage, usage_records(events[1:]))
    with spendstream_run(tmp_path / "data", tmp_path / "run.out", "--kafka", bootstrap, "--config",
                         str(config)) as run:
        worker_port = run.metrics_port + 1
        wait_for("the calls priced and the poison rejected", lambda: usage_counted(worker_port) == len(events)
                 and rejected(worker_port, "pricing", "invalid_usage_message") == len(poison))
        time.sleep(5)  # a crash loop would have restarted the worker, or stopped the run, by now
        assert run.process.poll() is None
        assert usage_counted(worker_port) == len(events)  # the same worker: its counters were not reset
        assert_dead_lettered_once(bootstrap, topics, topics.usage, where, "invalid_usage_message", "pricing")
        rows = [orjson.loads(r.value) for r in read_topic(bootstrap, topics.cost_focus)]
        assert {row["x_UsageId"] for row in rows} == {e.id for e in events}
