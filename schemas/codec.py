"""What every topic value shares: the versioned-JSON first decoding step, the keyed record, the timestamp format."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from schemas.errors import SchemaError


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
