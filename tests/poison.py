"""Poison messages: for each topic a spendstream process consumes, values with the right envelope and the wrong
insides (types, ranges, versions, encodings, nesting), built from a valid value of that topic.

The unit tests check every decoder refuses them with a SchemaError; the integration tests produce them
mid-stream into running roles and check each is dead-lettered and the traffic around it still flows.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import orjson

Poison = tuple[str, bytes]
#: a JSON value nested far deeper than any decoder follows
DEEP = b"[" * 100_000 + b"]" * 100_000


def _mutated(valid: bytes, change: Callable[[Any], object]) -> bytes:
    data = copy.deepcopy(orjson.loads(valid))
    change(data)
    return json.dumps(data, separators=(",", ":")).encode()  # not orjson: it refuses integers past 64 bits


def _set(path: tuple[str | int, ...], value: object) -> Callable[[Any], object]:
    def change(data: Any) -> None:
        for step in path[:-1]:
            data = data[step]
        data[path[-1]] = value
    return change


def _delete(path: tuple[str | int, ...]) -> Callable[[Any], object]:
    def change(data: Any) -> None:
        for step in path[:-1]:
            data = data[step]
        del data[path[-1]]
    return change


def _common(valid: bytes, text_field: bytes, *, versioned: bool = True) -> list[Poison]:
    """What every topic's decoder must refuse: garbage, an empty value, bad UTF-8 (in the string value of
    `text_field`), deep nesting and, where values carry `schema_version`, another version or none."""
    start = valid.index(text_field) + len(text_field)
    common = [
        ("garbage", b"\x00\x01 not json"),
        ("empty", b""),
        ("not_an_object", b"[1, 2, 3]"),
        ("non_utf8", valid[:start] + b"\xff\xfe" + valid[start:]),
        ("nan", valid[:-1] + b', "n": NaN}'),
        ("deep_nesting", valid[:-1] + b', "x": ' + DEEP + b"}"),
    ]
    if versioned:
        common += [("wrong_schema_version", _mutated(valid, _set(("schema_version",), 2))),
                   ("schema_version_missing", _mutated(valid, _delete(("schema_version",))))]
    return common


def usage_poison(valid: bytes) -> list[Poison]:
    """`valid`: a genai.usage value holding one event."""
    event = ("events", 0)
    return [*_common(valid, b'"attribution_key":"'),
            ("events_of_ints", b'{"schema_version":1,"events":[1]}'),
            ("events_missing", b'{"schema_version":1}'),
            ("events_empty", b'{"schema_version":1,"events":[]}'),
            ("tokens_as_strings", _mutated(valid, _set((*event, "tokens", "output"), "200"))),
            ("attribution_as_list", _mutated(valid, _set((*event, "attribution"), ["team", "search"]))),
            ("start_time_as_string", _mutated(valid, _set((*event, "start_time_unix_nano"), "2026-11-20T09:30:15Z"))),
            ("negative_tokens", _mutated(valid, _set((*event, "tokens", "input_uncached"), -5))),
            ("huge_tokens", _mutated(valid, _set((*event, "tokens", "cache_read"), 2**70))),
            ("huge_start_time", _mutated(valid, _set((*event, "start_time_unix_nano"), 2**64 + 1))),
            ("infinite_tokens", valid.replace(b'"output":', b'"output":1e999,"_":', 1)),
            ("float_tokens", _mutated(valid, _set((*event, "tokens", "output"), 1.5))),
            ("missing_field", _mutated(valid, _delete((*event, "span_id")))),
            ("usage_id_as_number", _mutated(valid, _set((*event, "id"), 5))),
            ("event_wrong_version", _mutated(valid, _set((*event, "schema_version"), 7)))]


def spend_poison(valid: bytes) -> list[Poison]:
    """`valid`: a genai.spend value with one entry."""
    return [*_common(valid, b'"scope":"'),
            ("entries_of_ints", _mutated(valid, _set(("entries",), [1]))),
            ("entries_missing", _mutated(valid, _delete(("entries",)))),
            ("entry_too_short", _mutated(valid, _set(("entries", 0), [0, 1]))),
            ("cost_as_number", _mutated(valid, _set(("entries", 0, 3), 12.5))),
            ("cost_nan", _mutated(valid, _set(("entries", 0, 3), "NaN"))),
            ("cost_infinite", _mutated(valid, _set(("entries", 0, 3), "Infinity"))),
            ("cost_huge_exponent", _mutated(valid, _set(("entries", 0, 3), "1E999999999"))),
            ("negative_offset", _mutated(valid, _set(("entries", 0, 1), -1))),
            ("huge_partition", _mutated(valid, _set(("entries", 0, 0), 2**70))),
            ("requests_as_string", _mutated(valid, _set(("entries", 0, 4), "3"))),
            ("scope_not_a_scope", _mutated(valid, _set(("scope",), "team"))),
            ("scope_as_list", _mutated(valid, _set(("scope",), ["team=a"]))),
            ("tick_as_string", b'{"schema_version":1,"tick_ns":"soon"}'),
            ("reset_without_time", b'{"schema_version":1,"reset":{"scope":"team=a","reason":"x"}}')]


def guardrail_state_poison(valid: bytes) -> list[Poison]:
    """`valid`: a scope's genai.guardrails.state value with a bucket and a period total."""
    return [*_common(valid, b'"scope":"', versioned=False),  # an internal value: no schema_version
            ("period_total_nan", _mutated(valid, _set(("periods",), {"2026-11": "NaN"}))),
            ("period_not_a_period", _mutated(valid, _set(("periods",), {"soon": "1.0"}))),
            ("rate_as_string", _mutated(valid, _set(("rate",), "open"))),
            ("rate_state_unknown", _mutated(valid, _set(("rate", 0), "ajar"))),
            ("offsets_huge", _mutated(valid, _set(("offsets",), [[0, 2**70]]))),
            ("alert_id_without_parts", _mutated(valid, _set(("alerted",), ["budget_threshold"]))),
            ("bucket_cost_as_number", _mutated(valid, _set(("buckets", 0, 1), 1.5))),
            ("buckets_missing", _mutated(valid, _delete(("buckets",)))),
            ("scope_not_a_scope", _mutated(valid, _set(("scope",), "team")))]


