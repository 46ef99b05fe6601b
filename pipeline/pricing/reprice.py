"""`spendstream reprice`'s pure core: price the calls dead-lettered as unpriced once a price exists. Pure.

The pricing stage dead-letters a call no price covers (an unknown model) with the call itself in
`fields.usage`. Once a price exists (a `pricing.overrides` entry, a newer `pricing.catalog_file`),
reprice gives those calls their normal outputs: FOCUS rows on `genai.cost.focus` and their spend
on `genai.spend`. Each must count once however often reprice runs or crashes:

- **Rows** carry the row ids the pricing stage would have given them (`<usage id>/<meter>`), and
  the exporter keeps one row per id (its ledger reads any day back from the files).
- **Spend**: stage 2 adds an entry only if its (usage partition, offset) is above the highest it
  has added for that partition, per scope. Reprice first appends a *marker* to `genai.deadletter`
  (reason `repriced`) naming the usage ids it prices, then places their spend at the marker's own
  (partition, offset), on partition numbers no usage topic has (MARKER_PARTITION_BASE + p). A
  marker is written once per usage id, after every earlier marker, so each repriced call has one
  coordinate, and later ones are always higher. Every run publishes the spend, then the rows, of
  every marked call the files do not hold yet: stage 2 skips what it added, the exporter rows it
  wrote, and a run that crashed after its markers is completed by the next one. A call the files
  hold is not sent again: its spend was sent before its rows, so stage 2 has it in order (ahead of
  any later marker's); a scope rebuilt from the files (a budget added by a reload) has it in its
  totals but no offsets, and would add it again; and priced anew with an override edited since,
  the call can have another set of meters (a cache-read price added), whose new row id would be
  added next to the first run's rows, counting those tokens twice.
  Republishing the usage event to `genai.usage` instead would not do: the pricing stage remembers
  usage ids only within `worker.dedupe_horizon_s` of event time (two hours), and repriced calls are
  usually older, so a second run would be priced and counted again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import msgspec
import orjson

from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.pricing.catalog import PriceCatalog, UnpricedError
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from pipeline.pricing.price import price_usage
from schemas.codec import Record
from schemas.deadletter import DeadLetter
from schemas.usage import UsageEvent

#: a marker's reason and stage on `genai.deadletter`
REPRICED: Final = "repriced"
#: the reason of a marker of correction rows (restate.py)
RESTATED: Final = "restated"
REPRICE_STAGE: Final = "reprice"
#: repriced spend is placed on usage partition MARKER_PARTITION_BASE + (the marker's dead-letter partition): no
#: usage topic has that many partitions, so its offsets never mix with those of priced usage messages
MARKER_PARTITION_BASE: Final = 1_000_000
#: every marker goes to one dead-letter partition (the key's), so their offsets order all markers
MARKER_KEY: Final = b"spendstream-reprice"
#: usage ids per marker: keeps a marker well under a Kafka message's size limit
MARKER_MAX_IDS: Final = 5_000


@dataclass(frozen=True, slots=True)
class Marker:
    """Usage ids reprice priced; their spend is placed at the marker's (partition, offset)."""

    partition: int
    offset: int
    usage_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RestateMarker:
    """Correction rows `spendstream reprice --restate` wrote, with their spend (restate.py)."""

    partition: int
    offset: int
    row_ids: tuple[str, ...]
    #: scope key -> (bucket start, cost, unallocated part of the cost)
    spend: Mapping[str, tuple[tuple[int, Decimal, Decimal], ...]]


@dataclass(slots=True)
class DeadLetters:
    """What `genai.deadletter` says about unpriced calls."""

    #: usage id -> the call, of every letter the pricing stage wrote as unpriced (the latest per id)
    unpriced: dict[str, UsageEvent] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    restated: list[RestateMarker] = field(default_factory=list)
    #: unpriced letters written before letters carried the call (`fields.usage`): they cannot be repriced
    without_call: int = 0

    def marked(self) -> dict[str, Marker]:
        """usage id -> the first marker that names it (the one its spend is placed at)."""
        out: dict[str, Marker] = {}
        for marker in sorted(self.markers, key=lambda m: (m.partition, m.offset)):
            for usage_id in marker.usage_ids:
                out.setdefault(usage_id, marker)
        return out


_USAGE: Final = msgspec.json.Decoder(UsageEvent)
#: the pricing stage's reasons for a call it could not price (catalog.UnpricedError); a new price may fix them
UNPRICED_REASONS: Final = frozenset({"unknown_model", "unknown_provider", "unpriced_meter"})


