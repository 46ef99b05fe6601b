"""The floor of the end-to-end path, part by part: CPU per span of each step, on one core, with the project's code.

    .venv/bin/python bench/floor.py [--spans 20480] [--rounds 3] [--broker-ms 14] [--client-ms 6] [--compression zstd]

Over the distinct spans bench/e2e.py sends (its payloads), each part of the path is run alone, by thread CPU time
(`time.thread_time`, which other jobs on a shared machine do not add to), best of `--rounds`, and divided by the
spans. A part is fed what the part before it made, in the chunks the roles use (a 512-span request, a fetch of 500
usage messages, 250 calls' rows a send, 2,048 rows a pack, one flush of every row):

  a  bare decode-and-walk of the OTLP payloads (bench/ingest.py's baseline: a reference, not a part of the path)
  b  collector: decode, normalise and attribute (`ingest_request`), `genai.usage` values as it publishes them
  c  the usage values as Kafka record batches, per partition, compressed (aiokafka's builder, as the producer)
  d  worker: the usage batches read back (aiokafka's fetcher records, CRCs checked), decoded, usage-id dedupe
  e  worker: pricing (`price_calls`: `price_usages`, the lines' costs, the metric totals)
  e2 worker: the spend per scope for stage 2 (`spend_records`)
  e3 worker, stage 2: the spend added to its scopes' windows, the scopes that changed decided, their state encoded
  f  worker: the FOCUS rows as `genai.cost.focus` values (`focus_records`)
  g  the rows as record batches, compressed: the public topic, needed in either design
  design A (today): the exporter reads the rows back (A1), decodes and packs them (`pack_values`, A2), and writes
     the request files with its row-id dedupe (`write_rows` and its `RowLedger`, A3)
  design B: the worker writes the request files from the calls it priced: Arrow columns built from the priced
     calls and the row templates (`ColumnarRows`, B1; the table equals design A's: tests/unit/test_floor_columnar.py),
     then the same `write_rows`, ledger included (B2)

Not in any part: the event loops, gRPC's server, the Kafka protocol and sockets, the small topics (spend, breaker
commands, changelog) and metrics: what the roles spend beyond their data path. The sums are a floor: bench/e2e.py
measures the whole (~243 ms per 1,000 spans). Each design's sum adds the broker's and the clients' CPU (parameters:
bench/e2e.py's figures) and gives the 2-core ceiling it implies, against the 20,000 spans/s target: 100 µs of CPU a
span on 2 cores. The chart goes to bench/results/floor.svg.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import bar_chart
from bench.e2e import SPANS_PER_REQUEST, build_payloads
from bench.e2e import config as e2e_config
from bench.ingest import baseline as decode_and_walk
from collector.decode import decode_protobuf
from collector.ingest import NestedCallFilter, ingest_request
from collector.service import _usage_records as usage_records  # what the collector publishes, exactly
from pipeline.export.exporter import PACK_ROWS
from pipeline.export.files import ARROW_SCHEMAS, RowLedger, pack_values, partition_keys, write_rows
from pipeline.guardrails.decide import Context
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.guardrails.stage import PartitionState, apply_messages, decide_partition
from pipeline.pricing import PriceCatalog, PricedUsage
from pipeline.pricing import focus as rows_core
from pipeline.pricing.cost_records import CostOutput, focus_records, price_calls
from pipeline.pricing.dedupe import SeenUsage
from pipeline.pricing.focus import Billing
from pipeline.pricing.stage import BATCH_MAX_MESSAGES, ROWS_CHUNK_CALLS
from schemas.codec import Record
from schemas.config import Config, config_from_dict
from schemas.focus import COLUMNS_BY_VERSION, MONEY_QUANTUM, encode_row
from schemas.guardrail_state import encode_state_value
from schemas.policy import Policy
from schemas.spend import decode_spend
from schemas.usage import UsageEvent, decode_usage_batch

RESULTS: Final = Path(__file__).parent / "results"
#: the producer's (pipeline/kafka/producer.py, BatchProducer's max_batch_size)
BATCH_BYTES: Final = 1 << 20
TARGET_SPANS_S: Final = 20_000
CORES: Final = 2
BUDGET_US: Final = CORES * 1e6 / TARGET_SPANS_S  # CPU a span at the target
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_NS: Final = 1_000_000_000

T = TypeVar("T")
#: the record batches of one topic: (partition, batch bytes)
Batches = list[tuple[int, bytes]]


# --- design B: FOCUS request files written from the priced calls, columnar -------------------------------------

#: which of the worker's row parts (pipeline/pricing/focus.py) a column's value comes from
_CALL_ROLES: Final = ("kind", "attribution", "second")


class ColumnarRows:
    """Design B's prototype: the FOCUS rows of priced calls as an Arrow table with the files' schema, built
    column by column from the parts the worker's rows are spliced from (focus.py: the constant columns, the
    call's columns by what they depend on, the price point's columns, and each row's quantities), so that per row
    only indices, ids and the three money products are Python work. Equal to the table the exporter writes from
    the JSON rows of the same calls (tests/unit/test_floor_columnar.py)."""

    def __init__(self, billing: Billing) -> None:
        self._billing = billing
        self._columns = COLUMNS_BY_VERSION[billing.focus_version]
        self._schema = ARROW_SCHEMAS[billing.focus_version]
        names = {name for name, _ in self._columns}
        call_columns = rows_core._CALL_COLUMNS & names
        #: role -> its columns in this version, in file order
        self._role_columns = {role: [name for name, _ in self._columns
                                     if name in call_columns and rows_core._role(name) == role]
                              for role in _CALL_ROLES}
        self._point_columns = [name for name, _ in self._columns if name in rows_core._POINT_COLUMNS]
        #: role -> cache key -> the role's column values (a call's `_call_columns`, once a distinct key), and the
        #: price a "kind" key names by id(), held so that its id is never reused
        self._templates: dict[str, dict[Any, tuple[tuple[Any, ...], object]]] = {role: {} for role in _CALL_ROLES}

    def _template(self, role: str, key: Any, priced: PricedUsage) -> tuple[Any, ...]:
        cache = self._templates[role]
        cached = cache.get(key)
        if cached is None:
            if len(cache) >= 10_000:
                cache.clear()  # bounded, as the worker's caches
            values = rows_core._call_columns(priced, self._billing)
            cached = cache[key] = (tuple(values[name] for name in self._role_columns[role]), priced.price)
        return cached[0]

    def table(self, priced: Sequence[PricedUsage], line_costs: Sequence[Sequence[Decimal]]) -> pa.Table:
        """The rows of the priced calls, with each line's BilledCost (`price_calls`' `line_costs`), in order."""
        billing, exact = self._billing, rows_core._EXACT
        local: dict[str, dict[Any, int]] = {role: {} for role in (*_CALL_ROLES, "point")}
        used: dict[str, list[Any]] = {role: [] for role in (*_CALL_ROLES, "point")}
        rows: dict[str, list[int]] = {role: [] for role in (*_CALL_ROLES, "point")}
        usage_ids: list[str] = []
        trace_ids: list[str] = []
        span_ids: list[str] = []
        row_ids: list[str] = []
        billed: list[Decimal] = []
        consumed: list[int] = []
        listed: list[Decimal] = []
        pc_effective: list[Decimal] = []
        quantities: list[Decimal] = []
        for call, costs in zip(priced, line_costs, strict=True):
            event = call.event
            keys = ((id(call.price), call.catalog_version, event.provider, event.response_model, event.request_model,
                     event.operation, event.service_tier, event.allocated, event.adjusted_count),
                    (event.attribution_key, *event.attribution.items()),
                    event.start_time_unix_nano // _NS)
            at = []
            for role, key in zip(_CALL_ROLES, keys, strict=True):
                index = local[role].get(key)
                if index is None:
                    index = local[role][key] = len(used[role])
                    used[role].append(self._template(role, key, call))
                at.append(index)
            at_kind, at_attribution, at_second = at
            for line, cost in zip(call.lines, costs, strict=True):
                point = rows_core._price_point(call, line, billing)
                index = local["point"].get(id(point))
                if index is None:
                    index = local["point"][id(point)] = len(used["point"])
                    used["point"].append(point)
                rows["point"].append(index)
                rows["kind"].append(at_kind)
                rows["attribution"].append(at_attribution)
                rows["second"].append(at_second)
                usage_ids.append(event.id)
                trace_ids.append(event.trace_id)
                span_ids.append(event.span_id)
                row_ids.append(f"{event.id}/{line.meter}")
                quantity = exact.divide(Decimal(line.quantity), point.per)
                billed.append(cost)
                consumed.append(line.quantity)
                listed.append(exact.multiply(point.list_unit, quantity).quantize(MONEY_QUANTUM, context=exact))
                pc_effective.append(exact.multiply(point.pc_contract_unit, quantity)
                                    .quantize(MONEY_QUANTUM, context=exact))
                quantities.append(quantity)
        per_row: dict[str, Any] = {
            "BilledCost": billed, "ContractedCost": billed, "EffectiveCost": billed, "ConsumedQuantity": consumed,
            "ListCost": listed, "PricingCurrencyEffectiveCost": pc_effective, "PricingQuantity": quantities,
            "x_RowId": row_ids, "x_UsageId": usage_ids, "x_TraceId": trace_ids, "x_SpanId": span_ids}
        templates = {role: {name: [t[i] for t in used[role]] for i, name in enumerate(self._role_columns[role])}
                     for role in _CALL_ROLES}
        templates["point"] = {name: [p.columns[name] for p in used["point"]] for name in self._point_columns}
        indices = {role: pa.array(positions, pa.int32()) for role, positions in rows.items()}
        n = len(row_ids)
        converted: dict[int, pa.Array] = {}  # id of a per-row list -> its array: BilledCost's serves three columns
        arrays = []
        for name, kind in self._columns:
            field_type = self._schema.field(name).type
            if name in per_row:
                values = per_row[name]
                if id(values) not in converted:
                    converted[id(values)] = (pa.array(values, pa.int64()).cast(field_type)
                                             if name == "ConsumedQuantity" else pa.array(values, field_type))
                arrays.append(converted[id(values)])
                continue
            source = next((r for r, columns in templates.items() if name in columns), None)
            if source is None:  # the same on every row: a constant, or null
                arrays.append(pa.repeat(pa.scalar(_value(kind, rows_core._CONSTANTS.get(name)), field_type), n))
                continue
            arrays.append(_values_array(kind, templates[source][name], field_type).take(indices[source]))
        return pa.Table.from_arrays(arrays, schema=self._schema)


def _value(kind: str, value: Any) -> Any:
    """A column's value as Arrow takes it for the files' type."""
    return None if value is None else encode_row(value) if kind == "json" else value


def _values_array(kind: str, values: list[Any], field_type: pa.DataType) -> pa.Array:
    """The distinct values of a column (its dictionary), in the files' type."""
    if kind == "datetime":
        return pc.strptime(pa.array(values, pa.string()), format=_TIME_FORMAT, unit="s").cast(field_type)
    return pa.array([_value(kind, v) for v in values], field_type)


