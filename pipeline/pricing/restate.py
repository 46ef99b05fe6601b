"""`spendstream reprice --restate`'s pure core: FOCUS correction rows for rows whose price changed after the fact.

A contracted price can change retroactively (an override whose `valid_from` is in the past). The rows already
written keep what was billed then; history is never rewritten. Each row whose price today differs gets a
correction row (`ChargeClass` "Correction") that nets the difference: its cost columns are today's cost of the
row's units minus what the row and its earlier corrections already hold, so the row plus its corrections sum to
today's price. A correction is the restated row (today's prices, SKU price id and catalog version, the
original's charge period, attribution and usage id) without quantities (FOCUS: ConsumedQuantity and
PricingQuantity may be null on a correction; the usage was counted by the original row).

Its row id is `<original row id>/correction/<digest of the before and after costs>`: running again before the
exporter wrote it gives the same id (the exporter keeps one), and after, the row nets to today's price and
nothing is emitted. A later change of price gives a new digest, so a new correction.

Budgets count corrections once too. Their spend cannot be derived again once the files hold them (they then
net to nothing), so a marker on `genai.deadletter` (reason `restated`) carries it: the correction row ids and
their spend per scope and bucket, written before any of it is published. Every run sends the spend of every
such marker none of whose rows the files hold yet, placed at the marker's (partition, offset) on usage partition
RESTATE_PARTITION_BASE + p (stage 2 adds each once), and only then the rows: a run that stopped anywhere is
completed by the next one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, NamedTuple

import orjson

from pipeline.guardrails.spend import ScopeIndex
from pipeline.guardrails.state import BUCKET_S
from pipeline.pricing.catalog import PriceCatalog, UnpricedError
from pipeline.pricing.focus import INPUT_METERS, Billing, encoded_focus_rows
from pipeline.pricing.price import PricedUsage, priced_line
from pipeline.pricing.reprice import MARKER_KEY, MARKER_MAX_IDS, REPRICE_STAGE, RESTATED, RestateMarker
from schemas.codec import Record
from schemas.deadletter import DeadLetter
from schemas.focus import encode_row
from schemas.spend import SpendEntry, encode_spend
from schemas.usage import TokenCounts, UsageEvent

CORRECTION: Final = "Correction"
#: the cost columns a correction nets; each in the billing currency but the last (the pricing currency)
COST_COLUMNS: Final = ("BilledCost", "EffectiveCost", "ContractedCost", "ListCost", "PricingCurrencyEffectiveCost")
#: a correction bills no usage of its own: the original row counted it
NULLED_ON_CORRECTION: Final = ("ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit")
_NS = 1_000_000_000
#: correction spend is placed on usage partition RESTATE_PARTITION_BASE + (its marker's dead-letter partition), apart
#: from repriced calls' (reprice.MARKER_PARTITION_BASE): the two kinds of marker are re-sent by different runs
RESTATE_PARTITION_BASE: Final = 2_000_000


class FileRow(NamedTuple):
    """The columns of a row in the files that restating it needs."""

    row_id: str
    usage_id: str
    trace_id: str
    span_id: str
    start_s: int  # ChargePeriodStart
    provider: str | None  # x_Provider
    model: str | None  # x_Model: what answered, else what was asked for
    request_model: str | None
    operation: str
    service_tier: str | None
    tags: Mapping[str, str]
    attribution_key: str
    allocated: bool
    meter: str  # x_Meter
    quantity: int | None  # ConsumedQuantity; None on a correction
    charge_class: str | None
    costs: tuple[Decimal, ...]  # COST_COLUMNS, in order


def correction_prefix(row_id: str) -> str:
    """What the ids of a row's corrections start with."""
    return f"{row_id}/correction/"


class Corrected(NamedTuple):
    """One correction row, as its spend needs it."""

    row_id: str
    start_s: int
    attribution: Mapping[str, str]
    allocated: bool
    billed: Decimal  # its BilledCost: the difference


@dataclass(slots=True)
class Restatement:
    rows: list[Record] = field(default_factory=list)
    corrected: list[Corrected] = field(default_factory=list)  # one per row in `rows`
    #: the corrections' BilledCost, summed
    net_billed: Decimal = Decimal(0)
    checked: int = 0  # original rows looked at
    unchanged: int = 0
    #: original rows today's catalog cannot price, or whose meter today's price does not have: left as they are
    not_restated: int = 0
    #: original rows with a correction a marker names that the files do not hold yet, at other prices than today's:
    #: left until the exporter has written it (netting against what the files hold would correct them twice)
    pending: int = 0


def _call(row: FileRow) -> UsageEvent:
    """The call a row came from, as far as restating one row needs it (its tokens are the row's own)."""
    return UsageEvent(id=row.usage_id, trace_id=row.trace_id, span_id=row.span_id, parent_span_id=None,
                      start_time_unix_nano=row.start_s * _NS, end_time_unix_nano=row.start_s * _NS,
                      operation=row.operation, provider=row.provider, request_model=row.request_model,
                      response_model=row.model, tokens=TokenCounts(), attribution=row.tags,
                      attribution_key=row.attribution_key, allocated=row.allocated, service_tier=row.service_tier)


