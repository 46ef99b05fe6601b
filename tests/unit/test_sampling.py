"""Sampled spans (tracestate `ot=th:...`) stand for 1/p calls: tokens, spend, requests and budgets scale; the
rest is unchanged."""

from __future__ import annotations

import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import orjson
import pytest

from collector.ingest import IngestResult, NestedCallFilter, ingest_request
from collector.sampling import InvalidTraceState, adjusted_count
from pipeline.export.files import focus_dir, pack_values, partition_of, unpack, write_partition
from pipeline.guardrails.decide import Context, decide, retain_from
from pipeline.guardrails.history import recorded_spend
from pipeline.guardrails.spend import PricedCall, ScopeIndex, spend_records
from pipeline.guardrails.state import ScopeState
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.config import Config, config_from_dict
from schemas.focus import decode_row
from schemas.policy import Scope
from schemas.spend import SpendMessage, decode_spend
from schemas.usage import decode_usage_batch, encode_usage_batch
from tests.support import make_request, make_span

CALL = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200,
        "gen_ai.usage.cache_read.input_tokens": 400}


@pytest.mark.parametrize(("trace_state", "expected"), [
    ("", None),
    ("vendor=abc", None),
    ("ot=rv:0123456789abcd", None),
    ("ot=th:0", Fraction(1)),
    ("ot=th:8", Fraction(2)),
    ("ot=th:c", Fraction(4)),
    ("ot=th:e", Fraction(8)),
    ("ot=th:e0", Fraction(8)),  # trailing zeros are optional
    ("ot=rv:0123456789abcd;th:f", Fraction(16)),
    ("congo=t61rcWkgMzE, ot=th:c;x:y", Fraction(4)),
    ("ot=th:fffffffffffff", Fraction(2**56, 2**56 - 0xfffffffffffff * 2**4)),
    ("ot=th:aaab", Fraction(2**56, 2**56 - 0xaaab * 2**40)),  # about 1/3: not a whole number of calls
])
def test_adjusted_count_follows_the_threshold(trace_state: str, expected: Fraction | None) -> None:
    assert adjusted_count(trace_state) == expected


@pytest.mark.parametrize("trace_state", ["ot=th:", "ot=th:E", "ot=th:zz", "ot=th:123456789abcdef", "ot=th:-1"])
def test_a_malformed_threshold_is_refused(trace_state: str) -> None:
    with pytest.raises(InvalidTraceState):
        adjusted_count(trace_state)


def ingest(trace_state: str) -> IngestResult:
    span = make_span(CALL)
    span.trace_state = trace_state
    return ingest_request(make_request([span]), Config(), None, NestedCallFilter())


