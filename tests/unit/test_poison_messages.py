"""Every decoder of a consumed topic refuses poison with a SchemaError (never another exception), accepts unknown
fields, and the shells around the pure cores reject one message instead of stopping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from pipeline.export.files import rows_table
from pipeline.gateway.kill_switch import trip_command
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.spend import PricedCall
from pipeline.guardrails.state import ScopeState
from pipeline.kafka.consumer import commit_processed
from pipeline.pricing import PriceCatalog, PricedUsage, cost_records, price_usage
from pipeline.pricing.catalog import ResolvedPrice
from pipeline.pricing.focus import Billing, encoded_focus_rows, focus_values
from pipeline.pricing.stage import PricingStage
from schemas.breaker import decode_command
from schemas.config import Config
from schemas.errors import SchemaError
from schemas.focus import decode_row
from schemas.guardrail_state import decode_partition_state, decode_scope_state, encode_state_value
from schemas.policy import Scope
from schemas.spend import SpendEntry, SpendMessage, decode_spend, encode_spend
from schemas.usage import TokenCounts, UsageEvent, decode_usage_batch, encode_usage_batch
from tests.poison import breaker_poison, focus_poison, guardrail_state_poison, spend_poison, usage_poison

NS = 1_795_000_000 * 10**9


def usage_event(n: int = 1, model: str = "gpt-4o") -> UsageEvent:
    return UsageEvent(
        id=f"{n:032x}-{n:016x}", trace_id=f"{n:032x}", span_id=f"{n:016x}", parent_span_id=None,
        start_time_unix_nano=NS, end_time_unix_nano=NS + 10**9, operation="chat", provider="openai",
        request_model=model, response_model=None, tokens=TokenCounts(input_uncached=800, output=200),
        attribution={"team": "search"}, attribution_key="team=search|use_case=|env=|app=|key=")


def scope_state() -> ScopeState:
    state = ScopeState(Scope.parse("team=search"))
    state.add([SpendEntry(0, 7, 1_795_000_000, Decimal("12.5"), 3, 900, Decimal(0))], 0)
    return state


VALID_USAGE = encode_usage_batch([usage_event()])
VALID_SPEND = encode_spend("team=search", [SpendEntry(0, 7, 1_795_000_000, Decimal("12.5"), 3, 900, Decimal(0))])
VALID_STATE = encode_state_value(scope_state().to_value())
VALID_ROW = next(iter(encoded_focus_rows(price_usage(usage_event(), PriceCatalog()), Billing())))[0]
VALID_COMMAND = trip_command(Scope.parse("team=search"), "block", "runaway", ttl_s=600, downgrade={},
                             now_s=1_795_000_000).encode()

TOPICS: dict[str, tuple[Callable[[bytes], Any], bytes, Callable[[bytes], list[tuple[str, bytes]]]]] = {
    "genai.usage": (decode_usage_batch, VALID_USAGE, usage_poison),
    "genai.spend": (decode_spend, VALID_SPEND, spend_poison),
    "genai.guardrails.state": (decode_scope_state, VALID_STATE, guardrail_state_poison),
    "genai.cost.focus": (decode_row, VALID_ROW, focus_poison),
    "genai.breaker.commands": (decode_command, VALID_COMMAND, breaker_poison),
}
POISON = [pytest.param(topic, value, id=f"{topic}-{name}")
          for topic, (_, valid, poison) in TOPICS.items() for name, value in poison(valid)]


@pytest.mark.parametrize(("topic", "value"), POISON)
def test_every_poison_message_is_a_schema_error(topic: str, value: bytes) -> None:
    decode = TOPICS[topic][0]
    with pytest.raises(SchemaError):
        decode(value)


@pytest.mark.parametrize("topic", TOPICS)
def test_valid_values_decode_and_unknown_fields_are_ignored(topic: str) -> None:
    decode, valid, _ = TOPICS[topic]
    newer = valid[:-1] + b', "added_by_a_newer_version": {"x": [1, 2]}}'
    assert decode(newer) == decode(valid)


def test_usage_ignores_unknown_fields_of_an_event_too() -> None:
    value = VALID_USAGE.replace(b'"operation":', b'"new_meter":{"audio":3},"operation":', 1)
    assert decode_usage_batch(value) == [usage_event()]


def test_the_partition_record_of_the_changelog_decodes_and_refuses_poison() -> None:
    assert decode_partition_state(b'{"watching_since_s": 1795000000}').watching_since_s == 1_795_000_000
    for value in (b'{"watching_since_s": "soon"}', b"{}", b"\xff", b'{"watching_since_s": 1e999}'):
        with pytest.raises(SchemaError):
            decode_partition_state(value)


def test_a_spend_message_decodes_with_its_scope_key_canonical() -> None:
    value = encode_spend("team=search,env=prod", [SpendEntry(0, 1, 5, Decimal("1E-19"), 1, 2, Decimal("0E-18"))])
    assert decode_spend(value) == SpendMessage("env=prod,team=search",
                                               [SpendEntry(0, 1, 5, Decimal("1E-19"), 1, 2, Decimal("0E-18"))])


def test_the_largest_row_the_decoder_accepts_fits_the_files() -> None:
    """The decoder is the exporter's guard: whatever it lets through, Arrow and Parquet must hold."""
    data = orjson.loads(VALID_ROW)
    data.update(BilledCost="-" + "9" * 20 + "." + "9" * 18, PricingQuantity="9" * 32 + ".999999",
                x_RequestCount=2**63 - 1, Tags={"n": 2**63 - 1, "f": 1e308, "b": True, "none": None, "s": "é"},
                ChargePeriodStart="2026-02-28T23:59:59Z")
    table = rows_table([decode_row(orjson.dumps(data))])
    assert table.num_rows == 1