def focus_poison(valid: bytes) -> list[Poison]:
    """`valid`: a genai.cost.focus value (one FOCUS row)."""
    return [*_common(valid, b'"x_AttributionKey":"', versioned=False),
            ("wrong_schema_version", _mutated(valid, _set(("x_SchemaVersion",), 2))),
            ("row_id_missing", _mutated(valid, _delete(("x_RowId",)))),
            ("cost_as_number", _mutated(valid, _set(("BilledCost",), 0.002))),
            ("cost_nan", _mutated(valid, _set(("BilledCost",), "NaN"))),
            ("cost_finer_than_the_files", _mutated(valid, _set(("BilledCost",), "0." + "1" * 30))),
            ("cost_larger_than_the_files", _mutated(valid, _set(("ListCost",), "9" * 30))),
            ("impossible_date", _mutated(valid, _set(("ChargePeriodStart",), "2026-13-45T99:99:99Z"))),
            ("date_as_number", _mutated(valid, _set(("ChargePeriodEnd",), 1767225600))),
            ("tags_as_list", _mutated(valid, _set(("Tags",), ["team", "search"]))),
            ("tag_huge_int", _mutated(valid, _set(("Tags", "n"), 2**70))),
            ("request_count_huge", _mutated(valid, _set(("x_RequestCount",), 2**64))),
            ("allocated_as_string", _mutated(valid, _set(("x_Allocated",), "yes"))),
            ("currency_with_newline", _mutated(valid, _set(("BillingCurrency",), "USD\n")))]


def breaker_poison(valid: bytes) -> list[Poison]:
    """`valid`: a genai.breaker.commands value (an open manual breaker)."""
    return [*_common(valid, b'"reason":"'),
            ("state_unknown", _mutated(valid, _set(("state",), "ajar"))),
            ("probe_ratio_above_one", _mutated(valid, _set(("probe_ratio",), 2))),
            ("probe_ratio_as_string", _mutated(valid, _set(("probe_ratio",), "half"))),
            ("scope_not_a_scope", _mutated(valid, _set(("scope",), "team"))),
            ("expiry_not_a_time", _mutated(valid, _set(("expires_at",), "2026-99-99T00:00:00Z"))),
            ("env_action_for_an_unknown_env", _mutated(valid, _set(("env_actions",), {"staging": "block"}))),
            ("action_unknown", _mutated(valid, _set(("action",), "explode"))),
            ("reason_missing", _mutated(valid, _delete(("reason",)))),
            ("downgrade_as_list", _mutated(valid, _set(("downgrade",), ["gpt-4o"]))),
            ("breaker_id_of_no_source", _mutated(valid, _set(("breaker_id",), "other|team=a")))]
