"""Topic names of the public contract (DESIGN §3). A deployment may prefix them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

USAGE: Final = "genai.usage"
COST_FOCUS: Final = "genai.cost.focus"
SPEND: Final = "genai.spend"
ALERTS: Final = "genai.alerts"
BREAKER_COMMANDS: Final = "genai.breaker.commands"
DEADLETTER: Final = "genai.deadletter"

ALL: Final = (USAGE, COST_FOCUS, SPEND, ALERTS, BREAKER_COMMANDS, DEADLETTER)
#: Topics that keep only the latest value per key.
COMPACTED: Final = frozenset({BREAKER_COMMANDS})


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The concrete topic names of one deployment, with its prefix applied."""

    prefix: str = ""

    def name(self, topic: str) -> str:
        return f"{self.prefix}{topic}"

    @property
    def usage(self) -> str:
        return self.name(USAGE)

    @property
    def cost_focus(self) -> str:
        return self.name(COST_FOCUS)

    @property
    def deadletter(self) -> str:
        return self.name(DEADLETTER)

    def all(self) -> list[str]:
        return [self.name(t) for t in ALL]
