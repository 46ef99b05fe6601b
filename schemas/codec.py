"""What every topic value shares: typed decoding, the bounded wire types, the keyed record, the timestamp format.

Every value a spendstream process consumes is decoded with `decode_as` into a msgspec type that
validates while it decodes: a value of the wrong type, out of range, missing a field, of another
schema version, not UTF-8 or nested past the decoder's depth raises SchemaError, never anything
else. Unknown fields are ignored (a newer producer may add some).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, TypeVar

import msgspec
import orjson

from schemas.errors import SchemaError

_T = TypeVar("_T")

#: a count or offset on the wire: what a signed 64-bit field holds, never negative
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
#: a signed 64-bit value (unix seconds, which may precede 1970 in a hostile value but not overflow)
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: an exact decimal as `str(Decimal)` writes it, bounded: no NaN, no infinity, no 1E999999999
DECIMAL_TEXT: Final = r"^-?[0-9]{1,40}(\.[0-9]{1,40})?(E[+-]?[0-9]{1,2})?\Z"
DecimalText = Annotated[str, msgspec.Meta(pattern=DECIMAL_TEXT)]


def decode_as(decoder: msgspec.json.Decoder[_T], value: bytes, what: str) -> _T:
    """`value` decoded and validated by `decoder`. Raises SchemaError naming `what` and where the first problem
    is (`Expected `int`, got `str` - at `$.events[0].tokens.output``)."""
    try:
        return decoder.decode(value)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise SchemaError(f"{what}: {exc}") from exc
    except RecursionError as exc:  # nested deeper than the decoder follows, even in fields it ignores
        raise SchemaError(f"{what}: nested too deeply") from exc


def load_versioned(value: bytes, what: str, version: int) -> dict[str, Any]:
    """The value as a dict. Raises SchemaError naming `what` when it is not JSON, not an object or
    of another schema version."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SchemaError(f"{what}: expected a JSON object")
    if data.get("schema_version") != version:
        raise SchemaError(f"{what}: unsupported schema_version {data.get('schema_version')!r}")
    return data


#: one keyed message as it goes on a topic: (key, value)
Record = tuple[bytes, bytes]


def parse_utc(value: str) -> datetime:
    """A date or date-time as people type it (`2026-11-01`, `2026-11-01T08:00`, `...Z`), read as UTC when it
    names no zone. Raises ValueError."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def plain_decimal(value: Decimal) -> Decimal:
    """Without trailing zeros and never in E-notation: 11.4184475, not 11.418447500000000000."""
    return Decimal(format(value.normalize(), "f"))


def rfc3339(ts_s: float) -> str:
    """A Unix time as the contract's UTC timestamp: `2026-11-01T08:00:00Z` (fractions only when `ts_s` has them)."""
    return datetime.fromtimestamp(ts_s, UTC).isoformat().replace("+00:00", "Z")