class _Consumer:
    """Just enough of AIOKafkaConsumer for commit_processed: the group refuses the commit, as after a revoke."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(offsets)
        raise self.error


def test_a_commit_of_a_partition_just_revoked_is_skipped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    consumer = _Consumer(IllegalStateError("Partition TopicPartition(topic='t', partition=0) is not assigned"))
    offsets = {TopicPartition("t", 0): 5, TopicPartition("t", 1): 9}  # partition 1 moved before the commit
    with caplog.at_level(logging.INFO):
        asyncio.run(commit_processed(consumer, offsets, "pricing", logging.getLogger("test")))
    assert consumer.committed == [{TopicPartition("t", 0): 5}]
    assert "commit skipped" in caplog.text


class _Catalog(PriceCatalog):
    """A pricing core that breaks on one model."""

    def resolve(self, provider: str | None, model: str, start_unix_nano: int,
                service_tier: str | None = None) -> ResolvedPrice:
        if model == "boom":
            raise ZeroDivisionError("a price sheet the core cannot handle")
        return super().resolve(provider, model, start_unix_nano, service_tier)


def record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("genai.usage", 0, offset, 0, 0, b"team=search", value, None, 0, len(value), ())


def test_a_message_the_pricing_core_cannot_price_is_rejected_and_the_rest_is_priced() -> None:
    config = Config()
    stage = PricingStage(config, _Catalog(), Billing(), PolicyFile(None, config.policy))
    good, bad = usage_event(1), usage_event(2, model="boom")
    batches = {TopicPartition("genai.usage", 0): [record(10, encode_usage_batch([good])),
                                                  record(11, encode_usage_batch([bad]))]}
    kept, out = stage._cost([(good, 0, 10), (bad, 0, 11)], batches)
    assert kept == [(good, 0, 10)] and out.priced_events == 1 and len(out.billed) == 1
    [(_, letter)] = stage._rejections.take()
    assert orjson.loads(letter) | {"detail": "…"} == {
        "schema_version": 1, "reason": "processing_failed", "stage": "pricing", "detail": "…",
        "attribution_key": good.attribution_key, "usage_id": None,
        "fields": {"topic": "genai.usage", "partition": 0, "offset": 11, "key": "team=search"}}


def test_a_call_whose_rows_cannot_be_made_is_rejected_and_the_rest_get_their_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # rows are made after the batch's spend went out (stage.py): one call the mapping cannot handle must not stop
    # the stage either; its message is dead-lettered, the other calls of the chunk get their rows
    config = Config()
    stage = PricingStage(config, PriceCatalog(), Billing(), PolicyFile(None, config.policy))
    good, bad = usage_event(1), usage_event(2, model="gpt-4o-mini")
    out = stage._cost([(good, 0, 10), (bad, 0, 11)], {})[1]
    calls = [PricedCall(good, 0, 10, Decimal(1)), PricedCall(bad, 0, 11, Decimal(1))]

    def breaks(priced: PricedUsage, billing: Billing, costs: Sequence[Decimal]) -> list[bytes]:
        if priced.event.id == bad.id:
            raise ZeroDivisionError("a row the mapping cannot make")
        return focus_values(priced, billing, costs)

    monkeypatch.setattr(cost_records, "focus_values", breaks)
    rows = stage._rows(calls, out.priced, out.line_costs, set())
    assert {orjson.loads(value)["x_UsageId"] for _, value in rows} == {good.id}
    [(_, letter)] = stage._row_rejections.take()
    assert orjson.loads(letter)["reason"] == "processing_failed"
    assert orjson.loads(letter)["fields"] == {"topic": "genai.usage", "partition": 0, "offset": 11,
                                              "key": good.attribution_key}
