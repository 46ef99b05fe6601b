"""`spendstream reprice`'s shell: read `genai.deadletter` and the files, publish what the cores decide.

pipeline/pricing/reprice.py says how each repriced call counts once (markers on `genai.deadletter`, row ids,
spend placed at the marker's offset); pipeline/pricing/restate.py how `--restate` corrects rows (correction rows
on `genai.cost.focus`, ids that make a second run add nothing).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

import duckdb
import orjson
from aiokafka import ConsumerRecord, TopicPartition

from pipeline.guardrails.history import recorded_row_ids, recorded_usage_ids
from pipeline.guardrails.spend import ScopeIndex
from pipeline.guardrails.state import day_of
from pipeline.kafka.consumer import read_to_end, reader
from pipeline.kafka.producer import BatchProducer
from pipeline.pricing.catalog import PriceCatalog
from pipeline.pricing.focus import Billing
from pipeline.pricing.reprice import (
    DeadLetters,
    add_dead_letter,
    choose,
    in_range,
    marked_outputs,
    marker_records,
)
from pipeline.pricing.restate import FileRow, Restatement, corrections, restate_marker_records, restated_spend
from schemas.codec import plain_decimal
from schemas.config import Config
from schemas.errors import SpendstreamError
from schemas.focus import REQUEST_FILES, request_files_glob
from schemas.swap_lock import reading_request_files
from schemas.topics import TopicNames

_NS = 1_000_000_000
#: how long to wait for the markers just written to be read back
MARKERS_VISIBLE_S = 30.0


@dataclass(slots=True)
class ModelTotal:
    calls: int = 0
    cost: Decimal = Decimal(0)


@dataclass(slots=True)
class RepriceResult:
    """What one run did, for people."""

    currency: str
    #: (provider, model) -> the calls priced by this run and their billed cost
    priced: dict[tuple[str, str], ModelTotal] = field(default_factory=dict)
    marked_before: int = 0
    in_files: int = 0
    #: (provider, model, reason) -> calls still without a price
    still_unpriced: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: marked calls no price covers any more (an override removed since they were marked): not published
    unpriced_now: int = 0
    without_call: int = 0
    #: calls priced by earlier runs (in any range) whose outputs this run sent again
    republished: int = 0


async def _dead_letters(config: Config, topic: str) -> DeadLetters:
    consumer = reader(config.kafka)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise SpendstreamError(f"no topic {topic} on {config.kafka.bootstrap_servers}")
        letters = DeadLetters()

        def fold(record: ConsumerRecord[bytes, bytes]) -> None:  # as read: the topic may hold many rejected messages
            add_dead_letter(letters, record.partition, record.offset, record.value or b"")

        await read_to_end(consumer, [TopicPartition(topic, p) for p in sorted(partitions)], fold)
    finally:
        await consumer.stop()
    return letters


async def _until_read_back(config: Config, topic: str, written: Callable[[DeadLetters], bool]) -> DeadLetters:
    """The dead letters, once the markers just written can be read back (`written` says so)."""
    deadline = time.monotonic() + MARKERS_VISIBLE_S
    while True:
        letters = await _dead_letters(config, topic)
        if written(letters):
            return letters
        if time.monotonic() > deadline:
            raise SpendstreamError(f"the markers written to {topic} could not be read back within "
                                   f"{MARKERS_VISIBLE_S:g} s; run spendstream reprice again (nothing counts twice)")
        await asyncio.sleep(0.5)


async def reprice(config: Config, data_dir: Path, since_ns: int, until_ns: int | None) -> RepriceResult:
    """Price the unpriced calls that started in [since_ns, until_ns) and now have a price, and publish their rows and
    spend, with those of every call an earlier run priced that the files do not hold yet (downstream keeps one of
    each). Re-sending all of them,
    whatever the range, is what makes a run that crashed, or ran at the same time, harmless: a run that places
    spend at a marker's offset also places, in the same messages, the spend of every earlier marker, so stage 2
    never sees a later marker's spend before an earlier one's."""
    catalog = PriceCatalog.from_config(config)
    billing = Billing.from_config(config)
    names = TopicNames(config.kafka.topic_prefix)
    letters = await _dead_letters(config, names.deadletter)
    calls = in_range(letters.unpriced.values(), since_ns, until_ns)
    in_files = await asyncio.to_thread(recorded_usage_ids, data_dir, [c.id for c in calls], since_ns // _NS)
    choice = choose(calls, letters.marked(), in_files, catalog)
    result = RepriceResult(billing.currency, marked_before=choice.marked_before, in_files=choice.in_files,
                           without_call=letters.without_call)
    for event, exc in choice.still_unpriced:
        result.still_unpriced[(event.provider or "-", event.model or "-", exc.reason)] += 1
    producer = BatchProducer.of(config.kafka, os.environ)
    await producer.start()
    try:
        if choice.to_mark:
            await producer.send_all(names.deadletter, marker_records(choice.to_mark))
            letters = await _until_read_back(config, names.deadletter,
                                             lambda read: set(choice.to_mark) <= read.marked().keys())
        marked = [(marker, letters.unpriced[usage_id]) for usage_id, marker in letters.marked().items()
                  if usage_id in letters.unpriced]
        written = await asyncio.to_thread(
            recorded_usage_ids, data_dir, [event.id for _, event in marked],
            min((event.start_time_unix_nano for _, event in marked), default=since_ns) // _NS)
        outputs = marked_outputs(marked, catalog, billing, ScopeIndex(config.policy),
                                 time.time_ns() + config.collector.max_skew_s * 10**9, written=written)
        # the spend before the rows: once the files hold a call, no later run sends its spend (reprice.py)
        await producer.send_all(names.spend, outputs.spend)
        await producer.send_all(names.cost_focus, outputs.rows)
    finally:
        await producer.stop()
    new = set(choice.to_mark)
    for event, billed in outputs.billed:
        if billed is None:
            result.unpriced_now += 1
        elif event.id in new:
            total = result.priced.setdefault((event.provider or "-", event.model or "-"), ModelTotal())
            total.calls += 1
            total.cost += billed
    result.republished = len(marked) - len(new)
    return result


def describe(result: RepriceResult) -> str:
    """The run's outcome as people read it."""
    lines = []
    total = sum((t.cost for t in result.priced.values()), Decimal(0))
    count = sum(t.calls for t in result.priced.values())
    lines.append(f"priced now: {count:,} calls, {plain_decimal(total)} {result.currency}")
    for (provider, model), model_total in sorted(result.priced.items()):
        lines.append(f"  {provider} {model}: {model_total.calls:,} calls, {plain_decimal(model_total.cost)} "
                     f"{result.currency}")
    lines.append(f"priced by an earlier reprice: {result.marked_before:,} calls (their rows and spend, and those of "
                 f"all {result.republished:,} calls repriced before, sent again: the files and budgets keep each once)")
    if result.in_files:
        lines.append(f"already in the FOCUS files (priced another way): {result.in_files:,} calls")
    unpriced = sum(result.still_unpriced.values())
    lines.append(f"still unpriced: {unpriced:,} calls")
    for (provider, model, reason), calls in sorted(result.still_unpriced.items()):
        lines.append(f"  {provider} {model} ({reason}): {calls} calls")
    if result.unpriced_now:
        lines.append(f"repriced before but without a price now (an override removed?): {result.unpriced_now:,} "
                     "calls, not published")
    if result.without_call:
        lines.append(f"unpriced letters that do not carry the call (written by an older spendstream): "
                     f"{result.without_call:,}, cannot be repriced")
    return "\n".join(lines)



