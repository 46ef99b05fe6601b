"""Messages as the code writes them validate against the JSON Schemas published in schemas/."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources

import jsonschema
import orjson
import pytest

from collector.ingest import NestedCallFilter, ingest_request
from pipeline.gateway.kill_switch import reset_commands, reset_records, trip_command
from pipeline.guardrails.decide import Context, decide, unpriced_alert
from pipeline.guardrails.state import ScopeState
from schemas.alert import decode_alert
from schemas.breaker import decode_command
from schemas.config import Config, config_from_dict
from schemas.errors import SchemaError
from schemas.policy import Scope
from schemas.spend import Reset, SpendEntry, SpendMessage, decode_spend, encode_reset, encode_spend, encode_tick
from schemas.usage import decode_usage_batch, encode_usage_batch
from tests.dialects import DIALECTS
from tests.support import make_request, make_span


def schema(name: str) -> jsonschema.Draft202012Validator:
    text = resources.files("schemas").joinpath(name).read_text("utf-8")
    return jsonschema.Draft202012Validator(json.loads(text))


def test_usage_batch_of_every_dialect_validates_and_round_trips() -> None:
    spans = [make_span(d.attrs) for d in DIALECTS]
    events = ingest_request(make_request(spans), Config(), None, NestedCallFilter()).events
    assert len(events) == len(DIALECTS)
    value = encode_usage_batch(events)
    schema("usage_batch.schema.json").validate(orjson.loads(value))
    assert decode_usage_batch(value) == events


def test_dead_letter_validates() -> None:
    bad = make_span({**DIALECTS[0].attrs, "gen_ai.usage.input_tokens": -1})
    [letter] = ingest_request(make_request([bad]), Config(), None, NestedCallFilter()).dead_letters
    schema("deadletter.schema.json").validate(orjson.loads(letter.encode()))


def test_config_schema_is_a_valid_json_schema() -> None:
    text = resources.files("schemas").joinpath("config.schema.json").read_text("utf-8")
    jsonschema.Draft202012Validator.check_schema(json.loads(text))


def test_guardrail_messages_validate_and_round_trip() -> None:

    policy = config_from_dict({"budgets": [{"scope": {"team": "a"}, "amount": 10, "on_exhausted": {"prod": "block"}}],
                               "velocity": {"scopes": ["team"], "min_history": "1m"}}).policy
    state = ScopeState(Scope.parse("team=a"))
    entries = [SpendEntry(0, 1, 1_795_000_000, Decimal("12.5"), 3, 900, Decimal(0))]
    state.add(entries, 0)
    out = decide(state, Context(policy, "EUR", 1_795_000_003, 1_795_000_004.5))
    alerts = [*out.alerts, unpriced_alert("acme", "llm-7b", ("unknown_model", "no price"), now_s=1, issued_s=2)]
    commands = [*out.commands, trip_command(Scope.parse("key=k"), "downgrade", "runaway", ttl_s=60,
                                            downgrade={"gpt-4o": "gpt-4o-mini"}, now_s=5),
                *reset_commands(Scope(), "over", 6)]
    assert {a.kind for a in alerts} >= {"budget_threshold", "unpriced_model"} and out.commands
    for alert in alerts:
        schema("alert.schema.json").validate(orjson.loads(alert.encode()))
        assert decode_alert(alert.encode()) == alert
    for command in commands:
        schema("breaker_command.schema.json").validate(orjson.loads(command.encode()))
        assert decode_command(command.encode()) == command
    for value in (encode_spend("team=a", entries), encode_tick(5), encode_reset(Reset("team=a", "handled", 6))):
        schema("spend.schema.json").validate(orjson.loads(value))
    message = decode_spend(encode_spend("team=a", entries))
    assert isinstance(message, SpendMessage) and message.entries == entries


@pytest.mark.parametrize("value", [b"nope", b'{"schema_version": 2}', b'{"schema_version": 1, "scope": "x"}',
                                   b'{"schema_version": 1, "scope": "x", "entries": [[1, 2]]}'])
def test_bad_spend_alert_and_command_messages_are_schema_errors(value: bytes) -> None:
    for decode in (decode_spend, decode_alert, decode_command):
        with pytest.raises(SchemaError):
            decode(value)


@pytest.mark.parametrize(("field", "value"), [("breaker_id", "manual|team=a\n"),
                                               ("issued_at", "2026-11-01T00:00:00Z\n")])
def test_a_command_field_with_a_trailing_newline_is_a_schema_error(field: str, value: str) -> None:
    """Python's `$` also matches before a final newline; the JSON Schema's does not, nor must the decoder."""
    command = orjson.loads(trip_command(Scope.parse("team=a"), "block", "runaway", ttl_s=60, downgrade={},
                                        now_s=5).encode())
    command[field] = value
    with pytest.raises(SchemaError):
        decode_command(orjson.dumps(command))


def test_a_reset_round_trips_and_the_kill_switch_writes_one_per_scope() -> None:
    reset = Reset("env=prod,team=a%2Cb", "runaway handled", 1_795_000_000)
    assert decode_spend(encode_reset(reset)) == reset
    assert decode_spend(encode_reset(reset._replace(scope="team=a%2Cb,env=prod"))) == reset  # canonical scope key
    commands = reset_commands(Scope.parse("team=search"), "handled", 1_795_000_000.5)
    assert {c.breaker_id for c in commands} == {"manual|team=search", "rate|team=search", "budget|team=search",
                                                "budget|team=search|monthly", "budget|team=search|daily"}
    [(key, value)] = reset_records([*commands, trip_command(Scope(), "block", "x", ttl_s=None, downgrade={},
                                                            now_s=5)])
    assert (key, decode_spend(value)) == (b"team=search", Reset("team=search", "handled", 1_795_000_000))


@pytest.mark.parametrize("reset", ["team=a", [], {"scope": "team=a", "reason": "x"},
                                   {"scope": "team=a", "reason": "x", "at_s": "soon"},
                                   {"scope": "team=a", "reason": "x", "at_s": True},
                                   {"scope": "team", "reason": "x", "at_s": 1},
                                   {"scope": 5, "reason": "x", "at_s": 1},
                                   {"scope": "team=a", "reason": None, "at_s": 1}])
def test_bad_resets_are_schema_errors(reset: object) -> None:
    with pytest.raises(SchemaError, match="reset"):
        decode_spend(orjson.dumps({"schema_version": 1, "reset": reset}))