def test_a_call_sampled_at_one_in_eight_counts_eight_times_the_tokens_spend_requests_and_budget() -> None:
    [measured] = ingest("").events
    sampled_result = ingest("ot=th:e")
    [sampled] = sampled_result.events
    assert sampled_result.outcomes["sampled"] == 1
    assert measured.adjusted_count is None and measured.requests == 1
    assert sampled.adjusted_count == "8" and sampled.requests == 8
    for meter in ("input_uncached", "cache_read", "cache_write", "output", "reasoning"):
        assert getattr(sampled.tokens, meter) == 8 * getattr(measured.tokens, meter)
    assert decode_usage_batch(encode_usage_batch([sampled])) == [sampled]  # the wire keeps the count

    # spend: the FOCUS rows' BilledCost, exact, 8 times; the rows say they are estimates
    catalog, billing = PriceCatalog(), Billing()
    out = cost_records([measured, sampled], catalog, billing)
    one, eight = out.billed
    assert one is not None and eight is not None and eight == 8 * one
    rows = [decode_row(value) for _, value in out.rows]
    sampled_rows = [r for r in rows if r["x_UsageId"] == sampled.id]
    assert {r["x_SampleAdjustedCount"] for r in sampled_rows} == {"8"}
    assert {r["x_RequestCount"] for r in sampled_rows} == {8}
    assert {r["x_SampleAdjustedCount"] for r in rows if r["x_UsageId"] == measured.id} == {None}
    quantities = {r["x_Meter"]: Decimal(r["ConsumedQuantity"]) for r in rows if r["x_UsageId"] == measured.id}
    assert {r["x_Meter"]: Decimal(r["ConsumedQuantity"]) for r in sampled_rows} == {
        meter: 8 * q for meter, q in quantities.items()}
    assert sum(Decimal(r["BilledCost"]) for r in sampled_rows) == eight

    # velocity and budgets: the scope's spend, tokens and requests, and the budget it exhausts
    pol = config_from_dict({"budgets": [{"scope": {"team": "t"}, "amount": float(eight * 2)}]}).policy
    spent = {}
    for event, billed in ((measured, one), (sampled, eight)):
        [(_, value)] = [m for m in spend_records([PricedCall(event, 0, 1, billed)], ScopeIndex(pol), time.time_ns())
                        if m[0] == b"team=t"]
        message = decode_spend(value)
        assert isinstance(message, SpendMessage)
        [entry] = message.entries
        spent[event.id] = entry
    assert spent[sampled.id].cost == 8 * spent[measured.id].cost
    assert spent[sampled.id].tokens == 8 * spent[measured.id].tokens
    assert spent[sampled.id].requests == 8 * spent[measured.id].requests
    alerts = {}
    for event in (measured, sampled):
        state = ScopeState(Scope.parse("team=t"))
        now = event.start_time_unix_nano // 10**9
        state.add([spent[event.id]], retain_from(pol, now))
        alerts[event.id] = [a.alert_id.rsplit("|", 1)[-1] for a in decide(state, Context(pol, "USD", now, 0.0)).alerts
                            if a.alert_id.startswith("budget_threshold")]
    assert alerts[measured.id] == []  # 1/16 of the budget
    assert alerts[sampled.id] == ["50%"]  # 8/16


def test_an_unsampled_or_malformed_span_is_counted_as_measured() -> None:
    [plain] = ingest("").events
    for trace_state in ("ot=th:0", "vendor=x", "ot=th:nothex"):
        result = ingest(trace_state)
        [event] = result.events
        assert event.tokens == plain.tokens and event.adjusted_count is None and event.requests == 1
    assert ingest("ot=th:nothex").outcomes["malformed_tracestate"] == 1


def test_a_json_row_of_an_older_worker_without_the_sampling_column_still_decodes() -> None:
    [event] = ingest("").events
    [(_, value), *_] = cost_records([event], PriceCatalog(), Billing()).rows
    row = orjson.loads(value)
    del row["x_SampleAdjustedCount"]
    assert "x_SampleAdjustedCount" not in decode_row(orjson.dumps(row))


def test_a_sampled_calls_modality_breakdown_scales_with_its_totals() -> None:
    """The breakdown is a subset of the totals (docs/topics.md): left per observed call, it would say a
    sampled call's 8,000 input tokens held 600 of audio where it held 4,800."""
    span = make_span({**CALL, "gen_ai.usage.audio.input_tokens": 600, "gen_ai.usage.text.output_tokens": 200})
    span.trace_state = "ot=th:e"
    [sampled] = ingest_request(make_request([span]), Config(), None, NestedCallFilter()).events
    assert sampled.tokens.input_total == 8000
    assert sampled.extra == {"tokens.input.audio": "4800", "tokens.output.text": "1600"}