def add_dead_letter(letters: DeadLetters, partition: int, offset: int, value: bytes) -> None:
    """Fold one `genai.deadletter` record into `letters` (records of a partition in offset order). Letters of other
    kinds (rejected messages, invalid timestamps) and values that are not letters are passed over."""
    try:
        letter = orjson.loads(value)
    except orjson.JSONDecodeError:
        return
    if not isinstance(letter, dict) or not isinstance(letter.get("fields"), dict):
        return
    fields: Mapping[str, Any] = letter["fields"]
    if letter.get("stage") == REPRICE_STAGE and letter.get("reason") == REPRICED:
        letters.markers.append(Marker(partition, offset, tuple(str(i) for i in fields.get("usage_ids", ()))))
    elif letter.get("stage") == REPRICE_STAGE and letter.get("reason") == RESTATED:
        try:
            spend = {str(scope): tuple((int(bucket), Decimal(cost), Decimal(unallocated))
                                       for bucket, cost, unallocated in entries)
                     for scope, entries in fields.get("spend", {}).items()}
        except (AttributeError, TypeError, ValueError, ArithmeticError):
            return  # not a marker this version wrote
        letters.restated.append(RestateMarker(partition, offset, tuple(str(i) for i in fields.get("row_ids", ())),
                                              spend))
    elif letter.get("stage") == "pricing" and letter.get("reason") in UNPRICED_REASONS:
        try:
            event = _USAGE.decode(orjson.dumps(fields["usage"]))
        except (KeyError, msgspec.DecodeError):
            letters.without_call += 1
            return
        letters.unpriced[event.id] = event


def marker_records(usage_ids: Sequence[str]) -> list[Record]:
    """The markers naming `usage_ids`, MARKER_MAX_IDS a marker."""
    return [(MARKER_KEY, DeadLetter(
        reason=REPRICED, stage=REPRICE_STAGE, attribution_key="",
        detail=f"{len(chunk)} unpriced calls priced by spendstream reprice; their spend is placed at this "
               "record's partition and offset",
        fields={"usage_ids": list(chunk)}).encode())
        for chunk in (usage_ids[i:i + MARKER_MAX_IDS] for i in range(0, len(usage_ids), MARKER_MAX_IDS))]


def in_range(events: Iterable[UsageEvent], since_ns: int, until_ns: int | None) -> list[UsageEvent]:
    """The calls that started in [since_ns, until_ns), by start time."""
    return sorted((e for e in events if e.start_time_unix_nano >= since_ns
                   and (until_ns is None or e.start_time_unix_nano < until_ns)),
                  key=lambda e: (e.start_time_unix_nano, e.id))


@dataclass(slots=True)
class Choice:
    """Which unpriced calls of the range reprice marks now, and why the others are left."""

    to_mark: list[str] = field(default_factory=list)  # usage ids a price now covers
    #: (call, why) of the calls still without a price
    still_unpriced: list[tuple[UsageEvent, UnpricedError]] = field(default_factory=list)
    #: calls already repriced (marked) by an earlier run
    marked_before: int = 0
    #: calls whose rows are in the files already (priced some other way, e.g. a client's retry after the override)
    in_files: int = 0


def choose(calls: Sequence[UsageEvent], marked: Mapping[str, Marker], in_files: Iterable[str],
           catalog: PriceCatalog) -> Choice:
    """Of the unpriced `calls`: those to mark (priceable now, not marked before, not in the files), and the rest."""
    recorded = set(in_files)
    out = Choice()
    for event in calls:
        if event.id in marked:
            out.marked_before += 1
        elif event.id in recorded:
            out.in_files += 1
        else:
            try:
                price_usage(event, catalog)
            except UnpricedError as exc:
                out.still_unpriced.append((event, exc))
                continue
            out.to_mark.append(event.id)
    return out


@dataclass(slots=True)
class Outputs:
    """What reprice publishes for marked calls, and what it found."""

    rows: list[Record]
    spend: list[Record]
    #: each marked call with its billed cost; None: the catalog no longer prices it (an override removed since),
    #: nothing is published for it
    billed: list[tuple[UsageEvent, Decimal | None]]


def marked_outputs(marked: Sequence[tuple[Marker, UsageEvent]], catalog: PriceCatalog, billing: Billing,
                   scopes: ScopeIndex, latest_ns: int, *, written: Collection[str] = ()) -> Outputs:
    """FOCUS rows and spend of marked calls, in marker order: the same records however often they are made (same
    row ids, same spend coordinates), so downstream keeps one of each; none for the calls `written` (usage ids the
    files hold), whose `billed` is still given. `latest_ns` caps end times (spend_records)."""
    ordered = sorted(marked, key=lambda pair: (pair[0].partition, pair[0].offset, pair[1].id))
    out = cost_records([event for _, event in ordered], catalog, billing)
    rows = out.rows if not written else \
        cost_records([event for _, event in ordered if event.id not in written], catalog, billing).rows
    calls = [PricedCall(event, MARKER_PARTITION_BASE + marker.partition, marker.offset, billed)
             for (marker, event), billed in zip(ordered, out.billed, strict=True)
             if billed is not None and event.id not in written]
    billed = [(event, cost) for (_, event), cost in zip(ordered, out.billed, strict=True)]
    return Outputs(rows, spend_records(calls, scopes, latest_ns), billed)
