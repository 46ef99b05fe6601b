"""The pure parts of `spendstream reprice`: reading dead letters, choosing what to price, placing the spend so it
counts once, correction rows that net a retroactive price change, and `pricing.catalog_file`.

Expected values are computed by hand from the prices in each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import orjson
import pytest

from pipeline.guardrails.spend import ScopeIndex
from pipeline.guardrails.state import ScopeState
from pipeline.pricing import PriceCatalog, UnpricedError, overrides_from_config
from pipeline.pricing.catalog import price_data_file
from pipeline.pricing.cost_records import cost_records, unpriced_letter
from pipeline.pricing.focus import Billing
from pipeline.pricing.reprice import (
    MARKER_KEY,
    MARKER_PARTITION_BASE,
    REPRICED,
    DeadLetters,
    Marker,
    add_dead_letter,
    choose,
    in_range,
    marked_outputs,
    marker_records,
)
from pipeline.pricing.restate import (
    CORRECTION,
    COST_COLUMNS,
    RESTATE_PARTITION_BASE,
    FileRow,
    corrections,
    restate_marker_records,
    restated_spend,
)
from schemas.config import config_from_dict
from schemas.errors import ConfigError, SchemaError
from schemas.focus import decode_row
from schemas.policy import Scope
from schemas.spend import SpendMessage, decode_spend
from schemas.usage import TokenCounts, UsageEvent

WHEN = datetime(2026, 11, 20, 9, 30, 15, tzinfo=UTC)
NS = int(WHEN.timestamp()) * 10**9
LATEST_NS = NS + 86400 * 10**9  # when reprice runs: the day after
#: 1,000 input and 500 output tokens at 2 and 6 USD per million: 0.002 + 0.003 = 0.005 USD
SELF_HOSTED = {"provider": "vllm", "model": "acme-internal-70b", "input_per_mtok": 2, "output_per_mtok": 6}
CONFIG = {"budgets": [{"scope": {"team": "ml"}, "amount": 100}]}


def call(n: int, model: str = "acme-internal-70b", provider: str = "vllm", start_ns: int = NS) -> UsageEvent:
    trace, span = f"{n:032x}", f"{n:016x}"
    return UsageEvent(id=f"{trace}-{span}", trace_id=trace, span_id=span, parent_span_id=None,
                      start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + 10**9, operation="chat",
                      provider=provider, request_model=model, response_model=model,
                      tokens=TokenCounts(input_uncached=1000, output=500),
                      attribution={"team": "ml"}, attribution_key="team=ml")


def spend_message(value: bytes) -> SpendMessage:
    """A record of the spend topic that has to be spend (not a tick or a reset)."""
    message = decode_spend(value)
    assert isinstance(message, SpendMessage), message
    return message


def catalog(*overrides: dict[str, Any]) -> PriceCatalog:
    return PriceCatalog(overrides_from_config(list(overrides), "USD"))


def dead_letter(event: UsageEvent) -> bytes:
    """The letter the pricing stage writes for a call it cannot price."""
    (_, value), = cost_records([event], catalog(), Billing()).dead_letters
    return value


def read_dead_letters(records: list[tuple[int, int, bytes]]) -> DeadLetters:
    letters = DeadLetters()
    for partition, offset, value in records:
        add_dead_letter(letters, partition, offset, value)
    return letters


def test_unpriced_letters_carry_the_call_and_are_read_back_with_markers() -> None:
    first, second = call(1), call(2)
    with pytest.raises(UnpricedError) as unpriced:
        catalog().resolve("vllm", "acme-internal-70b", NS)
    letter = orjson.loads(unpriced_letter(first, unpriced.value).encode())
    assert letter["fields"]["usage"]["id"] == first.id and letter["fields"]["usage"]["tokens"]["output"] == 500
    dead_letter_schema = jsonschema.Draft202012Validator(json.loads(
        resources.files("schemas").joinpath("deadletter.schema.json").read_text("utf-8")))
    dead_letter_schema.validate(letter)
    dead_letter_schema.validate(orjson.loads(marker_records([first.id])[0][1]))
    rejected = orjson.dumps({"reason": "invalid_usage_message", "stage": "pricing", "fields": {"topic": "x"}})
    records = [(0, 0, dead_letter(first)), (1, 0, b"not json"), (1, 1, rejected), (0, 1, dead_letter(second)),
               *((0, 2 + i, value) for i, (_, value) in enumerate(marker_records([first.id])))]
    letters = read_dead_letters(records)
    assert letters.unpriced == {first.id: first, second.id: second}
    assert letters.markers == [Marker(0, 2, (first.id,))]
    assert letters.marked() == {first.id: Marker(0, 2, (first.id,))}
    assert orjson.loads(marker_records([first.id])[0][1])["reason"] == REPRICED


def test_markers_hold_at_most_5000_ids_each() -> None:
    ids = [f"id-{i}" for i in range(12_001)]
    markers = [orjson.loads(value)["fields"]["usage_ids"] for _, value in marker_records(ids)]
    assert [len(m) for m in markers] == [5000, 5000, 2001] and [i for m in markers for i in m] == ids


def test_choose_marks_only_calls_a_price_now_covers_and_not_marked_or_in_the_files() -> None:
    calls = [call(1), call(2), call(3), call(4, model="still-unknown-9")]
    marked = {calls[1].id: Marker(0, 7, (calls[1].id,))}
    choice = choose(calls, marked, {calls[2].id}, catalog(SELF_HOSTED))
    assert choice.to_mark == [calls[0].id]
    assert choice.marked_before == 1 and choice.in_files == 1
    assert [(e.id, exc.reason) for e, exc in choice.still_unpriced] == [(calls[3].id, "unknown_provider")]
    assert choose(calls, {}, (), catalog()).to_mark == []  # without the override: nothing


def test_in_range_is_by_call_start_half_open() -> None:
    calls = [call(i, start_ns=NS + i) for i in range(4)]
    assert [c.id for c in in_range(reversed(calls), NS + 1, NS + 3)] == [calls[1].id, calls[2].id]
    assert len(in_range(calls, NS + 1, None)) == 3


def test_repriced_spend_is_placed_at_the_marker_and_added_once_by_stage_2() -> None:
    calls = [call(1), call(2), call(3)]
    first = Marker(4, 10, (calls[0].id, calls[1].id))
    later = Marker(4, 11, (calls[2].id,))
    scopes = ScopeIndex(config_from_dict(CONFIG).policy)
    run = marked_outputs([(first, calls[0]), (first, calls[1])], catalog(SELF_HOSTED), Billing(), scopes, LATEST_NS)
    assert [cost for _, cost in run.billed] == [Decimal("0.005")] * 2
    assert len(run.rows) == 4  # input and output rows of each call
    state = ScopeState(Scope.parse("team=ml"))
    for _, value in run.spend:
        message = spend_message(value)
        assert [(e.partition, e.offset) for e in message.entries] == [(MARKER_PARTITION_BASE + 4, 10)]
        state.add(message.entries, 0)
    # a second run publishes the same records, plus those of a later marker: only the later ones are new
    again = marked_outputs([(first, calls[0]), (first, calls[1]), (later, calls[2])], catalog(SELF_HOSTED),
                           Billing(), scopes, LATEST_NS)
    assert again.rows[:4] == run.rows
    for _, value in again.spend:
        state.add(spend_message(value).entries, 0)
    assert state.periods["2026-11"] == Decimal("0.015")


def test_calls_the_files_hold_are_not_sent_again() -> None:
    # repriced with input and output prices; the override later gains a cache-read price: priced anew, the call
    # has a cache_read_tokens row the first run did not have, which the exporter would add next to the first
    # run's input row (that already holds the cache reads): 400 tokens counted twice
    cached = msgspec.structs.replace(call(1), tokens=TokenCounts(input_uncached=600, cache_read=400, output=500))
    marker, scopes = Marker(4, 10, (cached.id,)), ScopeIndex(config_from_dict(CONFIG).policy)
    first = marked_outputs([(marker, cached)], catalog(SELF_HOSTED), Billing(), scopes, LATEST_NS)
    edited = catalog({**SELF_HOSTED, "cache_read_per_mtok": 1})
    assert {decode_row(v)["x_RowId"] for _, v in marked_outputs([(marker, cached)], edited, Billing(), scopes,
                                                                 LATEST_NS).rows} \
        - {decode_row(v)["x_RowId"] for _, v in first.rows} == {f"{cached.id}/cache_read_tokens"}
    again = marked_outputs([(marker, cached)], edited, Billing(), scopes, LATEST_NS, written={cached.id})
    assert again.rows == [] and again.billed == [(cached, Decimal("0.0046"))]  # 600 x 2 + 400 x 1 + 500 x 6, / 1e6
    # nor its spend: a scope rebuilt from the files (a budget added by a reload) holds it, without the marker's
    # offset, and would add it again
    rebuilt = ScopeState(Scope.parse("team=ml"), periods={"2026-11": Decimal("0.005")})
    for _, value in again.spend:
        rebuilt.add(spend_message(value).entries, 0)
    assert rebuilt.periods == {"2026-11": Decimal("0.005")}


def test_a_marked_call_no_price_covers_any_more_is_not_published() -> None:
    run = marked_outputs([(Marker(0, 1, (call(1).id,)), call(1))], catalog(), Billing(),
                         ScopeIndex(config_from_dict(CONFIG).policy), LATEST_NS)
    assert run.rows == [] and run.spend == [] and run.billed == [(call(1), None)]


def file_rows(values: list[bytes]) -> list[FileRow]:
    """Rows as `spendstream reprice --restate` reads them from the files."""
    out = []
    for value in values:
        row = decode_row(value)
        out.append(FileRow(row["x_RowId"], row["x_UsageId"], row["x_TraceId"], row["x_SpanId"],
                           int(datetime.fromisoformat(row["ChargePeriodStart"]).timestamp()), row["x_Provider"],
                           row["x_Model"], row["x_RequestModel"], row["x_Operation"], row["x_ServiceTier"],
                           row["Tags"], row["x_AttributionKey"], row["x_Allocated"], row["x_Meter"],
                           int(row["ConsumedQuantity"]) if row["ConsumedQuantity"] is not None else None,
                           row["ChargeClass"], tuple(Decimal(row[c]) for c in COST_COLUMNS)))
    return out


#: gpt-4o under contract from 2026-11-01: 1 and 2 USD per million input and output tokens...
CONTRACT = {"provider": "openai", "model": "gpt-4o", "input_per_mtok": 1, "output_per_mtok": 2,
            "valid_from": "2026-11-01"}
#: ...renegotiated after the fact, back to the same start: input 3 USD per million
RENEGOTIATED = {**CONTRACT, "input_per_mtok": 3}


def test_a_retroactive_price_gives_corrections_that_net_the_hand_computed_difference() -> None:
    calls = [call(1, "gpt-4o", "openai"), call(2, "gpt-4o", "openai")]
    written = [value for _, value in cost_records(calls, catalog(CONTRACT), Billing()).rows]
    rows = file_rows(written)
    assert sum(r.costs[0] for r in rows) == Decimal("0.004")  # 2 x (1000 x 1 + 500 x 2) / 1e6

    out = corrections(rows, catalog(CONTRACT, RENEGOTIATED), Billing())
    # only the input rows change: 2 calls x 1,000 tokens x (3 - 1) USD / 1e6 = 0.004 USD
    assert out.net_billed == Decimal("0.004") and out.checked == 4 and out.unchanged == 2
    fixes = [decode_row(value) for _, value in out.rows]
    assert [(f["ChargeClass"], f["x_Meter"], Decimal(f["BilledCost"])) for f in fixes] == \
        [(CORRECTION, "input_tokens", Decimal("0.002"))] * 2
    assert all(f["ConsumedQuantity"] is None and f["PricingQuantity"] is None and f["x_RequestCount"] == 0
               for f in fixes)
    assert all(Decimal(f["ListCost"]) == 0 and Decimal(f["ContractedUnitPrice"]) == 3  # per million
               for f in fixes)
    assert {f["x_UsageId"] for f in fixes} == {c.id for c in calls}
    assert all(f["x_RowId"].startswith(f"{f['x_UsageId']}/input_tokens/correction/") for f in fixes)

    # again before the exporter wrote them: the same ids (the exporter keeps one); after: nothing
    assert corrections(rows, catalog(CONTRACT, RENEGOTIATED), Billing()).rows == out.rows
    restated = rows + file_rows([value for _, value in out.rows])
    assert corrections(restated, catalog(CONTRACT, RENEGOTIATED), Billing()).rows == []
    # a further change is netted against the original plus its correction: back to 1 USD nets -0.004
    back = corrections(restated, catalog(CONTRACT), Billing())
    assert back.net_billed == Decimal("-0.004")
    assert {v for _, v in back.rows}.isdisjoint(v for _, v in out.rows)


def test_rows_todays_catalog_cannot_price_are_left_as_they_are() -> None:
    rows = file_rows([v for _, v in cost_records([call(1)], catalog(SELF_HOSTED), Billing()).rows])
    out = corrections(rows, catalog(), Billing())
    assert out.rows == [] and out.not_restated == 2


def data_file(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


#: genai-prices' published data format (prices/data.json): a list of providers with their models
NEWER = [{"id": "openai", "name": "OpenAI", "api_pattern": r"https://api\.openai\.com",
          "models": [{"id": "gpt-9", "match": {"starts_with": "gpt-9"},
                      "prices": {"input_mtok": 3, "output_mtok": 12}}]}]


def test_catalog_file_prices_a_model_the_package_does_not_know_and_names_itself(tmp_path: Path) -> None:
    config = config_from_dict({"pricing": {"catalog_file": str(data_file(tmp_path, NEWER))}})
    newer = PriceCatalog.from_config(config)
    with pytest.raises(UnpricedError):
        price_usage_of(call(1, "gpt-9-mini", "openai"), PriceCatalog())
    # 1,000 x 3 + 500 x 12 per million = 0.009 USD
    assert price_usage_of(call(1, "gpt-9-mini", "openai"), newer) == Decimal("0.009")
    row = decode_row(cost_records([call(1, "gpt-9-mini", "openai")], newer, Billing()).rows[0][1])
    assert row["x_CatalogVersion"] == newer.version
    assert newer.version.startswith("genai-prices-data-") and newer.version != PriceCatalog().version


def price_usage_of(event: UsageEvent, priced_by: PriceCatalog) -> Decimal:
    out = cost_records([event], priced_by, Billing())
    if out.billed[0] is None:
        raise UnpricedError("unknown_model", "unpriced")
    return out.billed[0]


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "not JSON"),
    ({"providers": []}, "expected a non-empty JSON array of providers"),
    ([{"id": "x", "name": "X"}], "not valid genai-prices data"),
])
def test_a_bad_catalog_file_is_an_error_naming_the_file_and_the_problem(tmp_path: Path, content: object,
                                                                         problem: str) -> None:
    path = data_file(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        price_data_file(path)
    (message,) = error.value.problems
    assert message.startswith(f"pricing.catalog_file: {path}: ") and problem in message
    with pytest.raises(ConfigError, match="cannot be read"):
        price_data_file(tmp_path / "missing.json")


@pytest.mark.parametrize("command", [["run", "--broker-port", "1"],
                                     ["price", "gpt-4o", "--input", "1", "--output", "1"]])
def test_a_bad_catalog_file_stops_the_start_naming_the_file(tmp_path: Path, command: list[str]) -> None:
    bad = data_file(tmp_path, [{"id": "x"}])
    config = tmp_path / "spendstream.yaml"
    config.write_text(f"pricing: {{catalog_file: '{bad}'}}\n")
    done = subprocess.run([sys.executable, "-m", "pipeline", *command, "--config", str(config),
                           *(["--data-dir", str(tmp_path / "data")] if command[0] == "run" else [])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"pricing.catalog_file: {bad}: not valid genai-prices data" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing started


def test_only_a_correction_row_may_leave_its_quantities_null() -> None:
    (_, value), *_ = cost_records([call(1, "gpt-4o", "openai")], catalog(CONTRACT), Billing()).rows
    for name in ("ConsumedQuantity", "PricingQuantity"):
        with pytest.raises(SchemaError, match=f"{name} is null on a row that is not a correction"):
            decode_row(orjson.dumps({**orjson.loads(value), name: None}))
    decode_row(orjson.dumps({**orjson.loads(value), "ChargeClass": CORRECTION, "ConsumedQuantity": None,
                             "PricingQuantity": None}))


def test_correction_spend_travels_in_its_marker_and_is_added_once() -> None:
    calls = [call(1, "gpt-4o", "openai"), call(2, "gpt-4o", "openai")]
    rows = file_rows([v for _, v in cost_records(calls, catalog(CONTRACT), Billing()).rows])
    out = corrections(rows, catalog(CONTRACT, RENEGOTIATED), Billing())
    scopes = ScopeIndex(config_from_dict(CONFIG).policy)
    (key, value), = restate_marker_records(out.corrected, scopes)
    assert key == MARKER_KEY
    jsonschema.Draft202012Validator(json.loads(resources.files("schemas").joinpath(
        "deadletter.schema.json").read_text("utf-8"))).validate(orjson.loads(value))
    later = restate_marker_records(out.corrected[:1], scopes)[0][1]
    letters = read_dead_letters([(3, 40, value), (3, 41, later)])
    assert [m.row_ids for m in letters.restated] == [tuple(f.row_id for f in out.corrected), (out.corrected[0].row_id,)]
    state = ScopeState(Scope.parse("team=ml"))
    first = restated_spend(letters.restated[:1])
    for run in (first, first, restated_spend(letters.restated)):  # again, then with a later marker
        for scope, message in run:
            spend = spend_message(message)
            assert {(e.partition, e.requests, e.tokens) for e in spend.entries} == {(RESTATE_PARTITION_BASE + 3, 0, 0)}
            if scope == b"team=ml":
                state.add(spend.entries, 0)
    # 0.004 from the first marker, once; 0.002 from the later one
    assert state.periods["2026-11"] == Decimal("0.006")
    # once the files hold a marker's rows, its spend is not sent again: a scope rebuilt from the files (a budget
    # added by a reload) has the corrections in its totals but not the marker's offset, and would add them twice
    written = {fix.row_id for fix in out.corrected}
    assert restated_spend(letters.restated, written) == []
    # a marker with one row in the files is not sent; one with none is
    partly = restated_spend(letters.restated, written - {out.corrected[0].row_id})
    assert {e.offset for _, v in partly for e in spend_message(v).entries} == {41}


def test_a_price_changed_again_before_the_exporter_wrote_the_first_corrections_does_not_correct_twice() -> None:
    rows = file_rows([value for _, value in cost_records([call(1, "gpt-4o", "openai")], catalog(CONTRACT),
                                                           Billing()).rows])
    first = corrections(rows, catalog(CONTRACT, RENEGOTIATED), Billing())
    marked = [fix.row_id for fix in first.corrected]  # its marker is on genai.deadletter, its rows not in the files
    # the same price again completes the first run: the same rows, re-sent (the exporter keeps one)
    assert corrections(rows, catalog(CONTRACT, RENEGOTIATED), Billing(), marked).rows == first.rows
    # another price before the files hold them: netting against the files alone would add a second correction of
    # the same original (3 - 1 then 5 - 1 USD per million, not 5 - 1); the row waits for the exporter instead
    dearer = {**CONTRACT, "input_per_mtok": 5}
    early = corrections(rows, catalog(CONTRACT, dearer), Billing(), marked)
    assert early.rows == [] and early.pending == 1
    # once written, the change nets against the original plus its correction: 1,000 tokens x (5 - 3) USD / 1e6
    written = rows + file_rows([value for _, value in first.rows])
    later = corrections(written, catalog(CONTRACT, dearer), Billing(), marked)
    assert later.net_billed == Decimal("0.002") and later.pending == 0