def test_the_files_hold_the_adjusted_count_and_take_rows_of_older_workers_without_it() -> None:
    [measured] = ingest("").events
    [sampled] = ingest("ot=th:e").events
    values = [value for _, value in cost_records([measured, sampled], PriceCatalog(), Billing()).rows]
    old = orjson.loads(values[0])
    del old["x_SampleAdjustedCount"]  # a row from a worker older than the column
    [rows], refused = pack_values([*values, orjson.dumps(old)])
    assert refused == []
    table = unpack(rows.table)
    counts = {(u, c) for u, c in zip(table.column("x_UsageId").to_pylist(),
                                     table.column("x_SampleAdjustedCount").to_pylist(), strict=True)}
    assert counts == {(measured.id, None), (sampled.id, Decimal(8))}
    assert table.num_rows == len(values) + 1


def test_an_older_workers_row_with_a_tag_named_like_the_added_column_is_still_read() -> None:
    """Its value holds the column's key, in Tags (where a look for the key in the raw value would find it)."""
    [measured] = ingest("").events
    values = [value for _, value in cost_records([measured], PriceCatalog(), Billing()).rows]
    old = orjson.loads(values[0])
    del old["x_SampleAdjustedCount"]
    old["Tags"] = {**old["Tags"], "x_SampleAdjustedCount": "5"}
    [rows], refused = pack_values([orjson.dumps(old), *values[1:]])
    assert refused == []
    table = unpack(rows.table)
    assert table.column("x_SampleAdjustedCount").to_pylist() == [None] * len(values)
    assert table.column("Tags").to_pylist()[0] == orjson.dumps(old["Tags"]).decode()


def test_spend_rebuilt_from_the_files_counts_a_sampled_call_as_the_calls_it_stands_for(tmp_path: Path) -> None:
    [measured] = ingest("").events
    [sampled] = ingest("ot=th:e").events
    out = cost_records([measured, sampled], PriceCatalog(), Billing())
    rows = [decode_row(value) for _, value in out.rows]
    write_partition(focus_dir(tmp_path), *partition_of(rows[0]), rows)
    since = measured.start_time_unix_nano // 10**9 - 3600
    [spend] = recorded_spend(tmp_path, since, 86_400)
    assert spend.requests == 1 + 8
    assert spend.cost == sum(b for b in out.billed if b is not None)
    assert spend.tokens == 9 * sum(int(Decimal(r["ConsumedQuantity"])) for r in rows if r["x_UsageId"] == measured.id)



def sampled_calls(spans: list[dict[str, object]], trace_state: str) -> IngestResult:
    made = []
    for attributes in spans:
        span = make_span({**CALL, **attributes})
        span.trace_state = trace_state
        made.append(span)
    return ingest_request(make_request(made), Config(), None, NestedCallFilter())


@pytest.mark.parametrize("claimed", [
    # 10^6 reasoning tokens (no output) at 1/2^56: 7 x 10^22 tokens, more than a token count on the wire holds
    {"gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": 0, "gen_ai.usage.cache_read.input_tokens": 0,
     "gen_ai.usage.reasoning.output_tokens": 10**6},
    # 64 input tokens at 1/2^56 each fit a count, but two such calls in one spend entry or budget bucket do not
    {"gen_ai.usage.input_tokens": 64, "gen_ai.usage.output_tokens": 0, "gen_ai.usage.cache_read.input_tokens": 0},
    # no tokens at all, yet 2^56 requests; 128 of them overflow a bucket's request count
    {"gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": 0, "gen_ai.usage.cache_read.input_tokens": 0},
])
def test_an_estimate_past_the_edge_limit_is_refused_not_sent_to_poison_its_message(claimed: dict[str, object]
                                                                                  ) -> None:
    # sent on, the usage batch or the spend message holding it would not decode: the honest calls of the same
    # attribution key in it would be lost to the files or the budgets
    result = sampled_calls([claimed, claimed], "ot=th:ffffffffffffff")
    assert result.events == []
    assert [letter.reason for letter in result.dead_letters] == ["invalid_token_count"] * 2
    # within collector.max_token_count, as a measured count is: 1/8 of a call's tokens and calls is accepted
    assert len(sampled_calls([claimed], "ot=th:e").events) == 1
