"""UsageEvent: one priceable model call, as the collector publishes it to `genai.usage`.

A `genai.usage` message value is a UsageBatch: the events of one OTLP request that share
an attribution key, so one Kafka message carries many calls (DESIGN §3 "may be batched").
The types are msgspec Structs: decoding validates every field against `usage_batch.schema.json`
(types, ranges, id patterns), except that unknown fields are ignored and `operation` and
`dialect` take any text, so a newer collector's additions do not stop an older worker, and integers must
fit a signed 64-bit field (a start time past 2^63 ns, year 2262, is not a time the pipeline prices).

Events and their token counts are not tracked by the cycle collector (`gc=False`): they hold only text, numbers
and mappings of text, so they can be in no reference cycle, and the collector and the workers make and hold
thousands of them a second, each of which would otherwise push the collections of the whole heap nearer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from schemas.codec import Count, DecimalText, decode_as

USAGE_SCHEMA_VERSION: Final = 1
#: ids are checked for being text, not for the hex patterns the collector writes: pricing needs them only as keys
UsageId = Annotated[str, msgspec.Meta(min_length=1)]


class TokenCounts(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Tokens by price meter. `input_uncached` excludes cache reads and writes.

    `reasoning` is informational: it is already part of `output` (semconv and OpenAI).
    """

    input_uncached: Count = 0
    cache_read: Count = 0
    cache_write: Count = 0
    output: Count = 0
    reasoning: Count = 0

    @property
    def input_total(self) -> int:
        return self.input_uncached + self.cache_read + self.cache_write


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One model call. `id` is `<trace_id>-<span_id>` (hex), so retries keep their id."""

    id: UsageId
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_time_unix_nano: Count
    end_time_unix_nano: Count
    operation: str
    provider: str | None
    request_model: str | None
    response_model: str | None
    tokens: TokenCounts
    attribution: Mapping[str, str]
    attribution_key: Annotated[str, msgspec.Meta(min_length=1)]
    allocated: bool = True
    service_tier: str | None = None
    server_address: str | None = None
    dialect: str = "semconv"
    error: bool = False
    schema_version: Literal[1] = USAGE_SCHEMA_VERSION
    extra: Mapping[str, str] = msgspec.field(default_factory=dict)
    #: Set when the span was sampled (tracestate `ot=th:...`): the calls it stands for, 1/p, to 6 decimal
    #: places. `tokens` are then already scaled by it (estimated, not measured); None: one call, counted.
    adjusted_count: DecimalText | None = None

    @property
    def requests(self) -> int:
        """The calls this event counts for: 1, or its adjusted count to the nearest whole call."""
        return 1 if self.adjusted_count is None else round(Decimal(self.adjusted_count))

    @property
    def model(self) -> str | None:
        """The model to price: what actually answered, else what was asked for."""
        return self.response_model or self.request_model

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], msgspec.to_builtins(self))


class UsageBatch(msgspec.Struct, frozen=True, kw_only=True):
    """A `genai.usage` message value: the events of one attribution key."""

    schema_version: Literal[1]  # required, as the schema says (an event's own may be left out)
    events: Annotated[list[UsageEvent], msgspec.Meta(min_length=1)]


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(UsageBatch)


def encode_usage_batch(events: Sequence[UsageEvent]) -> bytes:
    """Encode the events of one attribution key as one `genai.usage` message value."""
    return _ENCODER.encode(UsageBatch(schema_version=USAGE_SCHEMA_VERSION, events=list(events)))


def decode_usage_batch(value: bytes) -> list[UsageEvent]:
    """Decode a `genai.usage` message value. Raises SchemaError if it is not a valid UsageBatch."""
    return decode_as(_DECODER, value, "usage batch").events
