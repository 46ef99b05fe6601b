"""The first step of decoding any versioned topic value: JSON object, expected `schema_version`."""

from __future__ import annotations

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
