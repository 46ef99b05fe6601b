"""DeadLetter: usage that could not be accepted or priced, kept with the reason (`genai.deadletter`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

DEADLETTER_SCHEMA_VERSION: Final = 1
#: a rejected message's `detail` is cut here: an exception's text may quote a huge value
DETAIL_MAX_CHARS: Final = 500


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


def rejected_message(*, reason: str, stage: str, detail: str, topic: str, partition: int, offset: int,
                     key: bytes | None, attribution_key: str = "") -> DeadLetter:
    """A consumed message that could not be decoded, validated or processed: where it is, not what it says (the
    value could hold anything a foreign producer wrote, prompts included)."""
    return DeadLetter(reason=reason, detail=detail[:DETAIL_MAX_CHARS], stage=stage, attribution_key=attribution_key,
                      fields={"topic": topic, "partition": partition, "offset": offset,
                              "key": (key or b"").decode("utf-8", "replace")[:DETAIL_MAX_CHARS]})