_FILE_ROWS: Final = """
    SELECT "x_RowId", "x_UsageId", "x_TraceId", "x_SpanId", CAST(epoch("ChargePeriodStart") AS BIGINT), "x_Provider",
           "x_Model", "x_RequestModel", "x_Operation", "x_ServiceTier", "Tags", "x_AttributionKey",
           coalesce("x_Allocated", true), "x_Meter", CAST("ConsumedQuantity" AS BIGINT), "ChargeClass",
           "BilledCost", "EffectiveCost", "ContractedCost", "ListCost", "PricingCurrencyEffectiveCost"
    FROM read_parquet('{glob}', hive_partitioning = true, union_by_name = true)
    WHERE "ChargePeriodStart" >= to_timestamp(?) AND "ChargePeriodStart" < to_timestamp(?)
      AND charge_date >= CAST(? AS DATE)"""


def file_rows(data_dir: Path, since_s: int, until_s: int) -> list[FileRow]:
    """The rows (originals and corrections) charged in [since_s, until_s), from the request-level files."""
    if not any(data_dir.glob(REQUEST_FILES)):
        raise SpendstreamError(f"no FOCUS files under {data_dir} to restate")
    with reading_request_files(data_dir), duckdb.connect() as con:  # never across a compaction swap
        con.execute("SET TimeZone = 'UTC'")
        found = con.execute(_FILE_ROWS.format(glob=request_files_glob(data_dir)),
                            [since_s, until_s, day_of(since_s)]).fetchall()
    return [FileRow(row_id, usage_id, trace_id, span_id, start_s, provider, model, request_model, operation, tier,
                    orjson.loads(tags) if tags else {}, key, allocated, meter, quantity, charge_class, tuple(costs))
            for (row_id, usage_id, trace_id, span_id, start_s, provider, model, request_model, operation, tier, tags,
                 key, allocated, meter, quantity, charge_class, *costs) in found]