# --- the parts ---------------------------------------------------------------------------------------------------

def walk(payloads: Sequence[bytes]) -> int:
    """a: bench/ingest.py's baseline over every payload."""
    for payload in payloads:
        decode_and_walk(payload)
    return len(payloads)


def collect(payloads: Sequence[bytes], config: Config) -> list[list[Record]]:
    """b: each request's `genai.usage` records, as the collector makes them."""
    nested = NestedCallFilter()
    out = []
    for payload in payloads:
        decoded = decode_protobuf(payload)
        result = ingest_request(decoded.request, config, None, nested, rejected=decoded.rejected)
        out.append(usage_records(result.events, config.collector.max_events_per_message))
    return out


class Placement:
    """Keys to partitions as the producer places them (murmur2, remembered per key)."""

    def __init__(self, partitions: int) -> None:
        self._every = list(range(partitions))
        self._placed: dict[bytes, int] = {}
        self._partitioner = DefaultPartitioner()

    def __call__(self, key: bytes) -> int:
        partition = self._placed.get(key)
        if partition is None:
            partition = self._placed[key] = self._partitioner(key, self._every, self._every)
        return partition


def record_batches(sends: Sequence[Sequence[Record]], codec: int, place: Placement) -> Batches:
    """c, g: each send's records as compressed record batches, one a partition (more when one fills), as
    `BatchProducer.enqueue_to` makes them with aiokafka's builder; built as its sender builds them
    (`MessageBatch.get_data_buffer` calls `_build`)."""
    out: Batches = []
    for records in sends:
        by_partition: defaultdict[int, list[Record]] = defaultdict(list)
        for key, value in records:
            by_partition[place(key)].append((key, value))
        for partition, items in by_partition.items():
            batch = BatchBuilder(BATCH_BYTES, codec)
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    out.append((partition, bytes(batch._build())))
                    batch = BatchBuilder(BATCH_BYTES, codec)
                    batch.append(key=key, value=value, timestamp=None)
            out.append((partition, bytes(batch._build())))
    return out


