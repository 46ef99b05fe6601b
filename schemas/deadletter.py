"""DeadLetter: usage that could not be accepted or priced, kept with the reason (`genai.deadletter`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

DEADLETTER_SCHEMA_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A rejected usage record. `reason` is a stable machine code, `detail` a sentence for people.

    `fields` carries what could be read of the call (ids, model, token counts, attribution),
    never prompt or completion content.
    """

    reason: str
    detail: str
    stage: str
    attribution_key: str
    usage_id: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = DEADLETTER_SCHEMA_VERSION

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))