async def restate(config: Config, data_dir: Path, since_ns: int, until_ns: int | None) -> Restatement:
    """Publish correction rows for the rows charged in [since_ns, until_ns) whose price changed, and their spend
    (pipeline/pricing/restate.py): markers first, then the spend of every restatement marker, then the rows."""
    catalog = PriceCatalog.from_config(config)
    until_s = until_ns // _NS if until_ns is not None else time.time_ns() // _NS + 1
    rows = await asyncio.to_thread(file_rows, data_dir, since_ns // _NS, until_s)
    names = TopicNames(config.kafka.topic_prefix)
    letters = await _dead_letters(config, names.deadletter)
    known = {row_id for marker in letters.restated for row_id in marker.row_ids}
    out = corrections(rows, catalog, Billing.from_config(config), known)
    new = [fix for fix in out.corrected if fix.row_id not in known]  # a rerun before the exporter wrote them: known
    producer = BatchProducer.of(config.kafka, os.environ)
    await producer.start()
    try:
        if new:
            await producer.send_all(names.deadletter, restate_marker_records(new, ScopeIndex(config.policy)))
            ids = {fix.row_id for fix in new}
            letters = await _until_read_back(config, names.deadletter, lambda read: ids <= {
                row_id for marker in read.restated for row_id in marker.row_ids})
        # the spend before the rows: once the files hold the rows, a rerun finds nothing to correct, nor sends
        # their spend again
        marked = [row_id for marker in letters.restated for row_id in marker.row_ids]
        since_s = min((bucket for marker in letters.restated for entries in marker.spend.values()
                       for bucket, _, _ in entries), default=since_ns // _NS)
        written = await asyncio.to_thread(recorded_row_ids, data_dir, marked, since_s)
        await producer.send_all(names.spend, restated_spend(letters.restated, written))
        await producer.send_all(names.cost_focus, out.rows)
    finally:
        await producer.stop()
    return out


def describe_restatement(out: Restatement, currency: str) -> str:
    return (f"rows checked: {out.checked:,}; unchanged: {out.unchanged:,}; not priced by today's catalog (left as "
            f"they are): {out.not_restated:,}; waiting for the exporter to write an earlier restatement's "
            f"corrections (run again once it has): {out.pending:,}\ncorrection rows: {len(out.rows):,}, net BilledCost "
            f"{plain_decimal(out.net_billed)} {currency}")