def read_back(batches: Batches, topic: str) -> list[tuple[int, int, bytes]]:
    """A1, and d's first step: the (partition, offset, value) of every record, as the consumer's fetcher unpacks
    them. A built batch's offsets start at 0: a record's offset here is its place among its partition's."""
    out = []
    offsets: defaultdict[int, int] = defaultdict(int)
    for partition, batch in batches:
        records = PartitionRecords(TopicPartition(topic, partition), MemoryRecords(batch), [], 0, None, None, True,
                                   READ_UNCOMMITTED)
        first = offsets[partition]
        read = [(record.partition, first + record.offset, record.value) for record in records]
        offsets[partition] += len(read)
        out += read
    return out


#: (usage event, usage partition, usage offset), as the stage keeps a call
Located = tuple[UsageEvent, int, int]


def decode_usage(batches: Batches, horizon_s: int) -> list[list[Located]]:
    """d: the usage records read back, decoded, and each usage id checked against the partition's, in fetches of
    the stage's BATCH_MAX_MESSAGES messages."""
    seen: defaultdict[int, SeenUsage] = defaultdict(lambda: SeenUsage(horizon_s))
    values = read_back(batches, "genai.usage")
    fetches = []
    for start in range(0, len(values), BATCH_MAX_MESSAGES):
        fresh = []
        for partition, offset, value in values[start:start + BATCH_MAX_MESSAGES]:
            fresh += [(event, partition, offset) for event in decode_usage_batch(value)
                      if seen[partition].first_time(event.id, event.start_time_unix_nano // _NS)]
        fetches.append(fresh)
    return fetches


def price(fetches: Sequence[Sequence[Located]], catalog: PriceCatalog, billing: Billing) -> list[CostOutput]:
    """e: each fetch priced, as the stage prices it."""
    return [price_calls([event for event, _, _ in calls], catalog, billing) for calls in fetches]


def spend(fetches: Sequence[Sequence[Located]], outputs: Sequence[CostOutput], index: ScopeIndex
          ) -> list[list[Record]]:
    """e2: each fetch's spend per scope for stage 2 (`spend_records`), as the stage sends it before the rows."""
    latest_ns = max(event.start_time_unix_nano for calls in fetches for event, _, _ in calls) + 10 * _NS
    return [spend_records([PricedCall(event, partition, offset, billed) for (event, partition, offset), billed
                           in zip(calls, out.billed, strict=True) if billed is not None], index, latest_ns)
            for calls, out in zip(fetches, outputs, strict=True)]


def guard(sends: Sequence[Sequence[Record]], policy: Policy, currency: str, place: Placement) -> int:
    """e3: stage 2, as `GuardrailStage._process` runs a fetch: each spend value decoded and added to its scope's
    windows, then the scopes that changed decided and their state encoded for the changelog. Returns the decisions."""
    states: defaultdict[int, PartitionState] = defaultdict(lambda: PartitionState({}))
    wall_s = int(time.time()) + 3_600  # the spans' times are now: none waits for the clock
    decisions = 0
    for records in sends:
        by_partition: defaultdict[int, list[bytes]] = defaultdict(list)
        for key, value in records:
            by_partition[place(key)].append(value)
        for p, values in by_partition.items():
            partition = states[p]
            changed: set[str] = set()
            for value in values:
                changed |= apply_messages(partition, [decode_spend(value)], policy, wall_s)
            decided, dirty = decide_partition(partition, changed, Context(policy, currency, partition.clock_s,
                                                                          time.time()))
            decisions += len(decided.alerts) + len(decided.commands)
            for scope in dirty:
                encode_state_value(partition.scopes[scope].to_value())
    return decisions + 1  # never None: Parts.run's result


def make_rows(outputs: Sequence[CostOutput], billing: Billing) -> list[list[Record]]:
    """f: the FOCUS rows, ROWS_CHUNK_CALLS calls a send, as the stage makes them."""
    return [focus_records(out.priced[start:start + ROWS_CHUNK_CALLS], out.line_costs[start:start + ROWS_CHUNK_CALLS],
                          billing)
            for out in outputs for start in range(0, len(out.priced), ROWS_CHUNK_CALLS)]


def pack(values: Sequence[bytes]) -> list[pa.Table]:
    """A2: the exporter's packing, PACK_ROWS values at a time (the whole value list: one partition's order does
    not change the cost)."""
    tables = []
    for start in range(0, len(values), PACK_ROWS):
        packed, refused = pack_values(values[start:start + PACK_ROWS])
        if refused:
            raise SystemExit(f"the exporter refused {len(refused)} of the pipeline's own rows: {refused[0]}")
        tables += [p.table for p in packed]
    return tables


def write(tables: Sequence[pa.Table], root: Path) -> int:
    """A3, B2: one flush's request files, into a new directory, with a new ledger: every row is new."""
    return write_rows(root, tables, RowLedger(root)).rows


def ledger_alone(tables: Sequence[pa.Table], root: Path) -> int:
    """The row-id dedupe of A3 and B2 by itself: each row id checked and remembered (no file to read)."""
    ledger, fresh = RowLedger(root), 0
    for table in tables:
        keys = partition_keys(table)
        for key in keys.unique().to_pylist():
            period, day = key.split("/")
            mask = pc.equal(keys, key)
            fresh += pc.sum(ledger.fresh(period, day, table.filter(mask).column("x_RowId").combine_chunks())).as_py()
    return fresh


# --- measuring ---------------------------------------------------------------------------------------------------

class Parts:
    """Each part's best CPU time (of the rounds) per span, in µs, printed as it is measured."""

    def __init__(self, spans: int, rounds: int) -> None:
        self.spans, self.rounds = spans, rounds
        self.us: dict[str, float] = {}

    def run(self, label: str, fn: Callable[[], T]) -> T:
        best, result = float("inf"), None
        for _ in range(self.rounds):
            result = None  # the last round's output is freed before the next is made
            gc.collect()
            gc.freeze()  # what earlier parts made is not this part's collector work
            began = time.thread_time()
            result = fn()
            best = min(best, time.thread_time() - began)
        self.us[label] = best / self.spans * 1e6
        print(f"  {label:<58} {self.us[label]:7.1f} µs a span", flush=True)
        assert result is not None
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_480, help="distinct spans (default 20,480: 40 requests)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each part; the least CPU counts (default 3)")
    parser.add_argument("--broker-ms", type=float, default=14.0,
                        help="the broker's CPU per 1,000 spans (default 14: bench/e2e.py measured 12-16)")
    parser.add_argument("--client-ms", type=float, default=6.0,
                        help="the OTLP clients' CPU per 1,000 spans (default 6: bench/e2e.py)")
    parser.add_argument("--compression", default=Config().kafka.compression,
                        help=f"kafka.compression (default {Config().kafka.compression}, the config's)")
    args = parser.parse_args()
    # bench/e2e.py's config: its compression, and its policy (500 keys with a ceiling, velocity per team)
    config = config_from_dict(yaml.safe_load(e2e_config(1.0, args.compression)))
    codec: int = getattr(DefaultRecordBatch, f"CODEC_{config.kafka.compression.upper()}")
    billing = Billing.from_config(config)
    print(f"building {args.spans:,} distinct spans in {SPANS_PER_REQUEST}-span requests (bench/e2e.py's) and the "
          "price catalog", flush=True)
    payloads = build_payloads(args.spans, 0)
    catalog = PriceCatalog()
    parts = Parts(args.spans, args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="spendstream-floor-"))
    print(f"CPU a span, one thread, best of {args.rounds} (kafka.compression {config.kafka.compression}, "
          f"{config.kafka.partitions} partitions):", flush=True)
    try:
        parts.run("a  bare decode-and-walk (reference)", lambda: walk(payloads))
        usage = parts.run("b  collector: ingest + genai.usage values", lambda: collect(payloads, config))
        # where each topic's keys go, remembered from batch to batch as BatchProducer remembers them
        usage_keys, spend_keys, row_keys = (Placement(config.kafka.partitions) for _ in range(3))
        usage_batches = parts.run("c  usage record batches", lambda: record_batches(usage, codec, usage_keys))
        fetches = parts.run("d  worker: read back + decode usage + dedupe", lambda: decode_usage(
            usage_batches, config.worker.dedupe_horizon_s))
        outputs = parts.run("e  worker: pricing (price_calls)", lambda: price(fetches, catalog, billing))
        scopes = ScopeIndex(config.policy)  # kept from batch to batch, as the stage keeps it
        spent = parts.run("e2 worker: spend per scope for stage 2 (spend_records)", lambda: spend(
            fetches, outputs, scopes))
        parts.run("e3 worker, stage 2: windows and decisions", lambda: guard(
            spent, config.policy, config.billing_currency, spend_keys))
        sends = parts.run("f  worker: FOCUS rows as JSON values (focus_records)", lambda: make_rows(outputs, billing))
        row_batches = parts.run("g  row record batches (the public topic)", lambda: record_batches(
            sends, codec, row_keys))
        rows = sum(map(len, sends))
        size = sum(len(value) for send in sends for _, value in send) / rows
        print(f"    {rows:,} FOCUS rows ({rows / args.spans:.2f} a span) of {size:,.0f} bytes; "
              f"{len(usage_batches):,} usage and {len(row_batches):,} row batches", flush=True)
        values = [value for _, _, value in parts.run("A1 exporter: read the rows back", lambda: read_back(
            row_batches, "genai.cost.focus"))]
        packed = parts.run("A2 exporter: decode and pack (pack_values)", lambda: pack(values))
        a_dirs, b_dirs = (itertools.count() for _ in range(2))  # a new directory each round
        parts.run("A3 exporter: request files + row-id ledger (write_rows)", lambda: write(
            packed, tmp / f"a{next(a_dirs)}"))
        columnar = ColumnarRows(billing)
        tables = parts.run("B1 worker: Arrow columns from the priced calls", lambda: [
            columnar.table(out.priced, out.line_costs) for out in outputs])
        parts.run("B2 worker: request files + row-id ledger (write_rows)", lambda: write(
            tables, tmp / f"b{next(b_dirs)}"))
        parts.run("   of A3 and B2: the row-id ledger alone", lambda: ledger_alone(tables, tmp / "ledger"))
        same = _same_files(tmp / "a0", tmp / "b0")
        print(f"    design B's files hold exactly design A's rows (sorted by x_RowId): {same}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(parts.us, args.broker_ms, args.client_ms)


def _same_files(a: Path, b: Path) -> bool:
    def read(root: Path) -> pa.Table:
        table = pq.read_table(sorted(root.rglob("*.parquet")), partitioning=None)
        return table.sort_by("x_RowId")
    first, second = read(a), read(b)
    return bool(first.equals(second, check_metadata=True))


def report(us: dict[str, float], broker_ms: float, client_ms: float) -> None:
    """Each design's sum, the 2-core ceiling it implies, and what of the 20k budget each part takes."""
    fixed = {"broker (parameter)": broker_ms, "clients (parameter)": client_ms}
    common = [label for label in us if label[0] in "bcdefg"]  # every part but the reference (a) and A's or B's
    designs = {"A": ("today: the exporter reads the topic back", [*common, *(k for k in us if k.startswith("A"))]),
               "B": ("the worker writes the files", [*common, *(k for k in us if k.startswith("B"))])}
    edge = sum(fixed.values()) + sum(us[k] for k in common if k[0] in "bc")
    left = BUDGET_US - edge
    print(f"\nthe budget at {TARGET_SPANS_S:,} spans/s on {CORES} cores: {BUDGET_US:.0f} µs of CPU a span "
          f"(bare decode-and-walk: {us[next(iter(us))]:.1f})")
    print("  parts over it by themselves: " + (", ".join(k.split()[0] for k, v in us.items() if v > BUDGET_US)
                                                 or "none"))
    print(f"  clients, broker and collector (b, c) take {edge:.0f} µs of it, leaving {left:.0f} for the worker and "
          "the files; parts over that by themselves: "
          + (", ".join(k.split()[0] for k, v in us.items() if v > left and k[0] in "defgAB") or "none"))
    sums = {}
    for design, (what, labels) in designs.items():
        total = sums[design] = sum(us[k] for k in labels) + sum(fixed.values())
        biggest = sorted(((us[k], k.split()[0]) for k in labels), reverse=True)[:3]
        print(f"  design {design} ({what}): {total:.0f} µs a span with broker {broker_ms:g} and clients {client_ms:g}"
              f" → at most {CORES * 1e6 / total:,.0f} spans/s on {CORES} cores (without the clients: "
              f"{CORES * 1e6 / (total - client_ms):,.0f}); {total / BUDGET_US:.2f}x the budget, "
              f"{max(0.0, total - BUDGET_US):.0f} µs over; biggest parts "
              + ", ".join(f"{name} {value:.0f}" for value, name in biggest))
    RESULTS.mkdir(exist_ok=True)
    chart = RESULTS / "floor.svg"
    values = {label.strip(): value for label, value in us.items()} | fixed
    values |= {f"sum, design {design} (with broker and clients)": total for design, total in sums.items()}
    values[f"budget at {TARGET_SPANS_S:,} spans/s on {CORES} cores"] = BUDGET_US
    chart.write_text(bar_chart("CPU µs a span, each part alone (A: exporter reads rows back; B: worker writes files)",
                               values, unit=" µs"))
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
