"""UsageEvent: one priceable model call, as the collector publishes it to `genai.usage`.

A `genai.usage` message value is a UsageBatch: the events of one OTLP request that share
an attribution key, so one Kafka message carries many calls (DESIGN §3 "may be batched").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson

from schemas.errors import SchemaError

USAGE_SCHEMA_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenCounts:
    """Tokens by price meter. `input_uncached` excludes cache reads and writes.

    `reasoning` is informational: it is already part of `output` (semconv and OpenAI).
    """

    input_uncached: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def input_total(self) -> int:
        return self.input_uncached + self.cache_read + self.cache_write


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEvent:
    """One model call. `id` is `<trace_id>-<span_id>` (hex), so retries keep their id."""

    id: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_time_unix_nano: int
    end_time_unix_nano: int
    operation: str
    provider: str | None
    request_model: str | None
    response_model: str | None
    tokens: TokenCounts
    attribution: Mapping[str, str]
    attribution_key: str
    allocated: bool = True
    service_tier: str | None = None
    server_address: str | None = None
    dialect: str = "semconv"
    error: bool = False
    schema_version: int = USAGE_SCHEMA_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        """The model to price: what actually answered, else what was asked for."""
        return self.response_model or self.request_model

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], orjson.loads(orjson.dumps(self)))


def usage_event_from_dict(data: Mapping[str, Any]) -> UsageEvent:
    """Build a UsageEvent from its JSON form. Raises SchemaError naming the bad field."""
    try:
        version = data.get("schema_version", USAGE_SCHEMA_VERSION)
        if version != USAGE_SCHEMA_VERSION:
            raise SchemaError(f"usage event: unsupported schema_version {version!r}")
        tokens = TokenCounts(**data["tokens"])
        fields = {k: v for k, v in data.items() if k != "tokens"}
        return UsageEvent(tokens=tokens, **fields)
    except KeyError as exc:
        raise SchemaError(f"usage event: missing field {exc.args[0]!r}") from exc
    except TypeError as exc:
        raise SchemaError(f"usage event: {exc}") from exc


def encode_usage_batch(events: Sequence[UsageEvent]) -> bytes:
    """Encode the events of one attribution key as one `genai.usage` message value."""
    # orjson serialises (slotted) dataclasses natively, many times faster than dataclasses.asdict
    return orjson.dumps({"schema_version": USAGE_SCHEMA_VERSION, "events": events})


def decode_usage_batch(value: bytes) -> list[UsageEvent]:
    """Decode a `genai.usage` message value. Raises SchemaError if it is not a UsageBatch."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"usage batch: not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise SchemaError("usage batch: expected an object with an 'events' list")
    if data.get("schema_version") != USAGE_SCHEMA_VERSION:
        raise SchemaError(f"usage batch: unsupported schema_version {data.get('schema_version')!r}")
    return [usage_event_from_dict(e) for e in data["events"]]
