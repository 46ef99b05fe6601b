"""The FOCUS files rebuild guardrail state only where the stream never counted: a takeover whose changelog
has state must not add the files on top (the backlog on `genai.spend` is in the files already), a cold
partition (emptied broker) takes the files' totals, a budget added by a reload takes them for a scope with
no state."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.export.files import focus_dir, partition_of, write_partition
from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.guardrails.stage import GuardrailStage, PartitionState, apply_messages, cold_partitions
from pipeline.guardrails.state import month_of
from pipeline.kafka.producer import partition_for
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.config import config_from_dict
from schemas.focus import decode_row
from schemas.spend import SpendMessage, decode_spend
from schemas.usage import TokenCounts, UsageEvent

PARTITIONS = 12
CONFIG = config_from_dict({"billing_currency": "EUR", "fx": {"USD": 0.92},
                           "budgets": [{"scope": {"team": "ads"}, "period": "monthly", "amount": 1000}]})


def priced_calls(n: int) -> tuple[list[PricedCall], list[bytes], Decimal]:
    """n calls that started in the last minute (within the velocity windows the files' buckets are read for)."""
    start_s = int(time.time()) - 60
    events = [UsageEvent(id=f"u-{i}", trace_id="t", span_id=f"s{i}", parent_span_id=None,
                         start_time_unix_nano=(start_s + i) * 10**9, end_time_unix_nano=(start_s + i + 1) * 10**9,
                         operation="chat", provider="openai", request_model="gpt-4o", response_model="gpt-4o",
                         tokens=TokenCounts(input_uncached=100_000, output=50_000),
                         attribution={"team": "ads", "env": "prod"}, attribution_key="team=ads", allocated=True)
              for i in range(n)]
    out = cost_records(events, PriceCatalog.from_config(CONFIG), Billing.from_config(CONFIG))
    billed = [b for b in out.billed if b is not None]
    calls = [PricedCall(e, 0, i, b) for i, (e, b) in enumerate(zip(events, billed, strict=True))]
    return calls, [v for _, v in out.rows], sum(billed, Decimal(0))


def spend(calls: list[PricedCall]) -> list[SpendMessage]:
    return [m for _, v in spend_records(calls, ScopeIndex(CONFIG.policy), time.time_ns())
            if isinstance(m := decode_spend(v), SpendMessage)]


def write_files(data: Path, rows: list[bytes]) -> None:
    by_day: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in map(decode_row, rows):
        by_day.setdefault(partition_of(row), []).append(row)
    for (period, day), day_rows in by_day.items():
        write_partition(focus_dir(data), period, day, day_rows)


def stage(data: Path) -> GuardrailStage:
    built = GuardrailStage(CONFIG, PolicyFile(None, CONFIG.policy), data)
    built._spend_partitions = PARTITIONS
    return built


def ads_total(partition: PartitionState) -> Decimal:
    return partition.scopes["team=ads"].periods[month_of(int(time.time()) - 60)]


def test_a_takeover_with_a_backlog_the_files_already_hold_counts_each_call_once(tmp_path: Path) -> None:
    calls, rows, truth = priced_calls(20)
    write_files(tmp_path, rows)  # the exporter wrote all 20 while the partition had no owner
    before = PartitionState({})
    apply_messages(before, spend(calls[:10]), CONFIG.policy, int(time.time()))  # in the changelog
    p = partition_for(b"team=ads", PARTITIONS)
    restored = {p: before}
    assert cold_partitions(restored) == {}  # so _restore leaves it to its changelog
    # and should the files be consulted anyway, a scope with state is the stream's: the files do not add to it
    asyncio.run(stage(tmp_path)._apply_files(restored, cold=False))
    apply_messages(before, spend(calls[10:]), CONFIG.policy, int(time.time()))  # the backlog after the commit
    assert ads_total(before) == truth


def test_a_cold_partition_takes_the_files_totals(tmp_path: Path) -> None:
    _, rows, truth = priced_calls(20)
    write_files(tmp_path, rows)
    p = partition_for(b"team=ads", PARTITIONS)
    restored = {p: PartitionState({})}
    assert cold_partitions(restored) == restored
    asyncio.run(stage(tmp_path)._apply_files(restored, cold=True))
    assert ads_total(restored[p]) == truth
    assert restored[p].watching_since_s is not None  # spend before a new scope's first call is known zero


def test_a_budget_added_by_a_reload_fills_only_a_scope_with_no_state(tmp_path: Path) -> None:
    calls, rows, truth = priced_calls(20)
    write_files(tmp_path, rows)
    p = partition_for(b"team=ads", PARTITIONS)
    counted = PartitionState({})
    apply_messages(counted, spend(calls), CONFIG.policy, int(time.time()))
    asyncio.run(stage(tmp_path)._apply_files({p: counted}, cold=False, scopes={"team=ads"}))
    assert ads_total(counted) == truth  # not 2x: the stream had counted it
    empty = PartitionState({}, watching_since_s=int(time.time()) - 3600)
    asyncio.run(stage(tmp_path)._apply_files({p: empty}, cold=False, scopes={"team=ads"}))
    assert ads_total(empty) == truth