def corrections(rows: Sequence[FileRow], catalog: PriceCatalog, billing: Billing,
                marked: Collection[str] = ()) -> Restatement:
    """Correction rows for `rows` (originals and their corrections, as the files hold them) whose cost at today's
    prices differs from what they and their corrections hold. `marked`: the correction row ids restatement markers
    name; a row with one the files lack is corrected again only by that same correction (a rerun completing it)."""
    held: dict[str, list[Decimal]] = {}  # original row id -> its costs plus its corrections'
    input_tokens: defaultdict[str, int] = defaultdict(int)  # usage id -> input tokens (picks a long-context tier)
    originals = [row for row in rows if row.charge_class is None]
    for row in originals:
        held[row.row_id] = list(row.costs)
        if row.meter in INPUT_METERS:
            input_tokens[row.usage_id] += row.quantity or 0
    for row in rows:
        if row.charge_class == CORRECTION:
            original_id = row.row_id.split("/correction/", 1)[0]
            if original_id in held:
                held[original_id] = [a + b for a, b in zip(held[original_id], row.costs, strict=True)]
    written = {row.row_id for row in rows if row.charge_class == CORRECTION}
    unwritten: defaultdict[str, set[str]] = defaultdict(set)  # original row id -> its corrections not in the files
    for fix in marked:
        if fix not in written:
            unwritten[fix.split("/correction/", 1)[0]].add(fix)
    out = Restatement()
    for row in originals:
        out.checked += 1
        restated = _restated(row, input_tokens[row.usage_id], catalog, billing)
        if restated is None:
            out.not_restated += 1
            continue
        before = held[row.row_id]
        after = [Decimal(str(restated[column])) for column in COST_COLUMNS]
        digest = hashlib.sha256(orjson.dumps([[str(c) for c in before], [str(c) for c in after]])).hexdigest()[:16]
        row_id = f"{correction_prefix(row.row_id)}{digest}"
        if row.row_id in unwritten and unwritten[row.row_id] != {row_id}:
            out.pending += 1
            continue
        if after == before:
            out.unchanged += 1
            continue
        correction = {**restated, "ChargeClass": CORRECTION, "x_RequestCount": 0, "x_RowId": row_id,
                      **dict.fromkeys(NULLED_ON_CORRECTION),
                      **{column: a - b for column, a, b in zip(COST_COLUMNS, after, before, strict=True)}}
        out.rows.append((row.attribution_key.encode(), encode_row(correction)))
        out.corrected.append(Corrected(row_id, row.start_s, row.tags, row.allocated, after[0] - before[0]))
        out.net_billed += after[0] - before[0]
    return out


def _restated(row: FileRow, input_tokens: int, catalog: PriceCatalog, billing: Billing) -> dict[str, object] | None:
    """The row as today's prices would write it; None if they cannot price it."""
    if row.quantity is None or not row.model:
        return None
    call = _call(row)
    try:
        price = catalog.resolve(row.provider, row.model, call.start_time_unix_nano, row.service_tier)
    except UnpricedError:
        return None
    contracted = price.list_sheet.meters if price.is_list else price.contract_sheet.meters
    for meter, contract_meter in zip(price.list_sheet.meters, contracted, strict=True):
        if meter.usage_key == row.meter:
            line = priced_line(meter, contract_meter, row.quantity, input_tokens)
            value, _ = encoded_focus_rows(PricedUsage(call, price, (line,), catalog.version), billing)[0]
            restated: dict[str, object] = orjson.loads(value)
            return restated
    return None


def restate_marker_records(corrected: Sequence[Corrected], scopes: ScopeIndex) -> list[Record]:
    """Markers naming `corrected` with their spend per scope: (bucket start, cost, unallocated part) entries."""
    out = []
    for chunk in (corrected[i:i + MARKER_MAX_IDS] for i in range(0, len(corrected), MARKER_MAX_IDS)):
        spend: dict[str, dict[int, list[Decimal]]] = {}
        for fix in chunk:
            bucket = fix.start_s - fix.start_s % BUCKET_S
            for scope in scopes.scopes_of(fix.attribution):
                total = spend.setdefault(scope.key, {}).setdefault(bucket, [Decimal(0), Decimal(0)])
                total[0] += fix.billed
                if not fix.allocated:
                    total[1] += fix.billed
        out.append((MARKER_KEY, DeadLetter(
            reason=RESTATED, stage=REPRICE_STAGE, attribution_key="",
            detail=f"{len(chunk)} correction rows of spendstream reprice --restate; their spend is placed at this "
                   "record's partition and offset",
            fields={"row_ids": [fix.row_id for fix in chunk],
                    "spend": {scope: [[bucket, str(cost), str(unallocated)]
                                      for bucket, (cost, unallocated) in sorted(buckets.items())]
                              for scope, buckets in spend.items()}}).encode()))
    return out


def restated_spend(markers: Sequence[RestateMarker], written: Collection[str] = ()) -> list[Record]:
    """The spend of every restatement marker none of whose rows are `written` (row ids the files hold), one
    `genai.spend` message per scope holding the entries of all of them: stage 2 adds those above what it added, so
    a later marker's entry never arrives before an earlier one's. A marker with a row in the files is not sent
    again: its spend was sent before its rows, so stage 2 has it in order, and a scope rebuilt from the files (a
    budget added by a reload) counts the row from there, without the marker's offset, and would add it again."""
    entries: dict[str, list[SpendEntry]] = {}
    for marker in sorted(markers, key=lambda m: (m.partition, m.offset)):
        if any(row_id in written for row_id in marker.row_ids):
            continue
        for scope, spend in marker.spend.items():
            entries.setdefault(scope, []).extend(
                SpendEntry(RESTATE_PARTITION_BASE + marker.partition, marker.offset, bucket, cost, 0, 0, unallocated)
                for bucket, cost, unallocated in spend)
    return [(scope.encode(), encode_spend(scope, scope_entries)) for scope, scope_entries in entries.items()]
