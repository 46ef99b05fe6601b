"""Messages as the code writes them validate against the JSON Schemas published in schemas/."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import orjson
import pytest

from collector.ingest import NestedCallFilter, ingest_request
from schemas.config import Config
from schemas.errors import SchemaError
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


@pytest.mark.parametrize(("value", "message"), [
    (b"not json", "not JSON"),
    (b'{"schema_version": 1}', "'events' list"),
    (b'{"schema_version": 99, "events": []}', "schema_version"),
    (b'{"schema_version": 1, "events": [{"id": "x"}]}', "missing field"),
])
def test_bad_usage_messages_are_schema_errors(value: bytes, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode_usage_batch(value)


def test_config_schema_is_a_valid_json_schema() -> None:
    text = resources.files("schemas").joinpath("config.schema.json").read_text("utf-8")
    jsonschema.Draft202012Validator.check_schema(json.loads(text))
